"""Which product accumulates the weight gradient dW += dZ^T [h; h~] in the chunk loop: the flag and its rules.

- ``addmm`` (the default, and the path on CPU): the library's ``addmm`` into the float32 V x D
  accumulator. It reads and writes the accumulator once per chunk, exposed: on the H200 that
  was 0.975 ms a chunk at V = 152064, D = 3584 (2026-12-04).
- ``reduce_add`` (``PAPO_KERNELS_GRAD_WEIGHT=reduce_add``): a persistent Triton GEMM
  (``triton_grad_weight.py``) that adds each output tile into the accumulator through the TMA
  reduce-add, in the background of the next tiles' arithmetic. CUDA devices with TMA (compute
  capability >= 9.0), half-precision weights, V and D multiples of 8 (TMA's 16-byte rows); on CPU
  tensors under ``TRITON_INTERPRET=1`` its pointer fallback runs (the tests' way). Elsewhere the
  loop keeps ``addmm``, with one warning.

The flag also picks the workspace policy (``workspace.py``). Nothing here imports Triton.
"""

import functools
import os
import warnings
from typing import Optional

import torch

GRAD_WEIGHT_VARIABLE = "PAPO_KERNELS_GRAD_WEIGHT"
GRAD_WEIGHT_KERNELS = ("addmm", "reduce_add")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def requested_grad_weight_kernel() -> str:
    """The kernel ``PAPO_KERNELS_GRAD_WEIGHT`` asks for ("addmm" when unset or empty)."""
    value = os.environ.get(GRAD_WEIGHT_VARIABLE) or "addmm"
    if value not in GRAD_WEIGHT_KERNELS:
        raise ValueError(f"the environment variable {GRAD_WEIGHT_VARIABLE} must be one of {list(GRAD_WEIGHT_KERNELS)} "
                         f"(or unset), got {value!r}")
    return value


def reduce_add_unavailable(device: torch.device, dtype: torch.dtype, vocab_size: int, dim: int) -> Optional[str]:
    """Why the reduce-add kernel cannot accumulate dW for a weight of ``dtype`` and shape (V, D) on ``device``, or None
    when it can."""
    from ..backends import _triton_importable, _triton_interpreted

    if not _triton_importable():
        return "triton does not import"
    if device.type == "cpu" and _triton_interpreted():
        return None if dtype != torch.float64 else "the interpreter runs it in float32, not float64"
    if device.type != "cuda":
        return f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"
    return cuda_reduce_add_unavailable(torch.cuda.get_device_capability(device), dtype, vocab_size, dim)


def cuda_reduce_add_unavailable(capability, dtype: torch.dtype, vocab_size: int, dim: int) -> Optional[str]:
    """The rules on a CUDA device of ``capability`` (major, minor): why not, or None."""
    if capability[0] < 9:
        return f"it needs TMA (compute capability >= 9.0), this device has {capability[0]}.{capability[1]}"
    if dtype not in HALF_DTYPES:
        return f"it multiplies half-precision inputs, the weight is {dtype}"
    if vocab_size % 8 or dim % 8:
        return f"TMA needs rows of a multiple of 16 bytes: V and D multiples of 8, got V = {vocab_size}, D = {dim}"
    return None


def resolve_grad_weight_kernel(device: torch.device, dtype: torch.dtype, vocab_size: int, dim: int) -> str:
    """The kernel the chunk loop uses: the one asked for, or ``addmm`` (with one warning) where reduce-add cannot run."""
    requested = requested_grad_weight_kernel()
    if requested == "reduce_add":
        reason = reduce_add_unavailable(device, dtype, vocab_size, dim)
        if reason is not None:
            _warn_unavailable(reason)
            return "addmm"
    return requested


@functools.lru_cache(maxsize=None)
def _warn_unavailable(reason: str) -> None:
    warnings.warn(f"papo_kernels: {GRAD_WEIGHT_VARIABLE}=reduce_add asks for the reduce-add dW kernel, which cannot "
                  f"run here ({reason}); the fast path uses addmm", RuntimeWarning, stacklevel=4)
