"""Clean and masked log-probs, exact entropies and the exact KL between them, on Triton.

Forward: the GEMM with a statistics epilogue (``triton_logit_statistics.py``): tiles of ``[h; h~] W^T`` in float32
accumulators, per-tile softmax partials, one finalize; the logits never reach memory. Backward: by chunks of tokens
(``head_chunks.py``): the chunk's logits again by the same kernel in store mode, dZ by the fast path's Triton
epilogue, dh and dW by library products. Over a vocabulary-parallel head (``shard``) the tiles' partials of the
rank's columns are all-reduced over the group before the finalize, in forward and backward alike.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from triton import knobs

from ..vocab_parallel import VocabShard
from . import TRITON_DTYPES
from .head_chunks import head_options
from .head_chunks import linear_perception_kl as chunked_linear_perception_kl
from .triton_logit_statistics import TRITON_HEAD


def check_triton_dtype(hidden: Tensor) -> None:
    if hidden.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' computes in float16, bfloat16 or float32, got hidden of dtype {hidden.dtype}; "
            f"use backend='torch' (chunked) or 'reference' for float64"
        )
    if hidden.dtype == torch.bfloat16 and knobs.runtime.interpret:
        raise ValueError(
            "backend='triton' under TRITON_INTERPRET=1 computes in float16 or float32, got hidden of dtype "
            "torch.bfloat16 (the interpreter multiplies bfloat16 bit patterns as integers); use backend='torch' "
            "on the CPU, or a CUDA device"
        )


def linear_perception_kl(
    hidden: Tensor, hidden_masked: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
    shard: Optional[VocabShard] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same as ``reference.linear_perception_kl`` (``shard`` too); the forward never stores the logits."""
    check_triton_dtype(hidden)
    return chunked_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias,
                                        head_options(TRITON_HEAD, temperature), shard)
