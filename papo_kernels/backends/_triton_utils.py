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
