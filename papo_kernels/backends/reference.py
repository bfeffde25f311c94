"""The reference backend: plain PyTorch that materialises the logits.

Written for clarity, not speed: it builds the full (N, V) logits in float32
(float64 when given float64) and lets autograd differentiate it. It is the one
reference that the tests, the benchmarks and the trainer compare against.

Both functions take flattened inputs: hidden (N, D), weight (V, D), tokens (N,),
bias (V,) or None, and return per-token tensors of shape (N,).

Over a vocabulary-parallel head (``shard``: weight and bias are this rank's block of rows, tokens
are ids local to it, ``NOT_HERE`` where another rank holds the token) each rank's logits cover its
columns, and the sums over the vocabulary are sums over the group (``vocab_parallel.sum_over_group``,
whose backward is the identity: every rank computes the same loss from them). The logsumexp, which every
rank holds and uses on its own columns, goes through ``vocab_parallel.replicated``, whose backward sums
the ranks' shares of its gradient. Autograd does the rest.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..partials import NOT_HERE
from ..vocab_parallel import VocabShard, all_reduce_max, replicated, sum_over_group


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """z = (h @ W.T + b) / tau, in the compute dtype."""
    dtype = compute_dtype(hidden.dtype)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def token_statistics(z: Tensor, tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """log p (N, V), the log-prob of each token (N,), and the exact entropy (N,)."""
    log_p = torch.log_softmax(z, dim=-1)
    token_logprob = log_p.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # H = -sum_v p_v log p_v
    return log_p, token_logprob, entropy


def sharded_token_statistics(z: Tensor, tokens: Tensor, shard: VocabShard) -> Tuple[Tensor, Tensor, Tensor]:
    """``token_statistics`` of a vocabulary-parallel head: log p (N, V_rank) on this rank's columns, with
    lse = m + log sum_group sum_v e^(z_v - m) (m the group's max, no gradient: lse does not depend on it), and
    the log-prob of each token (from the rank that holds it) and the entropy, each summed over the group."""
    running_max = all_reduce_max(z.amax(-1), shard)
    lse = replicated(running_max + sum_over_group(torch.exp(z - running_max[:, None]).sum(-1), shard).log(), shard)
    log_p = z - lse[:, None]
    picked = log_p.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1)
    token_logprob = sum_over_group(torch.where(tokens != NOT_HERE, picked, 0.0), shard)
    entropy = sum_over_group(-(log_p.exp() * log_p).sum(-1), shard)
    return log_p, token_logprob, entropy


def _statistics(z: Tensor, tokens: Tensor, shard: Optional[VocabShard]) -> Tuple[Tensor, Tensor, Tensor]:
    return token_statistics(z, tokens) if shard is None else sharded_token_statistics(z, tokens, shard)


def linear_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
    shard: Optional[VocabShard] = None,
) -> Tuple[Tensor, Tensor]:
    _, logprobs, entropy = _statistics(logits(hidden, weight, bias, temperature), tokens, shard)
    return logprobs, entropy


def linear_perception_kl(
    hidden: Tensor,
    hidden_masked: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    shard: Optional[VocabShard] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    log_p, logprobs, entropy = _statistics(logits(hidden, weight, bias, temperature), tokens, shard)
    log_q, logprobs_masked, entropy_masked = _statistics(logits(hidden_masked, weight, bias, temperature), tokens,
                                                         shard)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p || q) = sum_v p_v (log p_v - log q_v)
    if shard is not None:
        kl = sum_over_group(kl, shard)
    return logprobs, logprobs_masked, entropy, entropy_masked, kl
