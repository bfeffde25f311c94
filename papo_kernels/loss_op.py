"""``papo_loss`` as one custom op: the form it takes under ``torch.compile``.

Dynamo cannot trace papo_loss's own body: its value checks read tensors (one host transfer),
the unmasked tokens are a selection of data-dependent size, and the fast path computes its
gradient inside an autograd.Function's forward, in a Python loop over chunks. So while it is
traced, papo_loss hands its tensors and hyperparameters, as they came, to the op
``papo_kernels::papo_loss``. Dynamo and AOTAutograd see one op with a fake kernel (the shapes
of its outputs). At run time its kernel is the eager ``papo_loss`` itself, on detached inputs
that want a gradient where the traced ones did, then ``torch.autograd.grad`` of its loss: every
check, with its error (a ``ValueError`` or ``TypeError`` naming the argument, before any
computation) and the warnings, happens there, as in eager mode. The gradients are outputs of the
op, and its registered backward scales them by the loss's incoming gradient, as the fast path's
own backward does; so the compiled loss, metrics and gradients are the eager ones.

Limits: first-order gradients only (the op's backward is not itself differentiable).
"""

import ast
import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import loss
from .backends.reference import compute_dtype

DIFFERENTIABLE = ("hidden", "hidden_masked", "weight", "bias")


def _autograd_keys() -> torch._C.DispatchKeySet:
    """The dispatch keys the dispatcher excludes while it runs a kernel below autograd."""
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set() - outside


AUTOGRAD_KEYS = _autograd_keys()


@contextlib.contextmanager
def _autograd_recorded() -> Iterator[None]:
    """Autograd records again inside the op's kernel, which the dispatcher runs below autograd (its keys excluded):
    the kernel's own use of autograd (the fast path's per-token upstream gradients, torch.autograd.grad of the
    loss) is on tensors made inside it and never reaches the op's callers."""
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - AUTOGRAD_KEYS):
        yield


def _encoded(values: Dict[str, object], tensor_names: List[str]) -> str:
    """The op's ``settings``: the hyperparameters given as Python constants (None, bool, int, float, str), as the
    ``repr`` of a tuple (floats as ``("float", repr)``: ``nan`` and ``inf`` have no literal), and the names of those
    passed as tensors. Plain Python that dynamo folds into a constant of the graph while it traces."""
    tagged = tuple((name, ("float", repr(value)) if isinstance(value, float) else value)
                   for name, value in values.items())
    return repr((tagged, tuple(tensor_names)))


def _decoded(settings: str) -> Tuple[Dict[str, object], Tuple[str, ...]]:
    """``_encoded``'s values and tensor names, back."""
    tagged, tensor_names = ast.literal_eval(settings)
    values = {name: float(value[1]) if isinstance(value, tuple) and value[:1] == ("float",) else value
              for name, value in tagged}
    return values, tensor_names


def _receives_gradient(requires_grad: List[bool], settings: str) -> List[bool]:
    """Which of DIFFERENTIABLE get a gradient: those that want one, but the masked pass only where a term of the
    loss may read it (gamma or eta_masked not 0, or given as a tensor; eager papo_loss leaves its gradient None
    otherwise). Read from ``settings`` alone, so the fake kernel and the kernel agree."""
    values, tensor_names = _decoded(settings)
    masked_terms = any(name in tensor_names or values.get(name, 1) != 0 for name in ("gamma", "eta_masked"))
    return [wants and (name != "hidden_masked" or masked_terms) for name, wants in zip(DIFFERENTIABLE, requires_grad)]


@torch.library.custom_op("papo_kernels::papo_loss", mutates_args=())
def papo_loss_op(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                 completion_ids: Tensor, completion_mask: Tensor, advantages: Tensor,
                 masked_logprobs: Optional[Tensor], old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
                 policy_weights: Optional[Tensor], tensor_settings: List[Tensor], settings: str,
                 requires_grad: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, the metrics as one vector in ``METRIC_NAMES`` order then ``tokens``, then the gradients of hidden,
    hidden_masked, weight and bias, each an empty tensor where it gets none). ``settings`` holds the
    hyperparameters (``_encoded``), those given as tensors (or as NumPy scalars, which dynamo makes tensors) in
    ``tensor_settings``."""
    values, tensor_names = _decoded(settings)
    hyperparameters = {**values, **dict(zip(tensor_names, tensor_settings))}
    leaves = [None if value is None else value.detach().requires_grad_(wants)
              for value, wants in zip((hidden, hidden_masked, weight, bias), requires_grad)]
    receives = _receives_gradient(requires_grad, settings)
    with _autograd_recorded(), torch.enable_grad() if any(requires_grad) else torch.no_grad():
        value, metrics = loss.papo_loss(leaves[0], leaves[2], completion_ids, completion_mask, advantages,
                                        hidden_masked=leaves[1], masked_logprobs=masked_logprobs,
                                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                        policy_weights=policy_weights, bias=leaves[3], **hyperparameters)
        wanted = [leaf for leaf, gets in zip(leaves, receives) if gets]
        found = iter(torch.autograd.grad(value, wanted, allow_unused=True) if wanted else ())
    gradients = []
    for leaf, gets in zip(leaves, receives):
        grad = next(found) if gets else None
        if grad is None:
            grad = torch.zeros_like(leaf) if gets else hidden.new_empty(0)
        gradients.append(grad)
    vector = torch.stack([metrics[name] for name in loss.METRIC_NAMES + ("tokens",)])
    return (value.detach(), vector, *gradients)


@papo_loss_op.register_fake
def _papo_loss_fake(hidden, hidden_masked, weight, bias, completion_ids, completion_mask, advantages,
                    masked_logprobs, old_logprobs, ref_logprobs, policy_weights, tensor_settings, settings,
                    requires_grad):
    dtype = compute_dtype(hidden.dtype)
    receives = _receives_gradient(requires_grad, settings)
    gradients = [value.new_empty(value.shape) if gets else hidden.new_empty(0)
                 for value, gets in zip((hidden, hidden_masked, weight, bias), receives)]
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(len(loss.METRIC_NAMES) + 1, dtype=dtype),
            *gradients)


def _setup_context(ctx, inputs, output):
    *_, tensor_settings, settings, requires_grad = inputs
    ctx.receives = _receives_gradient(requires_grad, settings)
    ctx.tensor_settings_count = len(tensor_settings)
    ctx.save_for_backward(*output[2:])


def _backward(ctx, loss_grad, *_):
    """d loss / d input = the stored gradient times the loss's incoming gradient; None for the other inputs (a list
    of them for ``tensor_settings``)."""
    scaled = [grad * loss_grad.to(grad.dtype) if gets else None
              for grad, gets in zip(ctx.saved_tensors, ctx.receives)]
    return (*scaled, *[None] * 7, [None] * ctx.tensor_settings_count, None, None)


papo_loss_op.register_autograd(_backward, setup_context=_setup_context)


CONSTANTS = (type(None), bool, int, float, str)


def traced_papo_loss(hidden, weight, completion_ids, completion_mask, advantages, hidden_masked, masked_logprobs,
                     old_logprobs, ref_logprobs, policy_weights, bias,
                     hyperparameters: Dict[str, object]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """papo_loss while traced by torch.compile: the op on everything as it came (its kernel checks it)."""
    tensors = {name: torch.as_tensor(value) for name, value in hyperparameters.items()
               if not isinstance(value, CONSTANTS)}
    values = {name: value for name, value in hyperparameters.items() if name not in tensors}
    requires_grad = [torch.is_grad_enabled() and value is not None and value.requires_grad
                     for value in (hidden, hidden_masked, weight, bias)]
    value, vector, *_ = papo_loss_op(hidden, hidden_masked, weight, bias, completion_ids, completion_mask,
                                     advantages, masked_logprobs, old_logprobs, ref_logprobs, policy_weights,
                                     list(tensors.values()), _encoded(values, list(tensors)), requires_grad)
    metrics = dict(zip(loss.METRIC_NAMES + ("tokens",), vector.detach().unbind()))
    return value, metrics
