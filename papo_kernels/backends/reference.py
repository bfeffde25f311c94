"""The reference backend: plain PyTorch that materialises the logits.

Written for clarity, not speed: it builds the full (N, V) logits in float32
(float64 when given float64) and lets autograd differentiate it. It is the one
reference that the tests, the benchmarks and the trainer compare against.

Both functions take flattened inputs: hidden (N, D), weight (V, D), tokens (N,),
bias (V,) or None, and return per-token tensors of shape (N,).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


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


def linear_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float
) -> Tuple[Tensor, Tensor]:
    _, logprobs, entropy = token_statistics(logits(hidden, weight, bias, temperature), tokens)
    return logprobs, entropy


def linear_perception_kl(
    hidden: Tensor,
    hidden_masked: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Optional[Tensor],
    temperature: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    log_p, logprobs, entropy = token_statistics(logits(hidden, weight, bias, temperature), tokens)
    log_q, logprobs_masked, entropy_masked = token_statistics(logits(hidden_masked, weight, bias, temperature), tokens)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p || q) = sum_v p_v (log p_v - log q_v)
    return logprobs, logprobs_masked, entropy, entropy_masked, kl
