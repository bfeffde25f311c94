"""What every custom ``autograd.Function`` of the package shares: no autocast inside, no silent second derivative.

Autocast: the package computes logits, log-softmax and every reduction in float32
(float64 for float64 input) with the inputs in their own dtype, under
``torch.autocast`` exactly as without it. Autocast would otherwise run the matrix
products of the torch and reference backends in bfloat16 (a 1e-2 error where 1e-6
is promised) and hand back bfloat16 results.

Second derivatives: the fused backwards are written for first-order gradients. With
``create_graph=True`` their results would carry no graph back to the inputs, and a
gradient penalty built on them would silently be wrong (zero, or None for
``autograd.grad(..., inputs)``); instead, differentiating such a result with respect to
anything raises. (``torch.autograd.function.once_differentiable`` raises only when the
incoming gradients require grad, which they do not for ``loss.backward(create_graph=True)``.)
"""

import contextlib
import functools

import torch


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class _SecondDerivativeError(torch.autograd.Function):
    """Passes gradients through unchanged, hung on the Function's inputs: differentiating them with respect to
    the gradients themselves or to any input raises."""

    @staticmethod
    def forward(ctx, name, count, *grads_then_inputs):
        ctx.name = name
        return tuple(grad.view_as(grad) for grad in grads_then_inputs[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.name} has no second derivative: its backward is fused and first-order only. "
            "For higher-order gradients use backend='reference' (and path='per_token' for papo_loss)."
        )


def fused_backward(name: str):
    """Decorator for the ``backward`` of a fused Function: runs it without grad and without autocast, and under
    ``create_graph=True`` returns gradients whose own backward raises a clear error naming ``name``.

    The Function must save its differentiable inputs with ``save_for_backward``: the guard hangs on every saved
    tensor that requires grad, so a path from the gradients back to any input passes through it."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            device = next(grad.device for grad in grad_outputs if isinstance(grad, torch.Tensor))
            saved = ctx.saved_tensors if torch.is_grad_enabled() else ()  # unpacked with their graph
            with torch.no_grad(), no_autocast(device):
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            present = [i for i, grad in enumerate(grads) if isinstance(grad, torch.Tensor)]
            if not present:
                return grads
            leaves = [grads[i].detach().requires_grad_() for i in present]
            inputs = [t for t in saved if isinstance(t, torch.Tensor) and t.requires_grad]
            guarded = list(grads)
            for i, grad in zip(present, _SecondDerivativeError.apply(name, len(leaves), *leaves, *inputs)):
                guarded[i] = grad
            return tuple(guarded)

        return wrapper

    return decorate
