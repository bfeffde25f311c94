"""dZ in half precision, for both chunk loops: the fast path's (``chunk_loop.py``) and the per-token ops' chunked
backward (``backends/head_chunks.py``).

- Which buffer holds dZ (``dz_dtype``): on CUDA the library multiplies half inputs into float32
  results, so dZ goes to a buffer of the inputs' half dtype, the operand of the dh and dW products;
  elsewhere dZ overwrites the float32 logits. ``FastPathOptions.dz_dtype`` overrides the rule (the
  tests' switch to run the half-dZ code on CPU tensors).
- A float16 dZ would underflow: its entries carry the aggregation weight (1/N for DAPO), and
  p / N at N = 16384 lies near 1e-9, below float16's smallest subnormal (6e-8). The upstream
  gradients, in which dZ is linear for every epilogue, are scaled per chunk by a power of two
  that brings their largest into (1/2, 1] (``chunk_scale``) before the epilogue runs, and the
  products take the inverse as their alpha. Scaling by a power of two is exact. It costs one
  host sync a chunk (the scale is a host number for the library's alpha), in float16 only;
  bfloat16 has float32's range and needs none.
"""

import math
from typing import Optional

import torch

from .epilogues.contract import UpstreamGradients

SCALE_EXPONENT_LIMIT = 126  # dz_scale and its inverse stay normal float32 numbers


def dz_dtype(requested: Optional[torch.dtype], native_half: bool, input_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype of a chunk loop's dZ buffer: ``requested`` when given, else the products' half input dtype where the
    library multiplies half inputs natively (``MatrixProducts.native_half``); None: dZ overwrites the logits."""
    return requested or (input_dtype if native_half else None)


def chunk_scale(upstream: UpstreamGradients, dz_dtype: torch.dtype) -> float:
    """The power of two a chunk's upstream gradients are multiplied by before its dZ is made in ``dz_dtype``:
    ``dz_scale`` for float16, 1 for the types with float32's range."""
    return dz_scale(upstream) if dz_dtype == torch.float16 else 1.0


def dz_scale(upstream: UpstreamGradients) -> float:
    """A power of two 2^k that brings the largest upstream gradient of the chunk into (1/2, 1] (1 when they are all
    zero or not finite); k is bounded so that 2^k and 2^-k are normal float32 numbers. One host sync."""
    largest = float(torch.stack([g.detach().abs().max() for g in upstream if g is not None and g.numel()]).max())
    if not math.isfinite(largest) or largest == 0.0:
        return 1.0
    exponent = -math.ceil(math.log2(largest))
    return 2.0 ** max(-SCALE_EXPONENT_LIMIT, min(SCALE_EXPONENT_LIMIT, exponent))


def scaled(upstream: UpstreamGradients, scale: float) -> UpstreamGradients:
    """The upstream gradients times ``scale`` (the same object when it is 1)."""
    if scale == 1.0:
        return upstream
    return UpstreamGradients(*(None if g is None else g * scale for g in upstream))
