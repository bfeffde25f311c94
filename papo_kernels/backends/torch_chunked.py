"""The torch backend: the fused computation in plain PyTorch, chunked over vocabulary and rows.

On CUDA tensors it runs the chunked design of ``head_chunks.py`` with the torch epilogue: per chunk of tokens the
library product ``[h; h~] W^T`` over the whole vocabulary (over a vocabulary-parallel head, the rank's block of
it), the epilogue's statistics and dZ, and the library products of the gradients (one float32 copy of a half
weight would not fit the CPU's budget; the CUDA products take half inputs as they are), in chunks sized by
``temporary_bytes`` when given, else by the fast path's workspace policy. Elsewhere, what follows.

For machines without Triton (CPUs, macOS). The logits z = (h @ W.T + b) / tau are
built one (rows x vocabulary) block at a time; per row an online softmax keeps the
running max m, s = sum_v exp(z_v - m) and t = sum_v exp(z_v - m) (z_v - m), and for
the masked pass also u = sum_v exp(z_v - m) (z~_v - m~), so that (PAPO_SPEC.md)

    lse = m + log s,   H = log s - t / s,   KL(p || q) = (t - u) / s - log s + log s~.

Keeping t and u relative to the running maxima avoids the cancellation of
``lse - sum_v p_v z_v`` when logits are large. The backward recomputes each block
from the saved logsumexps and forms dz with the gradient table of PAPO_SPEC.md;
autograd never sees a block. All temporaries together stay under
``temporary_bytes`` (256 MiB when None) whatever N and V are; the gradients
themselves are outputs, and for float16/bfloat16 inputs the gradient of the
hidden states is accumulated in a float32 buffer of its size.

Over a vocabulary-parallel head (``ChunkOptions.shard``: weight and bias are this rank's block of
rows, tokens are ids local to it, ``NOT_HERE`` where another rank holds the token) the running
state of the rank's columns becomes partials (``papo_kernels/partials.py``), which the ranks
all-reduce before finalizing; the backward then forms dz on the rank's columns from the statistics
of the whole vocabulary, and gives this rank's part of the hidden gradients.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import partials
from .._guards import fused_backward
from ..vocab_parallel import VocabShard, all_reduce_partials
from . import head_chunks
from .head_chunks import GradientPlan
from .reference import compute_dtype

DEFAULT_TEMPORARY_BYTES = 256 * 2**20

# (rows x vocabulary) blocks per chunk: log p, p and dz of both passes and a transient are
# alive at once at the peak of the backward; the rest is headroom for the allocator, which
# does not return every freed block at once (the peak resident set grew by 110-170 MiB
# at the default budget in tests/test_memory.py; at 16 blocks, by 250 MiB).
_BLOCKS_PER_CHUNK = 24
_VOCAB_BY_DIM_BLOCKS = 3
_ROWS_BY_DIM_BLOCKS = 6
_MAX_VOCAB_PER_CHUNK = 8192


@dataclass(frozen=True)
class ChunkOptions:
    temperature: float
    rows_per_chunk: int
    vocab_per_chunk: int
    shard: Optional[VocabShard] = None  # this rank's block of a vocabulary-parallel head


def chunk_options(n: int, v: int, d: int, dtype: torch.dtype, temperature: float, temporary_bytes: int,
                  shard: Optional[VocabShard] = None) -> ChunkOptions:
    """Chunk sizes whose temporaries fit in ``temporary_bytes``."""
    itemsize = torch.finfo(compute_dtype(dtype)).bits // 8
    vocab = min(v, _MAX_VOCAB_PER_CHUNK)
    # (vocabulary x D) blocks (weight chunk, its gradient, a transient) take at most half the budget
    while vocab > 1 and 2 * _VOCAB_BY_DIM_BLOCKS * vocab * d * itemsize > temporary_bytes:
        vocab //= 2
    room = temporary_bytes - _VOCAB_BY_DIM_BLOCKS * vocab * d * itemsize
    rows = room // ((_BLOCKS_PER_CHUNK * vocab + _ROWS_BY_DIM_BLOCKS * d) * itemsize)
    return ChunkOptions(temperature, rows_per_chunk=max(1, min(n, rows)), vocab_per_chunk=max(1, vocab), shard=shard)


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """z = (h @ W.T + b) / tau for one block, inputs already in the compute dtype."""
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return z.div_(temperature)


def _pick(block: Tensor, tokens: Tensor, start: int) -> Tuple[Tensor, Tensor]:
    """block[i, tokens[i] - start] and whether tokens[i] falls in this vocabulary chunk (no host sync)."""
    in_chunk = (tokens >= start) & (tokens < start + block.shape[1])
    index = (tokens - start).clamp(0, block.shape[1] - 1)
    return block.gather(1, index[:, None]).squeeze(1), in_chunk


class _OnlineSoftmax:
    """Running max m, s = sum exp(z - m), t = sum exp(z - m)(z - m) per row, rescaled on a new max."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.max = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(n, dtype=dtype, device=device)
        self.shifted = torch.zeros(n, dtype=dtype, device=device)

    def absorb(self, rows: slice, z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Takes a block of logits, shifts it in place to z - m_new; returns (exp(z - m_new), alpha, m_old - m_new)."""
        old_max = self.max[rows].clone()
        new_max = torch.maximum(old_max, z.amax(1))
        max_shift = old_max - new_max
        alpha = torch.exp(max_shift)  # 0 while the state is empty (m = -inf)
        shift = _grown(max_shift, self.sum[rows])
        exps = z.sub_(new_max[:, None]).exp()
        # t' = alpha (t + (m - m') s) + sum exp(z - m') (z - m'), s' = alpha s + sum exp(z - m')
        self.shifted[rows] = alpha * (self.shifted[rows] + shift) + torch.linalg.vecdot(exps, z)
        self.sum[rows] = alpha * self.sum[rows] + exps.sum(1)
        self.max[rows] = new_max
        return exps, alpha, max_shift

    def statistics(self) -> Tuple[Tensor, Tensor]:
        """(logsumexp, entropy) = (m + log s, log s - t / s)."""
        log_sum = self.sum.log()
        return self.max + log_sum, log_sum - self.shifted / self.sum


def _grown(shift: Tensor, weight_sum: Tensor) -> Tensor:
    """shift * weight_sum, 0 for rows with nothing absorbed yet (where shift is -inf)."""
    return torch.where(weight_sum > 0, shift, 0.0) * weight_sum


def forward_statistics(hidden, hidden_masked, weight, bias, tokens, options: ChunkOptions):
    """Per-token (logprobs, entropy, lse) of the clean pass, and with ``hidden_masked``
    (logprobs~, entropy~, lse~, kl) of the masked pass as well (None otherwise)."""
    n, dtype, device = hidden.shape[0], compute_dtype(hidden.dtype), hidden.device
    clean = _OnlineSoftmax(n, dtype, device)
    token_logit = torch.zeros(n, dtype=dtype, device=device)
    paired = hidden_masked is not None
    if paired:
        masked = _OnlineSoftmax(n, dtype, device)
        token_logit_masked = torch.zeros(n, dtype=dtype, device=device)
        cross = torch.zeros(n, dtype=dtype, device=device)  # u = sum exp(z - m)(z~ - m~)

    for start in range(0, weight.shape[0], options.vocab_per_chunk):
        vocab = slice(start, start + options.vocab_per_chunk)
        weight_chunk = weight[vocab].to(dtype)
        bias_chunk = None if bias is None else bias[vocab].to(dtype)
        for row_start in range(0, n, options.rows_per_chunk):
            rows = slice(row_start, row_start + options.rows_per_chunk)
            z = _logits(hidden[rows].to(dtype), weight_chunk, bias_chunk, options.temperature)
            picked, in_chunk = _pick(z, tokens[rows], start)
            token_logit[rows] = torch.where(in_chunk, picked, token_logit[rows])
            if paired:
                z_masked = _logits(hidden_masked[rows].to(dtype), weight_chunk, bias_chunk, options.temperature)
                picked, in_chunk = _pick(z_masked, tokens[rows], start)
                token_logit_masked[rows] = torch.where(in_chunk, picked, token_logit_masked[rows])
                sum_before = clean.sum[rows].clone()
            exps, alpha, _ = clean.absorb(rows, z)
            if paired:
                _, _, masked_shift = masked.absorb(rows, z_masked)
                # u' = alpha (u + (m~ - m~') s) + sum exp(z - m') (z~ - m~')
                cross[rows] = alpha * (cross[rows] + _grown(masked_shift, sum_before)) + torch.linalg.vecdot(
                    exps, z_masked
                )

    if options.shard is not None:
        return _sharded_statistics(clean, token_logit, masked if paired else None,
                                   token_logit_masked if paired else None, cross if paired else None, options.shard)
    lse, entropy = clean.statistics()
    logprobs = token_logit - lse  # l = z_y - lse
    if not paired:
        return (logprobs, entropy, lse), None
    lse_masked, entropy_masked = masked.statistics()
    # KL(p || q) = (t - u) / s - log s + log s~
    kl = (clean.shifted - cross) / clean.sum - clean.sum.log() + masked.sum.log()
    return (logprobs, entropy, lse), (token_logit_masked - lse_masked, entropy_masked, lse_masked, kl)


def _sharded_statistics(clean: _OnlineSoftmax, token_logit: Tensor, masked: Optional[_OnlineSoftmax],
                        token_logit_masked: Optional[Tensor], cross: Optional[Tensor], shard: VocabShard):
    """``forward_statistics``' result over a vocabulary-parallel head: this rank's running state as partials (the
    cross sum u turned into w = sum e^(z - m)(z - z~) = t - u + (m - m~) s), all-reduced and finalized."""
    fields = [clean.max, clean.sum, clean.shifted, token_logit]
    if masked is not None:
        fields += [masked.max, masked.sum, masked.shifted, token_logit_masked,
                   clean.shifted - cross + (clean.max - masked.max) * clean.sum]
    statistics = partials.finalize(all_reduce_partials(torch.stack(fields), shard), masked is not None)
    return statistics[:3], (statistics[3:] if masked is not None else None)


def _clean_dz(log_p, p, log_q, tokens, start, logprob_grad, entropy_grad, kl_grad, entropy, kl) -> Tensor:
    """dz = g_l (e_y - p) - g_H p (log p + H) + g_KL p (log p - log q - KL)."""
    dz = torch.zeros_like(p)
    if logprob_grad is not None:
        dz.addcmul_(p, logprob_grad[:, None], value=-1.0)
        _add_at_tokens(dz, tokens, start, logprob_grad)
    if entropy_grad is not None:
        dz.sub_((log_p + entropy[:, None]).mul_(p).mul_(entropy_grad[:, None]))
    if kl_grad is not None:
        dz.add_((log_p - log_q).sub_(kl[:, None]).mul_(p).mul_(kl_grad[:, None]))
    return dz


def _masked_dz(log_q, q, p, tokens, start, logprob_grad, entropy_grad, kl_grad, entropy) -> Tensor:
    """dz~ = g_l~ (e_y - q) - g_H~ q (log q + H~) + g_KL (q - p)."""
    dz = torch.zeros_like(q)
    if logprob_grad is not None:
        dz.addcmul_(q, logprob_grad[:, None], value=-1.0)
        _add_at_tokens(dz, tokens, start, logprob_grad)
    if entropy_grad is not None:
        dz.sub_((log_q + entropy[:, None]).mul_(q).mul_(entropy_grad[:, None]))
    if kl_grad is not None:
        dz.add_((q - p).mul_(kl_grad[:, None]))
    return dz


def _add_at_tokens(dz: Tensor, tokens: Tensor, start: int, values: Tensor) -> None:
    """dz[i, tokens[i] - start] += values[i] where the token is in this vocabulary chunk."""
    in_chunk = (tokens >= start) & (tokens < start + dz.shape[1])
    index = (tokens - start).clamp(0, dz.shape[1] - 1)
    dz.scatter_add_(1, index[:, None], torch.where(in_chunk, values.to(dz.dtype), 0.0)[:, None])


def backward_gradients(saved, grads, needs_input_grad, options: ChunkOptions):
    """Gradients for (hidden, hidden_masked, weight, bias); None where not wanted or identically zero.

    saved: (hidden, hidden_masked, weight, bias, tokens, lse, lse~, entropy, entropy~, kl), the masked ones
    None for one pass; grads: (g_l, g_l~, g_H, g_H~, g_KL), None where absent; needs_input_grad: four
    flags for (hidden, hidden_masked, weight, bias).
    """
    hidden, hidden_masked, weight, bias, tokens, lse, lse_masked, entropy, entropy_masked, kl = saved
    needs_hidden, needs_hidden_masked, needs_weight, needs_bias = needs_input_grad
    plan = GradientPlan.make(grads, needs_hidden, needs_hidden_masked, needs_weight or needs_bias)
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)

    def accumulator(needed: bool, like: Tensor) -> Optional[Tensor]:
        return torch.zeros(like.shape, dtype=dtype, device=like.device) if needed else None

    any_dz = plan.clean_dz or plan.masked_dz
    grad_hidden = accumulator(needs_hidden and plan.clean_dz, hidden)
    grad_hidden_masked = accumulator(needs_hidden_masked and plan.masked_dz, hidden)
    grad_weight = torch.empty_like(weight) if needs_weight and any_dz else None
    grad_bias = torch.empty_like(bias) if needs_bias and any_dz else None
    if any_dz:
        for start in range(0, weight.shape[0], options.vocab_per_chunk):
            vocab = slice(start, start + options.vocab_per_chunk)
            weight_chunk = weight[vocab].to(dtype)
            bias_chunk = None if bias is None else bias[vocab].to(dtype)
            grad_weight_chunk = accumulator(needs_weight, weight_chunk)
            grad_bias_chunk = accumulator(needs_bias, weight_chunk[:, 0])
            for row_start in range(0, n, options.rows_per_chunk):
                rows = slice(row_start, row_start + options.rows_per_chunk)
                hidden_rows = hidden[rows].to(dtype) if plan.clean_logits else None
                hidden_masked_rows = hidden_masked[rows].to(dtype) if plan.masked_logits else None
                log_p = p = log_q = q = None
                if plan.clean_logits:  # log p = z - lse
                    log_p = _logits(hidden_rows, weight_chunk, bias_chunk, options.temperature).sub_(lse[rows, None])
                    p = log_p.exp()
                if plan.masked_logits:
                    log_q = _logits(hidden_masked_rows, weight_chunk, bias_chunk, options.temperature)
                    log_q.sub_(lse_masked[rows, None])
                    q = log_q.exp()
                g_l, g_l_masked, g_h, g_h_masked, g_kl = (None if g is None else g[rows] for g in grads)
                passes = []
                if plan.clean_dz:
                    dz = _clean_dz(log_p, p, log_q, tokens[rows], start, g_l, g_h, g_kl, entropy[rows],
                                   None if kl is None else kl[rows])
                    passes.append((dz.div_(options.temperature), hidden_rows, grad_hidden))
                if plan.masked_dz:
                    dz = _masked_dz(log_q, q, p, tokens[rows], start, g_l_masked, g_h_masked, g_kl,
                                    entropy_masked[rows])
                    passes.append((dz.div_(options.temperature), hidden_masked_rows, grad_hidden_masked))
                # dh = dz W / tau, dW += dz^T h / tau, db += sum_rows dz / tau (dz already divided by tau)
                # (addmm with out= rather than addmm_, which torch's FLOP counter does not see)
                for dz, pass_hidden, pass_grad_hidden in passes:
                    if pass_grad_hidden is not None:
                        torch.addmm(pass_grad_hidden[rows], dz, weight_chunk, out=pass_grad_hidden[rows])
                    if grad_weight_chunk is not None:
                        torch.addmm(grad_weight_chunk, dz.T, pass_hidden, out=grad_weight_chunk)
                    if grad_bias_chunk is not None:
                        grad_bias_chunk.add_(dz.sum(0))
            if grad_weight is not None:
                grad_weight[vocab] = grad_weight_chunk
            if grad_bias is not None:
                grad_bias[vocab] = grad_bias_chunk

    def in_input_dtype(grad: Optional[Tensor]) -> Optional[Tensor]:
        return None if grad is None else grad.to(hidden.dtype)

    return in_input_dtype(grad_hidden), in_input_dtype(grad_hidden_masked), grad_weight, grad_bias


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, options: ChunkOptions):
        (logprobs, entropy, lse), _ = forward_statistics(hidden, None, weight, bias, tokens, options)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.options = options
        return logprobs, entropy

    @staticmethod
    @fused_backward("linear_logprobs (torch backend)")
    def backward(ctx, logprob_grad, entropy_grad):
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        saved = (hidden, None, weight, bias, tokens, lse, None, entropy, None, None)
        grads = (logprob_grad, None, entropy_grad, None, None)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs = (needs_hidden, False, needs_weight, needs_bias)
        grad_hidden, _, grad_weight, grad_bias = backward_gradients(saved, grads, needs, ctx.options)
        return grad_hidden, grad_weight, grad_bias, None, None


class ChunkedLinearPerceptionKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, bias, tokens, options: ChunkOptions):
        clean, masked = forward_statistics(hidden, hidden_masked, weight, bias, tokens, options)
        (logprobs, entropy, lse), (logprobs_masked, entropy_masked, lse_masked, kl) = clean, masked
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, hidden_masked, weight, bias, tokens, lse, lse_masked, entropy, entropy_masked, kl)
        ctx.options = options
        return logprobs, logprobs_masked, entropy, entropy_masked, kl

    @staticmethod
    @fused_backward("linear_perception_kl (torch backend)")
    def backward(ctx, logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad):
        grads = (logprob_grad, logprob_masked_grad, entropy_grad, entropy_masked_grad, kl_grad)
        return *backward_gradients(ctx.saved_tensors, grads, ctx.needs_input_grad[:4], ctx.options), None, None


def linear_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
    shard: Optional[VocabShard] = None, *, temporary_bytes: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Same as ``reference.linear_logprobs``, chunked so that temporaries stay under ``temporary_bytes`` (None: the
    workspace policy on CUDA, 256 MiB elsewhere)."""
    if hidden.device.type == "cuda":
        options = head_chunks.head_options(head_chunks.TORCH_HEAD, temperature, temporary_bytes)
        return head_chunks.linear_logprobs(hidden, weight, tokens, bias, options, shard)
    options = chunk_options(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.dtype, temperature,
                            DEFAULT_TEMPORARY_BYTES if temporary_bytes is None else temporary_bytes, shard)
    return ChunkedLinearLogprobsFunction.apply(hidden, weight, bias, tokens, options)


def linear_perception_kl(
    hidden: Tensor, hidden_masked: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
    shard: Optional[VocabShard] = None, *, temporary_bytes: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same as ``reference.linear_perception_kl``, chunked so that temporaries stay under ``temporary_bytes`` (None:
    the workspace policy on CUDA, 256 MiB elsewhere)."""
    if hidden.device.type == "cuda":
        options = head_chunks.head_options(head_chunks.TORCH_HEAD, temperature, temporary_bytes)
        return head_chunks.linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, options, shard)
    options = chunk_options(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.dtype, temperature,
                            DEFAULT_TEMPORARY_BYTES if temporary_bytes is None else temporary_bytes, shard)
    return ChunkedLinearPerceptionKLFunction.apply(hidden, hidden_masked, weight, bias, tokens, options)
