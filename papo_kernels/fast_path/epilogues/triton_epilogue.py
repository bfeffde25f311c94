"""The Triton epilogue of the fast path: the per-row work on CUDA, over a tokens x vocabulary-splits grid.

Statistics, in two steps that stay separate so that a vocabulary split across devices (issue 27)
can all-reduce the partials between them:

1. ``statistics_partials``: ``_statistics_partials_kernel``, one program per (block of rows,
   vocabulary split), sweeps its split of the clean and the masked rows side by side with the
   online statistics of the fused backend (``absorb_pair``) and writes the split's partial state
   per token: m, s = sum exp(z - m), t = sum exp(z - m)(z - m) and the token's logit of each
   pass, and the cross sum u = sum exp(z - m)(z~ - m~) (``PARTIAL_FIELDS``);
2. ``finalize_statistics``: ``_finalize_statistics_kernel``, one program per block of rows, merges
   the splits' partials (``merge_pair``) and writes lse, l, H, l~, H~, KL per token.

``statistics`` runs both. The logits are read once, never written. ``row_partials`` (the contract's
step for a vocabulary-parallel head) runs the first and merges the splits in torch
(``partials.merge``), so that the ranks' all-reduce is the last level of the reduction.

``_epilogue_gradient_kernel``: one program per (block of rows, vocabulary split) writes dz / tau
and dz~ / tau (``clean_logit_gradient``, ``masked_logit_gradient``: the gradient table of
PAPO_SPEC.md) over the logits or into a half-precision buffer.

Splitting the vocabulary gives the grid many more programs than the chunk has tokens, so the
last wave of programs is short: the sweeps run at the copy bandwidth rather than at the pace
of one program per token sweeping all of V.

The per-pass jit helpers are the fused backend's (``backends/_triton_utils.py``): the math
exists once in Triton; ``merge_pass`` and ``merge_pair`` (merging two partial states) are this
module's own.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backends._triton_utils import KernelConfigs, absorb_pair, clean_logit_gradient, grown, initial_pair_state
from ...backends._triton_utils import launch_config, masked_logit_gradient, row_column, store_statistics
from ... import partials
from .contract import RowStatistics, UpstreamGradients

NAME = "triton"
# The partial state of one vocabulary split per token, in this order along the first axis of the
# partials tensor (fields, splits, tokens); the last five only when paired.
PARTIAL_FIELDS = ("running_max", "exp_sum", "shifted_sum", "token_logit",
                  "running_max_masked", "exp_sum_masked", "shifted_sum_masked", "token_logit_masked", "cross_sum")
SINGLE_PASS_FIELDS = 4


@dataclass(frozen=True)
class EpilogueConfig:
    block_n: int  # rows per program of the two sweeps
    block_v: int  # vocabulary tile
    split_v: int  # vocabulary columns per split (a multiple of block_v)
    num_warps: int
    finalize_block_n: int  # rows per program of the finalize kernel
    finalize_num_warps: int


# One row per program keeps the two (1 x BLOCK_V) tiles of each pass in registers; 8192 columns a
# split give 19 splits at V = 152064, so a chunk of 1024 tokens launches about 19 500 programs
# (148 per SM on an H200) and the last wave is short. Not yet measured on hardware.
CUDA_CONFIG = EpilogueConfig(block_n=1, block_v=2048, split_v=8192, num_warps=8, finalize_block_n=128,
                             finalize_num_warps=4)
# The interpreter runs programs one by one: small tiles, and splits of two tiles so that test
# vocabularies have several splits and a tail.
INTERPRETER_CONFIG = EpilogueConfig(block_n=4, block_v=32, split_v=64, num_warps=1, finalize_block_n=8,
                                    finalize_num_warps=1)
# The sweeps are memory-bound: one config for every CUDA device class.
CONFIGS = KernelConfigs({}, fallback=CUDA_CONFIG, interpreter=INTERPRETER_CONFIG)


def workspace_bytes_per_token(vocab_size: int, paired: bool, itemsize: int) -> int:
    return 0


@triton.jit
def _load_logits(logits_ptr, bias_ptr, rows, cols, row_ok, col_ok, stride, temperature, HAS_BIAS: tl.constexpr):
    """z = (logits + b) / tau for a (BLOCK_N, BLOCK_V) tile, float32."""
    z = tl.load(logits_ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return z / temperature


@triton.jit
def merge_pass(running_max, exp_sum, shifted_sum, other_max, other_exp_sum, other_shifted_sum):
    """Two partial (m, s, t) states of one pass, over disjoint columns, as one: m' = max(m, m2),
    s' = a s + b s2, t' = a (t + (m - m') s) + b (t2 + (m2 - m') s2), with a = exp(m - m'), b = exp(m2 - m').
    Returns (m', s', t', a, b, m - m', m2 - m')."""
    new_max = tl.maximum(running_max, other_max)
    shift, other_shift = running_max - new_max, other_max - new_max
    scale, other_scale = tl.exp(shift), tl.exp(other_shift)
    new_exp_sum = scale * exp_sum + other_scale * other_exp_sum
    new_shifted_sum = scale * grown(shifted_sum, shift, exp_sum) + other_scale * grown(other_shifted_sum, other_shift,
                                                                                     other_exp_sum)
    return new_max, new_exp_sum, new_shifted_sum, scale, other_scale, shift, other_shift


@triton.jit
def merge_pair(
    # the running state: per pass m, s, t, token logit, then u
    running_max, exp_sum, shifted_sum, token_logit,
    running_max_masked, exp_sum_masked, shifted_sum_masked, token_logit_masked, cross_sum,
    # one split's partial state, the same fields
    other_max, other_exp_sum, other_shifted_sum, other_token_logit,
    other_max_masked, other_exp_sum_masked, other_shifted_sum_masked, other_token_logit_masked, other_cross_sum,
    PAIRED: tl.constexpr,
):
    """The running state merged with a split's partial state (the token logit of a pass lies in one split, the
    others give 0). u = sum exp(z - m)(z~ - m~) carries the clean pass's weights and the masked pass's shift:
    u' = a (u + (m~ - m~') s) + b (u2 + (m~2 - m~') s2)."""
    exp_sum_before, other_exp_sum_before = exp_sum, other_exp_sum
    running_max, exp_sum, shifted_sum, scale, other_scale, _, _ = merge_pass(
        running_max, exp_sum, shifted_sum, other_max, other_exp_sum, other_shifted_sum)
    token_logit += other_token_logit
    if PAIRED:
        running_max_masked, exp_sum_masked, shifted_sum_masked, _, _, shift_masked, other_shift_masked = merge_pass(
            running_max_masked, exp_sum_masked, shifted_sum_masked, other_max_masked, other_exp_sum_masked,
            other_shifted_sum_masked)
        token_logit_masked += other_token_logit_masked
        cross_sum = (scale * grown(cross_sum, shift_masked, exp_sum_before)
                     + other_scale * grown(other_cross_sum, other_shift_masked, other_exp_sum_before))
    return (running_max, exp_sum, shifted_sum, token_logit,
            running_max_masked, exp_sum_masked, shifted_sum_masked, token_logit_masked, cross_sum)


@triton.jit
def _statistics_partials_kernel(
    # pointers: logits chunk (clean rows, then masked rows), bias, tokens, the (fields, splits, tokens) partials
    logits_ptr, bias_ptr, tokens_ptr, partials_ptr,
    # sizes
    n_tokens, vocab_size,
    # strides: a logits row, a field of the partials, a split of a field
    stride_logits, stride_field, stride_split,
    # runtime scalars
    temperature,
    # constexpr flags
    HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_tokens
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
     shifted_sum_masked, cross_sum) = initial_pair_state(BLOCK_N)
    for v_start in range(0, SPLIT_V, BLOCK_V):
        cols = split * SPLIT_V + v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < vocab_size
        z = _load_logits(logits_ptr, bias_ptr, rows, cols, row_ok, col_ok, stride_logits, temperature, HAS_BIAS)
        z_masked = z
        if PAIRED:
            z_masked = _load_logits(logits_ptr, bias_ptr, rows + n_tokens, cols, row_ok, col_ok, stride_logits,
                                    temperature, HAS_BIAS)
        (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
         shifted_sum_masked, cross_sum) = absorb_pair(
            token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
            shifted_sum_masked, cross_sum, z, z_masked, cols[None, :] == tokens[:, None], col_ok, PAIRED)
    out = partials_ptr + split * stride_split + rows
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + stride_field, exp_sum, mask=row_ok)
    tl.store(out + 2 * stride_field, shifted_sum, mask=row_ok)
    tl.store(out + 3 * stride_field, token_logit, mask=row_ok)
    if PAIRED:
        tl.store(out + 4 * stride_field, running_max_masked, mask=row_ok)
        tl.store(out + 5 * stride_field, exp_sum_masked, mask=row_ok)
        tl.store(out + 6 * stride_field, shifted_sum_masked, mask=row_ok)
        tl.store(out + 7 * stride_field, token_logit_masked, mask=row_ok)
        tl.store(out + 8 * stride_field, cross_sum, mask=row_ok)


@triton.jit
def _partial_field(partials_ptr, split, field, rows, row_ok, stride_field, stride_split):
    # rows out of range read 1 in every field (a finite state with s > 0): no log(0) or 0 / 0 in lanes never stored
    return tl.load(partials_ptr + field * stride_field + split * stride_split + rows, mask=row_ok, other=1.0)


@triton.jit
def _finalize_statistics_kernel(
    # pointers: the (fields, splits, tokens) partials, then (C,) float32 outputs
    partials_ptr, logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr,
    kl_ptr,
    # sizes
    n_tokens, n_splits,
    # strides
    stride_field, stride_split,
    # constexpr flags
    PAIRED: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
     shifted_sum_masked, cross_sum) = initial_pair_state(BLOCK_N)
    for split in range(0, n_splits):
        # one pass: the masked fields are never read (merge_pair's PAIRED branch is compiled out)
        other_max_masked, other_exp_sum_masked, other_shifted_sum_masked, other_token_logit_masked, \
            other_cross_sum = exp_sum_masked, exp_sum_masked, exp_sum_masked, exp_sum_masked, exp_sum_masked
        if PAIRED:
            other_max_masked = _partial_field(partials_ptr, split, 4, rows, row_ok, stride_field, stride_split)
            other_exp_sum_masked = _partial_field(partials_ptr, split, 5, rows, row_ok, stride_field, stride_split)
            other_shifted_sum_masked = _partial_field(partials_ptr, split, 6, rows, row_ok, stride_field,
                                                      stride_split)
            other_token_logit_masked = _partial_field(partials_ptr, split, 7, rows, row_ok, stride_field,
                                                      stride_split)
            other_cross_sum = _partial_field(partials_ptr, split, 8, rows, row_ok, stride_field, stride_split)
        (running_max, exp_sum, shifted_sum, token_logit, running_max_masked, exp_sum_masked, shifted_sum_masked,
         token_logit_masked, cross_sum) = merge_pair(
            running_max, exp_sum, shifted_sum, token_logit,
            running_max_masked, exp_sum_masked, shifted_sum_masked, token_logit_masked, cross_sum,
            _partial_field(partials_ptr, split, 0, rows, row_ok, stride_field, stride_split),
            _partial_field(partials_ptr, split, 1, rows, row_ok, stride_field, stride_split),
            _partial_field(partials_ptr, split, 2, rows, row_ok, stride_field, stride_split),
            _partial_field(partials_ptr, split, 3, rows, row_ok, stride_field, stride_split),
            other_max_masked, other_exp_sum_masked, other_shifted_sum_masked, other_token_logit_masked,
            other_cross_sum, PAIRED)
    store_statistics(logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr,
                     kl_ptr, rows, row_ok, token_logit, running_max, exp_sum, shifted_sum, token_logit_masked,
                     running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum, PAIRED)


@triton.jit
def _epilogue_gradient_kernel(
    # pointers: logits chunk, bias, tokens, (C,) statistics and upstream gradients, the (R, V) output
    logits_ptr, bias_ptr, tokens_ptr,
    lse_ptr, entropy_ptr, lse_masked_ptr, entropy_masked_ptr, kl_ptr,
    logprobs_grad_ptr, entropy_grad_ptr, logprobs_masked_grad_ptr, entropy_masked_grad_ptr, kl_grad_ptr,
    out_ptr,
    # sizes
    n_tokens, vocab_size,
    # strides
    stride_logits, stride_out,
    # runtime scalars
    temperature,
    # constexpr flags: bias, upstream gradients present, which passes get dz and whose logits are read
    HAS_BIAS: tl.constexpr,
    LOGPROBS_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr, LOGPROBS_MASKED_GRAD: tl.constexpr,
    ENTROPY_MASKED_GRAD: tl.constexpr, KL_GRAD: tl.constexpr, CLEAN_DZ: tl.constexpr, MASKED_DZ: tl.constexpr,
    CLEAN_LOGITS: tl.constexpr, MASKED_LOGITS: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < n_tokens
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    lse = row_column(lse_ptr, rows, row_ok, CLEAN_LOGITS)
    lse_masked = row_column(lse_masked_ptr, rows, row_ok, MASKED_LOGITS)
    logprobs_grad = row_column(logprobs_grad_ptr, rows, row_ok, LOGPROBS_GRAD)
    entropy_grad = row_column(entropy_grad_ptr, rows, row_ok, ENTROPY_GRAD)
    entropy = row_column(entropy_ptr, rows, row_ok, ENTROPY_GRAD)
    logprobs_masked_grad = row_column(logprobs_masked_grad_ptr, rows, row_ok, LOGPROBS_MASKED_GRAD)
    entropy_masked_grad = row_column(entropy_masked_grad_ptr, rows, row_ok, ENTROPY_MASKED_GRAD)
    entropy_masked = row_column(entropy_masked_ptr, rows, row_ok, ENTROPY_MASKED_GRAD)
    kl_grad = row_column(kl_grad_ptr, rows, row_ok, KL_GRAD)
    kl = row_column(kl_ptr, rows, row_ok, KL_GRAD)

    for v_start in range(0, SPLIT_V, BLOCK_V):
        cols = split * SPLIT_V + v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < vocab_size
        tile_ok = row_ok[:, None] & col_ok[None, :]
        is_token = (cols[None, :] == tokens[:, None]).to(tl.float32)
        log_p = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        p, log_q, q = log_p, log_p, log_p
        if CLEAN_LOGITS:  # log p = z - lse
            log_p = _load_logits(logits_ptr, bias_ptr, rows, cols, row_ok, col_ok, stride_logits, temperature,
                                 HAS_BIAS) - lse
            p = tl.where(tile_ok, tl.exp(log_p), 0.0)
        if MASKED_LOGITS:
            log_q = _load_logits(logits_ptr, bias_ptr, rows + n_tokens, cols, row_ok, col_ok, stride_logits,
                                 temperature, HAS_BIAS) - lse_masked
            q = tl.where(tile_ok, tl.exp(log_q), 0.0)
        if CLEAN_DZ:
            dz = clean_logit_gradient(p, log_p, log_q, is_token, logprobs_grad, entropy_grad, entropy, kl_grad, kl,
                                      LOGPROBS_GRAD, ENTROPY_GRAD, KL_GRAD) / temperature
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], dz.to(out_ptr.dtype.element_ty),
                     mask=tile_ok)
        if MASKED_DZ:
            dz_masked = masked_logit_gradient(q, log_q, p, is_token, logprobs_masked_grad, entropy_masked_grad,
                                              entropy_masked, kl_grad, LOGPROBS_MASKED_GRAD, ENTROPY_MASKED_GRAD,
                                              KL_GRAD) / temperature
            tl.store(out_ptr + (rows + n_tokens)[:, None] * stride_out + cols[None, :],
                     dz_masked.to(out_ptr.dtype.element_ty), mask=tile_ok)


def statistics_partials(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float, paired: bool,
                        config: Optional[EpilogueConfig] = None) -> Tensor:
    """The partial statistics of each vocabulary split: a float32 (fields, splits, C) tensor, the fields of
    ``PARTIAL_FIELDS`` (the first four when not paired), splits = ceil(V / split_v)."""
    config = config or launch_config(CONFIGS, logits.device)
    n, vocab_size = tokens.shape[0], logits.shape[1]
    assert logits.stride(1) == 1 and logits.shape[0] == (2 if paired else 1) * n
    assert config.split_v % config.block_v == 0
    splits = triton.cdiv(vocab_size, config.split_v)
    fields = len(PARTIAL_FIELDS) if paired else SINGLE_PASS_FIELDS
    partials = torch.empty((fields, splits, n), dtype=torch.float32, device=logits.device)
    if n > 0:
        _statistics_partials_kernel[(triton.cdiv(n, config.block_n), splits)](
            logits, logits if bias is None else bias, tokens, partials,
            n, vocab_size,
            logits.stride(0), partials.stride(0), partials.stride(1),
            temperature,
            HAS_BIAS=bias is not None, PAIRED=paired,
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, SPLIT_V=config.split_v, num_warps=config.num_warps,
        )
    return partials


def finalize_statistics(partials: Tensor, paired: bool, config: Optional[EpilogueConfig] = None) -> RowStatistics:
    """The per-token statistics from the partials of every vocabulary split (``statistics_partials``' layout;
    the splits of several vocabulary shards may be concatenated along the second axis)."""
    config = config or launch_config(CONFIGS, partials.device)
    fields, splits, n = partials.shape
    assert fields == (len(PARTIAL_FIELDS) if paired else SINGLE_PASS_FIELDS) and partials.stride(2) == 1
    outputs = torch.empty((7 if paired else 3, n), dtype=torch.float32, device=partials.device)
    padded = tuple(outputs) if paired else (*outputs, *([outputs[0]] * 4))
    if n > 0:
        _finalize_statistics_kernel[(triton.cdiv(n, config.finalize_block_n),)](
            partials, *padded,
            n, splits,
            partials.stride(0), partials.stride(1),
            PAIRED=paired,
            BLOCK_N=config.finalize_block_n, num_warps=config.finalize_num_warps,
        )
    # kernel order (l, H, lse, l~, H~, lse~, KL) is RowStatistics' order
    return RowStatistics(*outputs)


def statistics(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
               paired: bool) -> RowStatistics:
    return finalize_statistics(statistics_partials(logits, tokens, bias, temperature, paired), paired)


def row_partials(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float, paired: bool,
                 config: Optional[EpilogueConfig] = None) -> Tensor:
    """The contract's partials (``partials.FIELDS``): the splits' states, each cross sum u turned into the
    difference sum w = sum e^(z - m)(z - z~) = t - u + (m - m~) s, merged over the splits. A token id of
    ``NOT_HERE`` matches no column, in this kernel and in the gradient's."""
    split = statistics_partials(logits, tokens, bias, temperature, paired, config)
    if paired:
        split[8] = split[2] - split[8] + (split[0] - split[4]) * split[1]
    return partials.merge(split, dim=1)


def logit_gradient(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                   stats: RowStatistics, grads: UpstreamGradients, out: Tensor,
                   config: Optional[EpilogueConfig] = None) -> None:
    config = config or launch_config(CONFIGS, logits.device)
    n, vocab_size = tokens.shape[0], logits.shape[1]
    assert out.stride(1) == 1 and out.shape == logits.shape
    stand_in = stats.lse  # for pointers that the constexpr flags never let the kernel read

    def pointer(tensor: Optional[Tensor]) -> Tensor:
        return stand_in if tensor is None else tensor.to(torch.float32).contiguous()

    has_kl = grads.kl is not None
    if n > 0:
        _epilogue_gradient_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(vocab_size, config.split_v))](
            logits, logits if bias is None else bias, tokens,
            stats.lse, stats.entropy, pointer(stats.lse_masked), pointer(stats.entropy_masked), pointer(stats.kl),
            *map(pointer, grads),
            out,
            n, vocab_size,
            logits.stride(0), out.stride(0),
            temperature,
            HAS_BIAS=bias is not None,
            LOGPROBS_GRAD=grads.logprobs is not None, ENTROPY_GRAD=grads.entropy is not None,
            LOGPROBS_MASKED_GRAD=grads.logprobs_masked is not None,
            ENTROPY_MASKED_GRAD=grads.entropy_masked is not None, KL_GRAD=grads.kl is not None,
            CLEAN_DZ=grads.clean, MASKED_DZ=grads.masked,
            # the KL terms couple the passes: dz needs log q, dz~ needs p
            CLEAN_LOGITS=grads.clean or (grads.masked and has_kl),
            MASKED_LOGITS=grads.masked or (grads.clean and has_kl),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, SPLIT_V=config.split_v, num_warps=config.num_warps,
        )
