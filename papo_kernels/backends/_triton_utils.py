"""Shared pieces of the Triton backend: jit helpers for the inner loops, block configs, dtype rules.

Imported only when the ``triton`` backend is asked for (see ``backends/__init__.py``).
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs


@dataclass(frozen=True)
class BlockConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The interpreter runs programs one by one on the CPU: one small config that still has
# tails in N, V and D at test shapes (tl.dot needs every block dim >= 16).
INTERPRETER_CONFIG = BlockConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
# Per device class (CUDA compute capability major). Starting points sized for the register
# file of each class; not yet measured on hardware (no GPU was available when they were set).
DEVICE_CONFIGS = {
    9: BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    8: BlockConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2),
}
FALLBACK_CONFIG = BlockConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=2)


def block_config(device: torch.device) -> BlockConfig:
    if knobs.runtime.interpret:
        return INTERPRETER_CONFIG
    return _cuda_config(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_config(device_index: int) -> BlockConfig:
    major, _ = torch.cuda.get_device_capability(device_index)
    return DEVICE_CONFIGS.get(major, FALLBACK_CONFIG)


def dot_precisions(dtype: torch.dtype):
    """(logits, gradients) input precisions of tl.dot.

    float32 inputs: exact fp32 products ("ieee"), not tf32, so that logits and gradients are
    as accurate as torch's float32 matmul (whose default is not tf32).
    Half inputs: logit tiles multiply in their own dtype (the precision setting applies to
    fp32 operands only). Gradients: dz is float32 and the half operand tiles are upcast; their
    values are exact in tf32, so "tf32" rounds only dz (to 11 significant bits, against 8 for
    a bf16 cast of dz).
    """
    if dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", "tf32"


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride and need unit stride along the last dimension."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


@triton.jit
def logit_tiles(
    # pointers
    hidden_ptr, hidden_masked_ptr, weight_ptr, bias_ptr,
    # row and vocabulary indices (int64) of the tile and their masks
    rows, cols, row_ok, col_ok,
    # sizes and strides
    dim, stride_hidden, stride_hidden_masked, stride_weight,
    # runtime scalars
    temperature,
    # constexpr flags
    HAS_BIAS: tl.constexpr, CLEAN: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z = (h W^T + b) / tau and z~ likewise, one (BLOCK_N, BLOCK_V) tile each, fp32.

    Each weight tile is loaded once for both passes. A pass that is off returns zeros.
    Masked rows and columns hold finite values (the bias, or 0); callers mask them.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_masked = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        d_ok = ds < dim
        w = tl.load(weight_ptr + cols[:, None] * stride_weight + ds[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if CLEAN:
            h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + ds[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if MASKED:
            h_masked = tl.load(hidden_masked_ptr + rows[:, None] * stride_hidden_masked + ds[None, :],
                               mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc_masked = tl.dot(h_masked, tl.trans(w), acc_masked, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += b[None, :]
        acc_masked += b[None, :]
    return acc / temperature, acc_masked / temperature


@triton.jit
def grown(t, shift, weight_sum):
    """t + shift * weight_sum, or t while nothing was absorbed yet (weight_sum = 0, shift = -inf)."""
    return t + tl.where(weight_sum > 0, shift, 0.0) * weight_sum


@triton.jit
def absorb_tile(running_max, exp_sum, shifted_sum, z, col_ok):
    """One online-softmax step over a logit tile.

    State per row: m, s = sum exp(z - m), t = sum exp(z - m)(z - m); the running max starts at -inf.
    Returns the new (m, s, t), the tile's exp(z - m') and z - m' (both 0 on masked columns),
    alpha = exp(m - m') and m - m'.
    """
    new_max = tl.maximum(running_max, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
    max_shift = running_max - new_max
    alpha = tl.exp(max_shift)
    shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
    exps = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
    # t' = alpha (t + (m - m') s) + sum exp(z - m')(z - m'),  s' = alpha s + sum exp(z - m')
    new_shifted_sum = alpha * grown(shifted_sum, max_shift, exp_sum) + tl.sum(exps * shifted, axis=1)
    new_exp_sum = alpha * exp_sum + tl.sum(exps, axis=1)
    return new_max, new_exp_sum, new_shifted_sum, exps, shifted, alpha, max_shift


@triton.jit
def initial_pair_state(BLOCK_N: tl.constexpr):
    """The state of ``absorb_pair`` before any tile: running maxima -inf, every sum 0."""
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    minus_inf = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    return zero, minus_inf, zero, zero, zero, minus_inf, zero, zero, zero


@triton.jit
def absorb_pair(
    # per-row state of the clean pass: token logit, m, s = sum exp(z - m), t = sum exp(z - m)(z - m)
    token_logit, running_max, exp_sum, shifted_sum,
    # the same of the masked pass, and u = sum exp(z - m)(z~ - m~) across the passes
    token_logit_masked, running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum,
    # a (BLOCK_N, BLOCK_V) tile of each pass, which tile columns are the rows' tokens, which are in range
    z, z_masked, is_token, col_ok,
    PAIRED: tl.constexpr,
):
    """One step of the online statistics of PAPO_SPEC.md over a tile of logits; returns the new state."""
    token_logit += tl.sum(tl.where(is_token, z, 0.0), axis=1)
    exp_sum_before = exp_sum
    running_max, exp_sum, shifted_sum, exps, _, alpha, _ = absorb_tile(running_max, exp_sum, shifted_sum, z, col_ok)
    if PAIRED:
        token_logit_masked += tl.sum(tl.where(is_token, z_masked, 0.0), axis=1)
        running_max_masked, exp_sum_masked, shifted_sum_masked, _, shifted_masked, _, max_shift_masked = \
            absorb_tile(running_max_masked, exp_sum_masked, shifted_sum_masked, z_masked, col_ok)
        # u' = alpha (u + (m~ - m~') s) + sum exp(z - m')(z~ - m~')
        cross_sum = alpha * grown(cross_sum, max_shift_masked, exp_sum_before) + tl.sum(exps * shifted_masked, axis=1)
    return (token_logit, running_max, exp_sum, shifted_sum,
            token_logit_masked, running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum)


@triton.jit
def store_statistics(
    # output pointers, each (N,) float32
    logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr, kl_ptr,
    # the rows and which are in range
    rows, row_ok,
    # the final state of ``absorb_pair``
    token_logit, running_max, exp_sum, shifted_sum,
    token_logit_masked, running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum,
    PAIRED: tl.constexpr,
):
    """lse = m + log s, l = z_y - lse, H = log s - t / s, and KL(p || q) = (t - u) / s - log s + log s~."""
    log_sum = tl.log(exp_sum)
    lse = running_max + log_sum
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logprobs_ptr + rows, token_logit - lse, mask=row_ok)
    tl.store(entropy_ptr + rows, log_sum - shifted_sum / exp_sum, mask=row_ok)
    if PAIRED:
        log_sum_masked = tl.log(exp_sum_masked)
        lse_masked = running_max_masked + log_sum_masked
        tl.store(lse_masked_ptr + rows, lse_masked, mask=row_ok)
        tl.store(logprobs_masked_ptr + rows, token_logit_masked - lse_masked, mask=row_ok)
        tl.store(entropy_masked_ptr + rows, log_sum_masked - shifted_sum_masked / exp_sum_masked, mask=row_ok)
        tl.store(kl_ptr + rows, (shifted_sum - cross_sum) / exp_sum - log_sum + log_sum_masked, mask=row_ok)


@triton.jit
def row_column(ptr, rows, row_ok, PRESENT: tl.constexpr):
    """A (BLOCK_N, 1) column of per-row float32 values, or 0 where the value is absent."""
    if PRESENT:
        return tl.load(ptr + rows, mask=row_ok, other=0.0)[:, None]
    return tl.zeros((rows.shape[0], 1), dtype=tl.float32)


@triton.jit
def clean_logit_gradient(p, log_p, log_q, is_token, logprobs_grad, entropy_grad, entropy, kl_grad, kl,
                         LOGPROBS_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr, KL_GRAD: tl.constexpr):
    """dz = g_l (e_y - p) - g_H p (log p + H) + g_KL p (log p - log q - KL); columns (BLOCK_N, 1) per row."""
    dz = tl.zeros(p.shape, dtype=tl.float32)
    if LOGPROBS_GRAD:
        dz += logprobs_grad * (is_token - p)
    if ENTROPY_GRAD:
        dz -= entropy_grad * p * (log_p + entropy)
    if KL_GRAD:
        dz += kl_grad * p * (log_p - log_q - kl)
    return dz


@triton.jit
def masked_logit_gradient(q, log_q, p, is_token, logprobs_grad, entropy_grad, entropy, kl_grad,
                          LOGPROBS_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr, KL_GRAD: tl.constexpr):
    """dz~ = g_l~ (e_y - q) - g_H~ q (log q + H~) + g_KL (q - p); columns (BLOCK_N, 1) per row."""
    dz = tl.zeros(q.shape, dtype=tl.float32)
    if LOGPROBS_GRAD:
        dz += logprobs_grad * (is_token - q)
    if ENTROPY_GRAD:
        dz -= entropy_grad * q * (log_q + entropy)
    if KL_GRAD:
        dz += kl_grad * (q - p)
    return dz
