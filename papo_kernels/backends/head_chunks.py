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
   float32 accumulator: ``addmm``, or the reduce-add kernel under ``PAPO_KERNELS_GRAD_WEIGHT=reduce_add`` as on the
   fast path, ``fast_path/grad_weight.py``), ``db += sum_rows dZ``. No atomics: every row's gradient is written
   once, and the weight's gradient accumulates chunk after chunk.

The fast path's pieces, shared rather than copied: the options (``FastPathOptions``: the temperature, the workspace,
the dZ dtype), the workspace rule (``fast_path/workspace.py``: the budget given, else its policy: on CUDA
min(4 GiB, 10% of free memory), or with the reduce-add kernel 1024 tokens a chunk within min(1 GiB, 10%), and
256 MiB on the CPU; the forward, which has no dW product, sizes its chunks by the ``addmm`` rule), the chunk sizing
(``chunk_loop.tokens_per_chunk``), the products, and dZ in half precision (``fast_path/half_dz.py``: a half dZ
buffer on CUDA, a float16 dZ made from upstream gradients scaled per chunk by a power of two that the products'
alpha undoes). The public per-token ops take no budget and run at the policy (``papo_loss``'s ``workspace_bytes``
is the fast path's); ``head_options``' ``workspace_bytes`` (the torch backend's ``temporary_bytes`` on CUDA; tests)
overrides it.

Over a vocabulary-parallel head (``shard``: this rank's ``vocab_parallel.VocabShard``; weight and bias are its
block of rows, tokens ids local to it, ``partials.NOT_HERE`` where another rank holds the token) each chunk's
statistics are those of the whole vocabulary: the head's partials over the rank's columns, all-reduced over the
group (``vocab_parallel.all_reduce_partials``: the maxima, then the rescaled sums, O(C) floats) and finalized
(``partials.finalize``), the same on every rank. The backward forms dZ on the rank's columns from them: the weight
and bias gradients are the rank's block's, complete; the hidden gradients are this rank's part, dZ W over its
columns, which the ops sum over the group in backward (``vocab_parallel.hidden_inputs``). The ranks agree on the
chunk size (``vocab_parallel.agreed_chunk``), so that every rank runs the same collectives.

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
from ..fast_path import chunk_loop
from ..fast_path.chunk_loop import FastPathOptions, MatrixProducts, bytes_per_token, tokens_per_chunk
from ..fast_path.epilogues import torch_epilogue
from ..fast_path.epilogues.contract import RowStatistics, UpstreamGradients
from ..fast_path.grad_weight import resolve_grad_weight_kernel
from ..fast_path.half_dz import chunk_scale, dz_dtype, scaled
from ..fast_path.workspace import resolve_workspace_bytes
from ..vocab_parallel import VocabShard, agreed_chunk
from .reference import compute_dtype


class HeadStatistics(NamedTuple):
    """The per-token statistics of a chunk and, where the head keeps them, the row maxima m of z (passes, C)."""

    stats: RowStatistics
    maxima: Optional[Tensor]


# statistics(weight, products, hidden_rows, hidden_masked_rows or None, tokens, bias, temperature, logits or None,
#            shift or None, shard or None) -> HeadStatistics
ChunkStatistics = Callable[..., HeadStatistics]


@dataclass(frozen=True)
class ChunkedHead:
    """A backend's pieces for the chunk loops.

    - ``name``: the backend's name, for messages.
    - ``statistics``: a chunk's statistics; with a ``logits`` buffer it also leaves the chunk's logits there in the
      state its epilogue's ``logit_gradient`` reads. With ``shift`` (the maxima a forward returned for these rows)
      the head computes on z - m. With ``shard`` (a ``VocabShard``) the statistics are the whole vocabulary's,
      from the partials of the rank's columns all-reduced over the group; the maxima too.
    - ``epilogue``: the fast-path epilogue whose ``logit_gradient`` gives dZ.
    - ``forward_bytes_per_token(V, D, paired, dtype)``: the forward's workspace per token.
    - ``forward_needs_logits``: whether the forward's statistics need a logits buffer.
    - ``scaled_logits``: whether the logits left are z (bias and 1 / tau applied), so that ``logit_gradient``
      takes no bias, a temperature of 1 and upstream gradients divided by tau; else the raw rows W^T.
    """

    name: str  # the backend's, for messages
    statistics: ChunkStatistics
    epilogue: ModuleType
    forward_bytes_per_token: Callable[[int, int, bool, torch.dtype], int]
    forward_needs_logits: bool
    scaled_logits: bool


def _torch_statistics(weight, products: MatrixProducts, hidden_rows, hidden_masked_rows, tokens, bias, temperature,
                      logits, shift, shard) -> HeadStatistics:
    """The library product into ``logits``, then the torch epilogue's statistics, over a vocabulary-parallel head its
    partials all-reduced and finalized (``chunk_loop.statistics``, as on the fast path). Either leaves z in
    ``logits``, which ``logit_gradient`` turns into log p = z - lse: no shift needed, its entropy comes from the same
    rounded log p."""
    paired = hidden_masked_rows is not None
    rows = torch.cat([hidden_rows, hidden_masked_rows]) if paired else hidden_rows
    products.logits(rows, out=logits)
    return HeadStatistics(chunk_loop.statistics(torch_epilogue, logits, tokens, bias, temperature, paired, shard),
                          None)


def _torch_forward_bytes_per_token(vocab_size: int, dim: int, paired: bool, dtype: torch.dtype) -> int:
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    return bytes_per_token(vocab_size, dim, paired, itemsize, False,
                           torch_epilogue.workspace_bytes_per_token(vocab_size, paired, itemsize))


TORCH_HEAD = ChunkedHead("torch", _torch_statistics, torch_epilogue, _torch_forward_bytes_per_token,
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
    chunking: FastPathOptions  # the temperature, the workspace (None: the policy) and the dZ dtype


def head_options(head: ChunkedHead, temperature: float, workspace_bytes: Optional[int] = None) -> HeadOptions:
    """The per-token ops' options on ``head``: the fast path's chunking options (``FastPathOptions``, so that its
    ``dz_dtype`` switch reaches this loop too)."""
    return HeadOptions(head, FastPathOptions(float(temperature), workspace_bytes))


def _chunk_size(n: int, per_token: int, budget: int, shard: Optional[VocabShard], device: torch.device) -> int:
    """Tokens per chunk; over a vocabulary-parallel head the smallest of the ranks' (their blocks differ in size)."""
    chunk = tokens_per_chunk(n, per_token, budget)
    return chunk if shard is None else agreed_chunk(chunk, shard, device)


def forward_statistics(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       tokens: Tensor, options: HeadOptions, shard: Optional[VocabShard] = None) -> HeadStatistics:
    """The per-token statistics of all N tokens, a chunk at a time, and the head's row maxima (passes, N); over a
    vocabulary-parallel head (``shard``) the whole vocabulary's."""
    n, dim = hidden.shape
    paired = hidden_masked is not None
    head = options.head
    per_token = head.forward_bytes_per_token(weight.shape[0], dim, paired, hidden.dtype)
    budget = resolve_workspace_bytes(options.chunking.workspace_bytes, hidden.device, "addmm", per_token)
    chunk = _chunk_size(n, per_token, budget, shard, hidden.device)
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
            bias, options.chunking.temperature, None if logits is None else logits[:(2 if paired else 1) * count],
            None, shard))
    if not parts:
        empty = hidden.new_empty(0, dtype=compute_dtype(hidden.dtype))
        return HeadStatistics(RowStatistics(*[empty] * (7 if paired else 3)), None)
    stats = RowStatistics(*(None if fields[0] is None else torch.cat(fields)
                            for fields in zip(*(part.stats for part in parts))))
    maxima = None if parts[0].maxima is None else torch.cat([part.maxima for part in parts], dim=1)
    return HeadStatistics(stats, maxima)


def backward_gradients(saved, grads, needs_input_grad, options: HeadOptions, shard: Optional[VocabShard] = None):
    """Gradients for (hidden, hidden_masked, weight, bias); None where not wanted or identically zero. Over a
    vocabulary-parallel head (``shard``): the block's weight and bias gradients, this rank's part of the hidden ones.

    saved: (hidden, hidden_masked, weight, bias, tokens, maxima), hidden_masked None for one pass, maxima the
    forward's (passes, N) row maxima or None; grads: (g_l, g_l~, g_H, g_H~, g_KL), None where absent;
    needs_input_grad: four flags for (hidden, hidden_masked, weight, bias).
    """
    hidden, hidden_masked, weight, bias, tokens, maxima = saved
    needs_hidden, needs_hidden_masked, needs_weight, needs_bias = needs_input_grad
    plan = GradientPlan.make(grads, needs_hidden, needs_hidden_masked, needs_weight or needs_bias)
    if not (plan.clean_dz or plan.masked_dz):
        return None, None, None, None
    # Absent upstream gradients of the log-probs and entropies go in as zeros: the epilogue then runs in one of three
    # variants (one pass, a pair, a pair with the KL) instead of one per subset of gradients, at a few more
    # operations per logit in a sweep that memory bounds. A zero-weighted term adds exact zeros where its pass is
    # finite, and a pass's dZ reads only its own pass. The KL's gradient, which couples the passes, stays None when
    # absent: a NaN in one pass (given for its metrics alone) must not reach the other pass's dZ through 0 x NaN.
    present = next(g for g in grads if g is not None)
    logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad = (
        torch.zeros_like(present) if g is None else g for g in grads[:4])
    kl_grad = grads[4]
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
    device = hidden.device
    temperature = options.chunking.temperature
    grad_weight_kernel = resolve_grad_weight_kernel(device, weight.dtype, vocab_size, dim) if needs_weight \
        else "addmm"
    products = MatrixProducts(weight, grad_weight_kernel)
    result_dtype = products.result_dtype
    itemsize = torch.finfo(result_dtype).bits // 8
    dz_buffer_dtype = dz_dtype(options.chunking.dz_dtype, products.native_half, products.input_dtype)
    epilogue = options.head.epilogue
    per_token = bytes_per_token(vocab_size, dim, passes == 2, itemsize, dz_buffer_dtype is not None,
                                epilogue.workspace_bytes_per_token(vocab_size, passes == 2, itemsize))
    chunk = _chunk_size(n, per_token, resolve_workspace_bytes(options.chunking.workspace_bytes, device,
                                                              grad_weight_kernel, per_token), shard, device)
    logits_buffer = torch.empty(passes * chunk, vocab_size, dtype=result_dtype, device=device)
    dz_buffer = None if dz_buffer_dtype is None else torch.empty(passes * chunk, vocab_size, dtype=dz_buffer_dtype,
                                                                 device=device)
    grad_rows_buffer = torch.empty(passes * chunk, dim, dtype=hidden.dtype, device=device)
    grad_sources = tuple(torch.zeros_like(source) if dz and rows else None
                         for source, dz, rows in zip(sources, wants_dz, wants_rows))
    # the first chunk writes the weight's accumulator, the later ones add to it
    grad_weight = torch.empty(weight.shape, dtype=result_dtype, device=device) if needs_weight else None
    grad_weight_written = False
    grad_bias = torch.zeros(vocab_size, dtype=result_dtype, device=device) if needs_bias else None

    shifts = None if maxima is None else maxima[list(pass_inputs)]
    if options.head.scaled_logits:  # the logits are z: dZ with respect to them, times 1 / tau
        slots = tuple(None if g is None else g / temperature for g in slots)
        gradient_bias, gradient_temperature = None, 1.0
    else:
        gradient_bias, gradient_temperature = bias, temperature

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
            temperature, logits, None if shifts is None else shifts[:, rows].contiguous(), shard).stats
        upstream = UpstreamGradients(*(None if g is None else g[rows] for g in slots))
        # dz is linear in the upstream gradients: a float16 dz is made from scaled ones, the products unscale
        dz = logits if dz_buffer is None else dz_buffer[:passes * count]
        scale = chunk_scale(upstream, dz.dtype)
        epilogue.logit_gradient(logits, tokens[rows], gradient_bias, gradient_temperature, stats,
                                scaled(upstream, scale), dz)
        if row_passes:
            first, last = row_passes[0] * count, (row_passes[-1] + 1) * count
            grad_rows = grad_rows_buffer[:last - first]
            products.grad_rows(dz[first:last], out=grad_rows, alpha=1.0 / scale)
            for i in row_passes:
                grad_sources[i][rows] = grad_rows[(i - row_passes[0]) * count:(i - row_passes[0] + 1) * count]
        first, last = dz_passes[0] * count, (dz_passes[-1] + 1) * count
        if grad_weight is not None:
            products.accumulate_grad_weight(grad_weight, dz[first:last], chunk_rows[first:last], alpha=1.0 / scale,
                                            accumulate=grad_weight_written)
            grad_weight_written = True
        if grad_bias is not None:
            grad_bias.add_(dz[first:last].sum(0, dtype=result_dtype), alpha=1.0 / scale)

    grad_inputs = [None, None]  # (hidden, hidden_masked)
    for i, grad in zip(pass_inputs, grad_sources):
        grad_inputs[i] = grad
    grad_hidden, grad_hidden_masked = grad_inputs
    if grad_weight is not None and not grad_weight_written:  # no tokens
        grad_weight.zero_()
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
        (needs_hidden, False, needs_weight, needs_bias), ctx.options, ctx.shard)
    return grad_hidden, grad_weight, grad_bias, None, None, None


def _perception_kl_gradients(ctx, *grads):
    return (*backward_gradients(ctx.saved_tensors, grads, ctx.needs_input_grad[:4], ctx.options, ctx.shard), None,
            None, None)


class HeadChunksLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, options: HeadOptions, shard: Optional[VocabShard]):
        stats, maxima = forward_statistics(hidden, None, weight, bias, tokens, options, shard)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, maxima)
        ctx.options, ctx.shard = options, shard
        return stats.logprobs, stats.entropy

    @staticmethod
    def backward(ctx, logprob_grad, entropy_grad):
        guarded = fused_backward(f"linear_logprobs ({ctx.options.head.name} backend)")(_logprobs_gradients)
        return guarded(ctx, logprob_grad, entropy_grad)


class HeadChunksPerceptionKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, bias, tokens, options: HeadOptions, shard: Optional[VocabShard]):
        stats, maxima = forward_statistics(hidden, hidden_masked, weight, bias, tokens, options, shard)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, hidden_masked, weight, bias, tokens, maxima)
        ctx.options, ctx.shard = options, shard
        return stats.logprobs, stats.logprobs_masked, stats.entropy, stats.entropy_masked, stats.kl

    @staticmethod
    def backward(ctx, logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad):
        guarded = fused_backward(f"linear_perception_kl ({ctx.options.head.name} backend)")(_perception_kl_gradients)
        return guarded(ctx, logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad)


def linear_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], options: HeadOptions,
                    shard: Optional[VocabShard] = None) -> Tuple[Tensor, Tensor]:
    """Same as ``reference.linear_logprobs`` (``shard`` too), by chunks of tokens on ``options.head``."""
    return HeadChunksLogprobsFunction.apply(hidden, weight, bias, tokens, options, shard)


def linear_perception_kl(hidden: Tensor, hidden_masked: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor],
                         options: HeadOptions, shard: Optional[VocabShard] = None
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same as ``reference.linear_perception_kl`` (``shard`` too), by chunks of tokens on ``options.head``."""
    return HeadChunksPerceptionKLFunction.apply(hidden, hidden_masked, weight, bias, tokens, options, shard)
