"""The logit distributions of the benchmark inputs, and their measured token entropy.

- ``spread``: the head as drawn (logits with a standard deviation near 1), so the token entropy
  is near log V and every vocabulary block carries probability;
- ``peaked``: like a trained model's. The head is scaled by one factor, found by bisection on
  the inputs' own first rows, so that the mean token entropy of the clean pass is
  ``PEAKED_ENTROPY`` nats; the tokens are then sampled from that distribution, as rollouts
  are. Most of the vocabulary then has a tiny probability, which peers with gradient
  filtering (Cut Cross-Entropy) skip.

The mean entropy is measured afterwards over every row, in float32 from the inputs as cast,
and goes into the results' note column.
"""

import math
from typing import Iterator, Tuple

import torch
from torch import Tensor

DISTRIBUTIONS = ("spread", "peaked")
PEAKED_ENTROPY = 1.0  # nats: what the calibration aims at
PEAKED_RANGE = (0.5, 2.0)  # what a trained model's mean token entropy looks like
CALIBRATION_ROWS = 256
CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk of the measuring pass
BISECTION_STEPS = 40
LARGEST_SCALE = 1e4


def token_entropy(logits: Tensor) -> Tensor:
    """-sum p log p per row of float logits."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def logit_scale_for_entropy(hidden: Tensor, weight: Tensor, target: float) -> float:
    """The factor s for which softmax(s * hidden W^T) has mean entropy ``target`` over the first rows.

    Entropy falls as s grows, so a bracket [low, high] is widened by doubling and then halved
    geometrically.
    """
    rows = hidden[:CALIBRATION_ROWS].float()
    logits = rows @ weight.float().T

    def entropy_at(scale: float) -> float:
        return float(token_entropy(logits * scale).mean())

    if not 0.0 < target < math.log(weight.shape[0]):
        raise ValueError(f"target entropy must lie in (0, log V = {math.log(weight.shape[0]):.3g}), got {target}")
    low = high = 1.0
    while entropy_at(high) > target:
        high *= 2.0
        if high > LARGEST_SCALE:
            raise RuntimeError(f"no logit scale up to {LARGEST_SCALE:g} brings the mean entropy down to {target} "
                               "nats: the logits are (nearly) constant")
    while entropy_at(low) < target:
        low /= 2.0
    for _ in range(BISECTION_STEPS):
        middle = math.sqrt(low * high)
        if entropy_at(middle) > target:
            low = middle
        else:
            high = middle
    return math.sqrt(low * high)


def _logit_chunks(hidden: Tensor, weight: Tensor) -> Iterator[Tuple[slice, Tensor]]:
    """(rows, float32 logits of those rows), a chunk of at most CHUNK_BYTES at a time."""
    n, vocab_size = hidden.shape[0], weight.shape[0]
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * vocab_size))
    weight = weight.float()
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        yield rows, hidden[rows].float() @ weight.T


@torch.no_grad()
def mean_entropy(hidden: Tensor, weight: Tensor) -> float:
    """The mean token entropy of softmax(hidden W^T) over every row, in nats."""
    total = sum(float(token_entropy(logits).sum()) for _, logits in _logit_chunks(hidden, weight))
    return total / hidden.shape[0]


@torch.no_grad()
def sample_tokens(hidden: Tensor, weight: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row drawn from softmax(hidden W^T)."""
    tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for rows, logits in _logit_chunks(hidden, weight):
        tokens[rows] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    return tokens
