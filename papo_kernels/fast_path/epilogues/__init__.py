"""The epilogues of the fast path, one per device, with one contract (``contract.py``).

- ``triton``: two Triton kernels (statistics, then dZ); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (float32 and float64 logits are not mixed: float64 inputs go to torch).
- ``native``: C++ from ``csrc/`` (``native_epilogue.py``), built on first use; CPU tensors. Where
  the library cannot be had, asked for by name it raises the cause.
- ``torch``: plain PyTorch ops; anywhere; the tests' second opinion.
- ``auto``: ``triton`` on CUDA when Triton imports (not for float64; ``torch`` with one warning where
  Triton does not import), ``native`` on CPU (``torch`` with one warning where it does not build),
  ``torch`` elsewhere.

Triton is imported, and the native library built, only when its epilogue is asked for.
"""

import torch

from ..._checks import check_choice
from ...backends import TRITON_DTYPES, _triton_importable, _triton_interpreted, _triton_on_cuda
from . import native_epilogue, torch_epilogue

EPILOGUES = ("auto", "torch", "triton", "native")


def resolve_epilogue(name: str, device: torch.device, dtype: torch.dtype):
    """The epilogue module for ``name``; ``auto`` picks the best one for inputs of ``device`` and ``dtype``."""
    check_choice("backend", name, EPILOGUES)
    if name == "auto":
        if device.type == "cpu":
            return native_epilogue.resolve(strict=False)
        name = "triton" if _triton_on_cuda(device, dtype) else "torch"
    if name == "torch":
        return torch_epilogue
    if name == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got tensors on {device}; use backend='auto' "
                             "(Triton on CUDA) or backend='torch' there")
        return native_epilogue.resolve(strict=True)
    if not _triton_importable():
        raise ValueError("backend='triton' needs the triton package, which does not import here; use backend='torch'")
    if device.type != "cuda" and not _triton_interpreted():
        raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported), got tensors on {device}; use backend='torch' there")
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' computes in float16, bfloat16 or float32, got {dtype}; "
                         "use backend='torch' for float64")
    from . import triton_epilogue

    return triton_epilogue
