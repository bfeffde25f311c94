"""The Triton epilogue of the fast path: the per-row work on CUDA in two kernels, no temporaries.

``_epilogue_statistics_kernel``: one program per block of rows sweeps the vocabulary once,
reading the clean and the masked rows of the chunk side by side, with the online
statistics of the fused backend (``absorb_pair``: m, s, t per pass and the cross sum u),
and writes lse, l, H, l~, H~, KL per token. The logits are read, never written.

``_epilogue_gradient_kernel``: one program per block of rows sweeps the vocabulary again
and writes dz / tau and dz~ / tau (``clean_logit_gradient``, ``masked_logit_gradient``:
the gradient table of PAPO_SPEC.md) over the logits or into a half-precision buffer.

The jit helpers are the fused backend's (``backends/_triton_utils.py``): the math exists
once in Triton.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from ...backends._triton_utils import absorb_pair, clean_logit_gradient, masked_logit_gradient, row_column
from ...backends._triton_utils import initial_pair_state, store_statistics
from .contract import RowStatistics, UpstreamGradients

NAME = "triton"

# (rows per program, vocabulary tile, warps). One row per program keeps the two (1 x BLOCK_V)
# tiles of each pass in registers; not yet measured on hardware (no GPU here).
CUDA_BLOCKS = (1, 2048, 8)
INTERPRETER_BLOCKS = (4, 32, 1)


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
def _epilogue_statistics_kernel(
    # pointers: logits chunk (clean rows, then masked rows), bias, tokens, then (C,) float32 outputs
    logits_ptr, bias_ptr, tokens_ptr,
    logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr, kl_ptr,
    # sizes
    n_tokens, vocab_size,
    # strides
    stride_logits,
    # runtime scalars
    temperature,
    # constexpr flags
    HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)

    (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
     shifted_sum_masked, cross_sum) = initial_pair_state(BLOCK_N)

    for v_start in range(0, vocab_size, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
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
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
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

    for v_start in range(0, vocab_size, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
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


def _blocks():
    return INTERPRETER_BLOCKS if knobs.runtime.interpret else CUDA_BLOCKS


def statistics(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
               paired: bool) -> RowStatistics:
    n = tokens.shape[0]
    assert logits.stride(1) == 1 and logits.shape[0] == (2 if paired else 1) * n
    outputs = torch.empty((7 if paired else 3, n), dtype=torch.float32, device=logits.device)
    padded = tuple(outputs) if paired else (*outputs, *([outputs[0]] * 4))
    block_n, block_v, warps = _blocks()
    if n > 0:
        _epilogue_statistics_kernel[(triton.cdiv(n, block_n),)](
            logits, logits if bias is None else bias, tokens, *padded,
            n, logits.shape[1],
            logits.stride(0),
            temperature,
            HAS_BIAS=bias is not None, PAIRED=paired,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
        )
    # kernel order (l, H, lse, l~, H~, lse~, KL) is RowStatistics' order
    return RowStatistics(*outputs)


def logit_gradient(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                   stats: RowStatistics, grads: UpstreamGradients, out: Tensor) -> None:
    n = tokens.shape[0]
    assert out.stride(1) == 1 and out.shape == logits.shape
    stand_in = stats.lse  # for pointers that the constexpr flags never let the kernel read

    def pointer(tensor: Optional[Tensor]) -> Tensor:
        return stand_in if tensor is None else tensor.to(torch.float32).contiguous()

    has_kl = grads.kl is not None
    block_n, block_v, warps = _blocks()
    if n > 0:
        _epilogue_gradient_kernel[(triton.cdiv(n, block_n),)](
            logits, logits if bias is None else bias, tokens,
            stats.lse, stats.entropy, pointer(stats.lse_masked), pointer(stats.entropy_masked), pointer(stats.kl),
            *map(pointer, grads),
            out,
            n, logits.shape[1],
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
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
        )
