"""The per-token ops by row chunks on the fast path's pieces: a statistics step per chunk, library products, the
epilogue's dZ.

Forward: the per-token statistics, one chunk of tokens at a time, by the backend's ``ChunkedHead.statistics``
(Triton: the GEMM with a statistics epilogue of ``triton_logit_statistics.py``, the logits never stored; torch:
the library product ``[h; h~] W^T`` and the torch epilogue's statistics sweep).

Backward, per chunk of C tokens (shared STYLE.md, "a path built from library products and an epilogue"):

1. the chunk's logits again, stored this time, and its statistics (on Triton shifted by each row's maximum from
   the forward: ``triton_logit_statistics.TRITON_HEAD``);
2. dZ by the epilogue's ``logit_gradient`` (the gradient table of PAPO_SPEC.md), from the per-token upstream
   gradients;
3. ``d[h; h~] = dZ W`` (``MatrixProducts.grad_rows``), ``dW += dZ^T [h; h~]`` (``accumulate_grad_weight``, one
   float32 accumulator), ``db += sum_rows dZ``. No atomics: every row's gradient is written once, and the weight's
   gradient accumulates chunk after chunk.

Matrix work: 2 N D V per pass forward, 2 N D V recomputed and 4 N D V of gradients per pass backward (16 N D V for
both passes, against 12 N D V for ``papo_loss``'s fast path, which keeps the gradient of its forward). Only inputs
are saved; a second backward through the same graph works, unlike the fast path's.
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._guards import fused_backward
from ..fast_path.chunk_loop import MatrixProducts, rows_per_chunk
from ..fast_path.epilogues import torch_epilogue
from ..fast_path.epilogues.contract import RowStatistics, UpstreamGradients
from ..fast_path.workspace import LOW_MEMORY_WORKSPACE_BYTES
from .reference import compute_dtype


class HeadStatistics(NamedTuple):
    """The per-token statistics of a chunk and, where the head keeps them, the row maxima m of z (passes, C)."""

    stats: RowStatistics
    maxima: Optional[Tensor]


# statistics(weight, products, hidden_rows, hidden_masked_rows or None, tokens, bias, temperature, logits or None,
#            shift or None) -> HeadStatistics
ChunkStatistics = Callable[..., HeadStatistics]


@dataclass(frozen=True)
class ChunkedHead:
    """A backend's pieces for the chunk loops.

    - ``name``: the backend's name, for messages.
    - ``statistics``: a chunk's statistics; with a ``logits`` buffer it also leaves the chunk's logits there in the
      state its epilogue's ``logit_gradient`` reads. With ``shift`` (the maxima a forward returned for these rows)
      the head computes on z - m.
    - ``epilogue``: the fast-path epilogue whose ``logit_gradient`` gives dZ.
    - ``forward_tokens(n, V, D, paired, dtype, budget)``: tokens per forward chunk for a temporaries budget.
    - ``forward_needs_logits``: whether the forward's statistics need a logits buffer.
    - ``scaled_logits``: whether the logits left are z (bias and 1 / tau applied), so that ``logit_gradient``
      takes no bias, a temperature of 1 and upstream gradients divided by tau; else the raw rows W^T.
    """

    name: str  # the backend's, for messages
    statistics: ChunkStatistics
    epilogue: ModuleType
    forward_tokens: Callable[[int, int, int, bool, torch.dtype, int], int]
    forward_needs_logits: bool
    scaled_logits: bool


def _torch_statistics(weight, products: MatrixProducts, hidden_rows, hidden_masked_rows, tokens, bias, temperature,
                      logits, shift) -> HeadStatistics:
    """The library product into ``logits``, then the torch epilogue's statistics (which leave log p there; its log p
    = z - lse needs no shift: its entropy comes from the same rounded log p)."""
    paired = hidden_masked_rows is not None
    rows = torch.cat([hidden_rows, hidden_masked_rows]) if paired else hidden_rows
    products.logits(rows, out=logits)
    return HeadStatistics(torch_epilogue.statistics(logits, tokens, bias, temperature, paired), None)


def _torch_forward_tokens(n: int, vocab_size: int, dim: int, paired: bool, dtype: torch.dtype, budget: int) -> int:
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    return rows_per_chunk(n, vocab_size, dim, paired, itemsize, False,
                          torch_epilogue.workspace_bytes_per_token(vocab_size, paired, itemsize), budget)


TORCH_HEAD = ChunkedHead("torch", _torch_statistics, torch_epilogue, _torch_forward_tokens,
                         forward_needs_logits=True, scaled_logits=False)


@dataclass(frozen=True)
class GradientPlan:
    """Which dz each pass needs, from the upstream gradients present and the inputs that want a gradient."""

    clean_dz: bool
    masked_dz: bool
    clean_logits: bool
    masked_logits: bool

    @classmethod
    def make(cls, grads, needs_hidden, needs_hidden_masked, needs_head) -> "GradientPlan":
        """grads: (g_l, g_l~, g_H, g_H~, g_KL), None where absent; needs_head: weight or bias wants a gradient."""
        logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad = grads
        has_kl = kl_grad is not None
        clean_dz = (logprob_grad is not None or entropy_grad is not None or has_kl) and (needs_hidden or needs_head)
        masked_dz = (logprob_masked_grad is not None or entropy_masked_grad is not None or has_kl) and (
            needs_hidden_masked or needs_head)
        # the KL terms couple the passes: dz needs log q, dz~ needs p
        return cls(clean_dz, masked_dz, clean_dz or (masked_dz and has_kl), masked_dz or (clean_dz and has_kl))


@dataclass(frozen=True)
class HeadOptions:
    head: ChunkedHead
    temperature: float
    workspace_bytes: int = LOW_MEMORY_WORKSPACE_BYTES


def forward_statistics(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       tokens: Tensor, options: HeadOptions) -> HeadStatistics:
    """The per-token statistics of all N tokens, a chunk at a time, and the head's row maxima (passes, N)."""
    n, dim = hidden.shape
    paired = hidden_masked is not None
    head = options.head
    chunk = head.forward_tokens(n, weight.shape[0], dim, paired, hidden.dtype, options.workspace_bytes)
    products = logits = None
    if head.forward_needs_logits:
        products = MatrixProducts(weight)
        logits = torch.empty((2 if paired else 1) * chunk, weight.shape[0], dtype=products.result_dtype,
                             device=hidden.device)
    parts = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        count = rows.stop - rows.start
        parts.append(head.statistics(
            weight, products, hidden[rows], None if hidden_masked is None else hidden_masked[rows], tokens[rows],
            bias, options.temperature, None if logits is None else logits[:(2 if paired else 1) * count], None))
    if not parts:
        empty = hidden.new_empty(0, dtype=compute_dtype(hidden.dtype))
        return HeadStatistics(RowStatistics(*[empty] * (7 if paired else 3)), None)
    stats = RowStatistics(*(None if fields[0] is None else torch.cat(fields)
                            for fields in zip(*(part.stats for part in parts))))
    maxima = None if parts[0].maxima is None else torch.cat([part.maxima for part in parts], dim=1)
    return HeadStatistics(stats, maxima)


def backward_gradients(saved, grads, needs_input_grad, options: HeadOptions):
    """Gradients for (hidden, hidden_masked, weight, bias); None where not wanted or identically zero.

    saved: (hidden, hidden_masked, weight, bias, tokens, maxima), hidden_masked None for one pass, maxima the
    forward's (passes, N) row maxima or None; grads: (g_l, g_l~, g_H, g_H~, g_KL), None where absent;
    needs_input_grad: four flags for (hidden, hidden_masked, weight, bias).
    """
    hidden, hidden_masked, weight, bias, tokens, maxima = saved
    needs_hidden, needs_hidden_masked, needs_weight, needs_bias = needs_input_grad
    plan = GradientPlan.make(grads, needs_hidden, needs_hidden_masked, needs_weight or needs_bias)
    if not (plan.clean_dz or plan.masked_dz):
        return None, None, None, None
    # Absent upstream gradients go in as zeros: the epilogue then runs in one of two variants (one pass, or a pair
    # with every term) instead of one per subset of gradients, at a few more operations per logit in a sweep that
    # memory bounds. Zero-weighted terms add exact zeros (every factor is finite).
    present = next(g for g in grads if g is not None)
    logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad = (
        torch.zeros_like(present) if g is None else g for g in grads)
    # The passes whose logits dZ needs, clean first, and the upstream gradients in the epilogue's slots: a lone
    # masked pass takes the clean slot (without the KL, the two passes' formulas are the same).
    if plan.clean_logits and plan.masked_logits:
        pass_inputs, wants_dz = (0, 1), (plan.clean_dz, plan.masked_dz)
        slots = (logprob_grad, entropy_grad, logprob_masked_grad, entropy_masked_grad, kl_grad)
    elif plan.clean_logits:
        pass_inputs, wants_dz, slots = (0,), (True,), (logprob_grad, entropy_grad)
    else:
        pass_inputs, wants_dz, slots = (1,), (True,), (logprob_masked_grad, entropy_masked_grad)
    passes = len(pass_inputs)
    sources = tuple((hidden, hidden_masked)[i] for i in pass_inputs)
    wants_rows = tuple((needs_hidden, needs_hidden_masked)[i] for i in pass_inputs)

    n, dim = hidden.shape
    vocab_size = weight.shape[0]
    products = MatrixProducts(weight)
    result_dtype = products.result_dtype
    itemsize = torch.finfo(result_dtype).bits // 8
    half_dz = products.native_half
    epilogue = options.head.epilogue
    chunk = rows_per_chunk(n, vocab_size, dim, passes == 2, itemsize, half_dz,
                           epilogue.workspace_bytes_per_token(vocab_size, passes == 2, itemsize),
                           options.workspace_bytes)
    device = hidden.device
    logits_buffer = torch.empty(passes * chunk, vocab_size, dtype=result_dtype, device=device)
    dz_buffer = torch.empty(passes * chunk, vocab_size, dtype=weight.dtype, device=device) if half_dz else None
    grad_rows_buffer = torch.empty(passes * chunk, dim, dtype=hidden.dtype, device=device)
    grad_sources = tuple(torch.zeros_like(source) if dz and rows else None
                         for source, dz, rows in zip(sources, wants_dz, wants_rows))
    grad_weight = torch.zeros(weight.shape, dtype=result_dtype, device=device) if needs_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=result_dtype, device=device) if needs_bias else None

    shifts = None if maxima is None else maxima[list(pass_inputs)]
    if options.head.scaled_logits:  # the logits are z: dZ with respect to them, times 1 / tau
        slots = tuple(g / options.temperature for g in slots)
        gradient_bias, gradient_temperature = None, 1.0
    else:
        gradient_bias, gradient_temperature = bias, options.temperature

    # the rows with dZ wanted, and those whose dh is wanted: a contiguous range of the chunk's passes
    dz_passes = [i for i in range(passes) if wants_dz[i]]
    row_passes = [i for i in range(passes) if grad_sources[i] is not None]
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        count = rows.stop - rows.start
        chunk_rows = torch.cat([source[rows] for source in sources]) if passes == 2 else sources[0][rows]
        logits = logits_buffer[:passes * count]
        stats = options.head.statistics(
            weight, products, chunk_rows[:count], chunk_rows[count:] if passes == 2 else None, tokens[rows], bias,
            options.temperature, logits, None if shifts is None else shifts[:, rows].contiguous()).stats
        upstream = UpstreamGradients(*(g[rows] for g in slots))
        dz = logits if dz_buffer is None else dz_buffer[:passes * count]
        epilogue.logit_gradient(logits, tokens[rows], gradient_bias, gradient_temperature, stats, upstream, dz)
        if row_passes:
            first, last = row_passes[0] * count, (row_passes[-1] + 1) * count
            grad_rows = grad_rows_buffer[:last - first]
            products.grad_rows(dz[first:last], out=grad_rows)
            for i in row_passes:
                grad_sources[i][rows] = grad_rows[(i - row_passes[0]) * count:(i - row_passes[0] + 1) * count]
        first, last = dz_passes[0] * count, (dz_passes[-1] + 1) * count
        if grad_weight is not None:
            products.accumulate_grad_weight(grad_weight, dz[first:last], chunk_rows[first:last])
        if grad_bias is not None:
            grad_bias += dz[first:last].sum(0, dtype=result_dtype)

    grad_inputs = [None, None]  # (hidden, hidden_masked)
    for i, grad in zip(pass_inputs, grad_sources):
        grad_inputs[i] = grad
    grad_hidden, grad_hidden_masked = grad_inputs
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_hidden_masked, grad_weight, grad_bias


def _logprobs_gradients(ctx, logprob_grad, entropy_grad):
    hidden, weight, bias, tokens, maxima = ctx.saved_tensors
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_hidden, _, grad_weight, grad_bias = backward_gradients(
        (hidden, None, weight, bias, tokens, maxima), (logprob_grad, None, entropy_grad, None, None),
        (needs_hidden, False, needs_weight, needs_bias), ctx.options)
    return grad_hidden, grad_weight, grad_bias, None, None


def _perception_kl_gradients(ctx, *grads):
    return *backward_gradients(ctx.saved_tensors, grads, ctx.needs_input_grad[:4], ctx.options), None, None


class HeadChunksLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, options: HeadOptions):
        stats, maxima = forward_statistics(hidden, None, weight, bias, tokens, options)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, maxima)
        ctx.options = options
        return stats.logprobs, stats.entropy

    @staticmethod
    def backward(ctx, logprob_grad, entropy_grad):
        guarded = fused_backward(f"linear_logprobs ({ctx.options.head.name} backend)")(_logprobs_gradients)
        return guarded(ctx, logprob_grad, entropy_grad)


class HeadChunksPerceptionKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, bias, tokens, options: HeadOptions):
        stats, maxima = forward_statistics(hidden, hidden_masked, weight, bias, tokens, options)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, hidden_masked, weight, bias, tokens, maxima)
        ctx.options = options
        return stats.logprobs, stats.logprobs_masked, stats.entropy, stats.entropy_masked, stats.kl

    @staticmethod
    def backward(ctx, logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad):
        guarded = fused_backward(f"linear_perception_kl ({ctx.options.head.name} backend)")(_perception_kl_gradients)
        return guarded(ctx, logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad)


def linear_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], options: HeadOptions
                    ) -> Tuple[Tensor, Tensor]:
    """Same as ``reference.linear_logprobs``, by chunks of tokens on ``options.head``."""
    return HeadChunksLogprobsFunction.apply(hidden, weight, bias, tokens, options)


def linear_perception_kl(hidden: Tensor, hidden_masked: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor],
                         options: HeadOptions) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same as ``reference.linear_perception_kl``, by chunks of tokens on ``options.head``."""
    return HeadChunksPerceptionKLFunction.apply(hidden, hidden_masked, weight, bias, tokens, options)
