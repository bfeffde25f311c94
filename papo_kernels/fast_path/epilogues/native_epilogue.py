"""The native epilogue: the fast path's per-row work on CPU in C++ (``csrc/``), built on first use.

Two sweeps per row pair, vectorised (``at::vec``) and parallel over rows (``at::parallel_for``):
statistics (l, H, lse, l~, H~, lse~, KL from the maxima and the sums of each row), then dz / tau,
written over the logits or into ``out``. The logits are only read by ``statistics``; no
temporaries. The ops are ``torch.ops.papo_kernels.epilogue_statistics``, ``epilogue_row_partials`` (the
partials of a vocabulary-parallel head's block, ``contract.py``),
``epilogue_logit_gradient`` (out=) and ``epilogue_logit_gradient_`` (over the logits); this module
gives them fake kernels (``torch.compile``, ``opcheck``) and makes the statistics op differentiable,
its backward being the gradient op. The numerics (sums in blocks, H and KL consistent with the
rounded lse) are described in ``csrc/papo_epilogue.h``.

``resolve(strict)`` builds the library (``native_build.load``) and returns this module. Where the library
cannot be had, one rule holds whatever the cause (no compiler or ninja, a cache that cannot be written, a
failed build): ``backend='native'`` asked for it by name, so ``strict`` raises that error
(``NativeUnavailable`` or ``NativeBuildError``, both ``RuntimeError``) with the cause; ``backend='auto'``
runs the torch epilogue instead, with one warning that gives the cause.
"""

import sys
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import native_build, torch_epilogue
from .contract import RowStatistics, UpstreamGradients

NAME = "native"

_failure: Optional[RuntimeError] = None  # why the library cannot be had here (native_build's error)
_warned = False
_registered = False


def workspace_bytes_per_token(vocab_size: int, paired: bool, itemsize: int) -> int:
    return 0


def statistics(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
               paired: bool) -> RowStatistics:
    return RowStatistics(*torch.ops.papo_kernels.epilogue_statistics(logits, tokens, bias, float(temperature), paired))


def row_partials(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float, paired: bool) -> Tensor:
    return torch.ops.papo_kernels.epilogue_row_partials(logits, tokens, bias, float(temperature), paired)


def logit_gradient(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                   stats: RowStatistics, grads: UpstreamGradients, out: Tensor) -> None:
    # the ops take a gradient for every statistic; the loss has none for lse and lse~ (None)
    inputs = (tokens, bias, float(temperature), stats.lse, stats.entropy, stats.lse_masked, stats.entropy_masked,
              stats.kl, grads.logprobs, grads.entropy, None, grads.logprobs_masked, grads.entropy_masked, None, grads.kl)
    if out is logits:
        torch.ops.papo_kernels.epilogue_logit_gradient_(logits, *inputs)
    else:
        torch.ops.papo_kernels.epilogue_logit_gradient(logits, *inputs, out=out)


def _statistics_fake(logits, tokens, bias, temperature, paired):
    return logits.new_empty((7 if paired else 3, tokens.shape[0]))


def _row_partials_fake(logits, tokens, bias, temperature, paired):
    return logits.new_empty((9 if paired else 4, tokens.shape[0]))


def _gradient_fake(*args, **kwargs):
    return None


def _setup_statistics_context(ctx, inputs, output):
    logits, tokens, bias, temperature, paired = inputs
    ctx.save_for_backward(logits, tokens, bias, output)
    ctx.temperature = temperature
    ctx.paired = paired
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _statistics_backward(ctx, grad_statistics):
    """d loss / d logits = the gradient op with every statistic's upstream gradient; d loss / d b = its row sum."""
    logits, tokens, bias, output = ctx.saved_tensors
    stats = RowStatistics(*output)
    grads = tuple(grad_statistics)
    if not ctx.paired:
        grads = grads + (None,) * 4
    grad_logits = torch.empty_like(logits)
    torch.ops.papo_kernels.epilogue_logit_gradient(
        logits, tokens, bias, ctx.temperature, stats.lse, stats.entropy, stats.lse_masked, stats.entropy_masked,
        stats.kl, *grads, out=grad_logits)
    grad_bias = grad_logits.sum(0) if ctx.bias_needs_grad else None
    return grad_logits, None, grad_bias, None, None


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake("papo_kernels::epilogue_statistics", _statistics_fake)
    torch.library.register_fake("papo_kernels::epilogue_row_partials", _row_partials_fake)
    torch.library.register_fake("papo_kernels::epilogue_logit_gradient", _gradient_fake)
    torch.library.register_fake("papo_kernels::epilogue_logit_gradient_", _gradient_fake)
    torch.library.register_autograd("papo_kernels::epilogue_statistics", _statistics_backward,
                                    setup_context=_setup_statistics_context)
    _registered = True


def load() -> None:
    """Builds and loads the ops with their Python parts; raises what ``native_build.load`` raises."""
    native_build.load()
    _register_python_parts()


def resolve(strict: bool):
    """This module when the library loads; else the torch epilogue with one warning, or the error when ``strict``
    (see the module docstring)."""
    global _failure, _warned
    if _failure is None:
        try:
            load()
            return sys.modules[__name__]
        except (native_build.NativeUnavailable, native_build.NativeBuildError) as error:
            _failure = error
    if strict:
        raise type(_failure)(f"backend='native' asks for the native CPU epilogue, which cannot be had here: "
                             f"{_failure}\nbackend='auto' runs the torch epilogue instead (with a warning), "
                             "backend='torch' without one") from _failure
    if not _warned:
        _warned = True
        warnings.warn(f"papo_kernels: the native CPU epilogue is unavailable ({_failure}); the fast path uses the "
                      "torch epilogue instead, which is slower", RuntimeWarning, stacklevel=3)
    return torch_epilogue
