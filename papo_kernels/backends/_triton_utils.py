"""Shared pieces of the Triton kernels: how a launcher picks its config, jit helpers for the inner loops, dtype rules.

Imported only when a Triton path is asked for (see ``backends/__init__.py``).

Launch configs. Every launcher of the package picks its block sizes, warps and pipeline stages with
``launch_config(CONFIGS, device)``, from a ``KernelConfigs`` table: one config per CUDA device class (compute
capability major), a fallback for other classes, and one for the interpreter. A config is a ``LaunchConfig``, or a
kernel's own dataclass where its launcher needs more than constexprs, warps and stages (the fast path's epilogue:
its vocabulary split and its finalize kernel's config; the dW kernel: its grid). That call is the one place where
the device's capability is read, so ``forced_capability(major)`` (a context) makes every launcher within it launch
as it would on a device of that class, even on the CPU under the interpreter: the compile-limits test
(tests/test_triton_compile.py) drives the public entry points that way, records every launch and compiles each one
for sm_80 and sm_90. A kernel added later joins that check by picking its config through ``launch_config``.
"""

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Dict, Generic, Iterator, Optional, TypeVar

import torch
import triton
import triton.language as tl
from triton import knobs


@dataclass(frozen=True)
class LaunchConfig:
    """A kernel's block sizes (constexpr keyword arguments) with its warps and pipeline stages."""

    blocks: Dict[str, int] = field(hash=False)
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        return dict(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)


Config = TypeVar("Config")  # a LaunchConfig, or a kernel's own config dataclass


@dataclass(frozen=True)
class KernelConfigs(Generic[Config]):
    """One config per CUDA capability major, a fallback for the others, and one for the interpreter."""

    by_capability: Dict[int, Config] = field(hash=False)
    fallback: Config
    interpreter: Config

    def for_capability(self, major: int) -> Config:
        return self.by_capability.get(major, self.fallback)


_forced_capability: Optional[int] = None


@contextlib.contextmanager
def forced_capability(major: int) -> Iterator[None]:
    """Within: ``launch_config`` answers as for a CUDA device of compute capability ``major`` (interpreter too)."""
    global _forced_capability
    previous, _forced_capability = _forced_capability, major
    try:
        yield
    finally:
        _forced_capability = previous


def capability(device: torch.device) -> Optional[int]:
    """The CUDA capability major the launchers size their kernels for: the forced one, else None under the
    interpreter, else the device's."""
    if _forced_capability is not None:
        return _forced_capability
    if knobs.runtime.interpret:
        return None
    return _device_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def launch_config(configs: KernelConfigs[Config], device: torch.device) -> Config:
    """The config a launcher uses for a kernel on ``device`` (see the module's docstring)."""
    major = capability(device)
    return configs.interpreter if major is None else configs.for_capability(major)


def multiprocessors(device: torch.device) -> int:
    """How many programs a persistent kernel launches: the device's SM count; 4 on the interpreter or a forced
    capability, so that the persistent loop still takes several steps at test shapes."""
    if _forced_capability is not None or knobs.runtime.interpret:
        return 4
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def logit_dot_precision(dtype: torch.dtype) -> str:
    """The input precision of the logits' tl.dot: exact fp32 products ("ieee", not tf32) for float32 inputs, as
    accurate as torch's float32 matmul (whose default is not tf32); half inputs multiply in their own dtype (the
    setting applies to fp32 operands only)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride and need unit stride along the last dimension."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


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
