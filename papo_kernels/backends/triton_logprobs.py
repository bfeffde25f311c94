"""Log-probs and exact entropy of one pass, on Triton: ``triton_perception_kl.py`` without the masked pass (the
forward-only log-probs of old and reference policies run the statistics GEMM alone)."""

from typing import Optional, Tuple

from torch import Tensor

from ..vocab_parallel import VocabShard
from .head_chunks import head_options
from .head_chunks import linear_logprobs as chunked_linear_logprobs
from .triton_logit_statistics import TRITON_HEAD
from .triton_perception_kl import check_triton_dtype


def linear_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
    shard: Optional[VocabShard] = None,
) -> Tuple[Tensor, Tensor]:
    """Same as ``reference.linear_logprobs`` (``shard`` too); the forward never stores the logits."""
    check_triton_dtype(hidden)
    return chunked_linear_logprobs(hidden, weight, tokens, bias, head_options(TRITON_HEAD, temperature), shard)
