"""The PAPO objective per token, written once for both paths of ``papo_loss``.

Per response token (shared PAPO_SPEC.md):

    L_t = w_pg * pg + beta * kl_ref - gamma * KL_prcp + eta_clean * H + eta_masked * H~

and the scalar loss is ``sum_t a_t L_t``, where the aggregation weight a_t of each
token comes from ``loss_type`` and the mask alone (``aggregation_weights``). The
per-token path applies ``token_losses`` to the outputs of the LM-head ops and lets
autograd carry the gradient through them; the fast path applies it, chunk by chunk,
to detached statistics and asks autograd for the per-token upstream gradients. Both
see the same code, so the two paths cannot disagree on the objective.

Every tensor here holds only the unmasked tokens, flattened in row-major order.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

PERCEPTION_KL_ESTIMATORS = ("k1", "k2", "k3", "exact")
ENTROPY_MODES = ("exact", "sampled")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

LOG_RATIO_CLAMP = 20.0  # |log-ratio| bound before exp, as in the authors' code
KL_VALUE_CLAMP = 10.0  # |k3| bound after, as in the authors' code


@dataclass(frozen=True)
class Objective:
    """The hyperparameters of the per-token loss (see ``papo_loss`` for their meaning)."""

    epsilon_low: float
    epsilon_high: float
    dual_clip: Optional[float]
    beta: float
    gamma: float
    perception_kl: str
    eta_clean: float
    eta_masked: float
    entropy: str
    importance_sampling_level: str
    ref_kl_importance_weighted: bool = False


class Statistics(NamedTuple):
    """Per-token outputs of the LM head: log-probs and exact entropies of both passes, exact KL(p || q).

    The masked ones are None without a masked pass.
    """

    logprobs: Tensor
    entropy: Tensor
    logprobs_masked: Optional[Tensor] = None
    entropy_masked: Optional[Tensor] = None
    kl: Optional[Tensor] = None


class TokenBatch(NamedTuple):
    """The gradient-free per-token inputs, in the computation dtype."""

    advantages: Tensor
    aggregation_weights: Tensor  # a_t: the loss is sum_t a_t L_t
    sequence_ids: Tensor  # row of completion_mask each token comes from (long)
    num_sequences: int
    old_logprobs: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None
    masked_logprobs: Optional[Tensor] = None  # precomputed log q(y), no gradient (the authors' default)
    policy_weights: Optional[Tensor] = None  # multiply the policy-gradient term

    def rows(self, rows: slice) -> "TokenBatch":
        """The tokens ``rows`` (sequence-level importance sampling needs all tokens, so never split it)."""
        return TokenBatch(*(value[rows] if isinstance(value, Tensor) else value for value in self))


class Terms(NamedTuple):
    """Per-token pieces of the loss for the metrics (each (n,), or None where the term is absent)."""

    policy: Tensor
    ratio: Tensor
    low_clipped: Tensor
    high_clipped: Tensor
    perception: Optional[Tensor]
    ref_kl: Optional[Tensor]
    entropy: Tensor
    entropy_masked: Optional[Tensor]


def sampled_kl(logprobs: Tensor, logprobs_other: Tensor, estimator: str) -> Tensor:
    """Single-sample estimate of KL(p || q) from l = log p(y), l~ = log q(y), y ~ p.

    With d = l~ - l: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (Schulman's
    low-variance estimator), d clamped to [-20, 20] before and k3 to [-10, 10] after.
    """
    d = logprobs_other - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def importance_log_ratio(logprobs: Tensor, batch: TokenBatch, level: str) -> Tensor:
    """log r: l - l_old per token, or its mean over each sequence's tokens (GSPO's sequence level)."""
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
    log_ratio = logprobs - old
    if level == "token":
        return log_ratio
    sums = log_ratio.new_zeros(batch.num_sequences).index_add(0, batch.sequence_ids, log_ratio)
    counts = torch.bincount(batch.sequence_ids, minlength=batch.num_sequences).clamp(min=1)
    return (sums / counts)[batch.sequence_ids]


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, objective: Objective):
    """PPO's clipped objective per token; returns (pg, ratio, low-clipped, high-clipped).

    r = exp(clamp(log r, -20, 20)), pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),
    and with dual clip c, pg = min(pg, -c A) where A < 0.
    """
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - objective.epsilon_low, 1.0 + objective.epsilon_high)
    pg = torch.maximum(unclipped, clipped)
    if objective.dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -objective.dual_clip * advantages), pg)
    low_clipped = (ratio < 1.0 - objective.epsilon_low) & (advantages < 0)
    high_clipped = (ratio > 1.0 + objective.epsilon_high) & (advantages > 0)
    return pg, ratio, low_clipped, high_clipped


def token_losses(stats: Statistics, batch: TokenBatch, objective: Objective):
    """``(L, terms)``: the per-token loss L_t (n,) and its pieces for the metrics.

    A term joins L only with a nonzero coefficient, so a term that is off sends no
    gradient to its statistic (and the fused backends skip the work it would cost).
    Without a masked pass (neither ``hidden_masked`` nor ``masked_logprobs``) the
    perception KL and the masked entropy do not exist and their terms are off
    (``papo_loss`` warns where their coefficients are not 0); ``eta_clean`` applies.
    """
    logprobs = stats.logprobs
    log_ratio = importance_log_ratio(logprobs, batch, objective.importance_sampling_level)
    pg, ratio, low_clipped, high_clipped = clipped_surrogate(log_ratio, batch.advantages, objective)
    if batch.policy_weights is not None:
        pg = pg * batch.policy_weights
    losses = pg

    ref_kl = None
    if batch.ref_logprobs is not None:
        ref_kl = sampled_kl(logprobs, batch.ref_logprobs, "k3")
        if objective.ref_kl_importance_weighted:  # TRL's use_bias_correction_kl: r k3, with r's gradient
            ref_kl = ratio * ref_kl
        if objective.beta > 0:
            losses = losses + objective.beta * ref_kl

    entropy = -logprobs if objective.entropy == "sampled" else stats.entropy
    logprobs_masked = stats.logprobs_masked if batch.masked_logprobs is None else batch.masked_logprobs
    perception = entropy_masked = None
    if logprobs_masked is not None:
        if objective.perception_kl == "exact":
            perception = stats.kl
        else:
            perception = sampled_kl(logprobs, logprobs_masked, objective.perception_kl)
        exact_masked = objective.entropy == "exact" and batch.masked_logprobs is None
        entropy_masked = stats.entropy_masked if exact_masked else -logprobs_masked
    # Without a masked pass the perception KL and the masked entropy are absent; the clean entropy is not.
    for coefficient, term in ((-objective.gamma, perception), (objective.eta_clean, entropy),
                              (objective.eta_masked, entropy_masked)):
        if coefficient != 0 and term is not None:
            losses = losses + coefficient * term
    return losses, Terms(pg, ratio, low_clipped, high_clipped, perception, ref_kl, entropy, entropy_masked)


def aggregation_weights(mask: Tensor, sequence_ids: Tensor, loss_type: str, dtype: torch.dtype,
                        max_completion_length: Optional[int], num_items_in_batch: Optional[float]) -> Tensor:
    """a_t of each unmasked token, so that ``sum_t a_t L_t`` is the ``loss_type`` aggregation of PAPO_SPEC.md.

    grpo: 1 / (B n_i) (mean over sequences of token means); bnpo: 1 / n (token mean);
    dapo: 1 / num_items_in_batch (the local n when None); dr_grpo: 1 / (B max_completion_length).
    """
    batch_size = mask.shape[0]
    ones = torch.ones(sequence_ids.shape, dtype=dtype, device=mask.device)
    if loss_type == "grpo":
        per_sequence = mask.sum(-1).to(dtype).clamp(min=1.0)
        return ones / (batch_size * per_sequence[sequence_ids])
    if loss_type == "dr_grpo":
        return ones / (batch_size * max_completion_length)
    if loss_type == "dapo" and num_items_in_batch is not None:
        return ones / num_items_in_batch
    return ones / max(sequence_ids.numel(), 1)
