"""Backends that compute the per-token statistics of the LM head.

Each backend module provides the same two functions on flattened inputs,
``linear_logprobs(hidden, weight, tokens, bias, temperature)`` and
``linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature)``;
see ``reference.py`` for the semantics.

- ``reference``: materialises the logits; the one copy tests compare against.
- ``torch``: chunked plain PyTorch with bounded temporaries; runs anywhere (on CUDA, the chunked library products
  of ``head_chunks.py`` with the fast path's torch epilogue).
- ``triton``: the statistics GEMM of ``triton_logit_statistics.py`` forward, the chunked library products with the
  fast path's Triton epilogue backward; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``auto``: ``triton`` for CUDA tensors when Triton imports (``torch`` for float64 ones, and with one warning
  where Triton does not import), ``torch`` elsewhere.

Over a vocabulary-parallel head every backend takes a ``shard`` argument (``papo_kernels/vocab_parallel.py``: this
rank's block of rows, tokens as ids local to it) and ``auto`` picks as without one: ``triton`` and the torch
backend's CUDA path run ``head_chunks.py`` with the rank's partials all-reduced per chunk, the torch backend's
CPU path its online-softmax chunks with the rank's running state all-reduced, the reference backend sums each
statistic over the group.

Triton is imported only when the ``triton`` backend is asked for, never at package import.
"""

import functools
import importlib.util
import warnings
from types import ModuleType, SimpleNamespace
from typing import Union

import torch

from .._checks import check_choice

BACKENDS = ("auto", "reference", "torch", "triton")

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 goes to the torch backend


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    """Whether triton imports. Any exception counts as no: a broken install raises more than ImportError (a
    RuntimeError of a driver or compiler it cannot find, an AttributeError of a version clash), and ``auto`` then
    runs the torch code, with its one warning, as where triton is missing."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 (any failure of the import means no triton here)
        return False
    return True


def _triton_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` takes Triton for inputs of ``device`` and ``dtype``: CUDA tensors of a Triton dtype, when
    Triton imports. Where it does not, the torch code runs instead, with one warning per process."""
    if device.type != "cuda" or dtype not in TRITON_DTYPES:
        return False
    if not _triton_importable():
        _warn_without_triton()
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_without_triton() -> None:
    warnings.warn("papo_kernels: triton does not import, so backend='auto' runs the plain torch code on CUDA "
                  "tensors, several times slower than the fused Triton kernels; install triton "
                  "(pip install \"papo-kernels[triton]\") for them", RuntimeWarning, stacklevel=4)


def _triton_interpreted() -> bool:
    """Whether Triton runs its kernels through the CPU interpreter (TRITON_INTERPRET=1)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


# Imported after the helpers above: the torch backend's CUDA path runs on the fast path's pieces, whose epilogue
# registry imports those helpers from this package.
from . import reference, torch_chunked  # noqa: E402

_MODULES = {"reference": reference, "torch": torch_chunked}


@functools.lru_cache(maxsize=None)
def _triton_backend() -> SimpleNamespace:
    from . import triton_logprobs, triton_perception_kl

    return SimpleNamespace(
        linear_logprobs=triton_logprobs.linear_logprobs,
        linear_perception_kl=triton_perception_kl.linear_perception_kl,
    )


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Union[ModuleType, SimpleNamespace]:
    """The backend for ``name``; ``auto`` picks the best one available for inputs of ``device`` and ``dtype``."""
    check_choice("backend", name, BACKENDS)
    device = torch.device(device)
    if name == "auto":
        name = "triton" if _triton_on_cuda(device, dtype) else "torch"
    if name != "triton":
        return _MODULES[name]
    if not _triton_importable():
        raise ValueError(
            f"backend='triton' needs the triton package, which does not import here; "
            f"allowed here: {[b for b in BACKENDS if b != 'triton']}"
        )
    if device.type != "cuda" and not _triton_interpreted():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got tensors on {device}; use backend='torch' or 'reference' there"
        )
    return _triton_backend()
