"""The PAPO objective: clipped policy gradient, implicit perception loss and double entropy.

Per response token (see shared PAPO_SPEC.md):

    L_t = pg + beta * kl_ref - gamma * KL_prcp + eta_clean * H + eta_masked * H~

aggregated over tokens by ``loss_type``. The perception KL is maximised (minus
sign); both entropies are minimised.
"""

import inspect
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_float_tensor, check_int_tensor, check_number, check_same_device, check_shape
from ._checks import check_linear_inputs, check_tensor
from .backends import reference
from .ops.logprobs import compute_linear_logprobs
from .ops.perception_kl import compute_linear_perception_kl

PERCEPTION_KL_ESTIMATORS = ("k1", "k2", "k3", "exact")
ENTROPY_MODES = ("exact", "sampled")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")

LOG_RATIO_CLAMP = 20.0  # |log-ratio| bound before exp, as in the authors' code
KL_VALUE_CLAMP = 10.0  # |k3| bound after, as in the authors' code

# Published settings (arXiv 2507.06448 and the authors' scripts). "grpo" and "dapo" are
# the baselines of PAPO-G and PAPO-D with the PAPO terms off (gamma = eta = 0).
PRESETS: Dict[str, Dict[str, object]] = {
    "papo_g": dict(epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0, beta=0.01, gamma=0.02,
                   eta_clean=0.0, eta_masked=0.0, perception_kl="k3", loss_type="dapo"),
    "papo_g_7b": dict(epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0, beta=0.01, gamma=0.01,
                      eta_clean=0.05, eta_masked=0.05, perception_kl="k3", loss_type="dapo"),
    "papo_d": dict(epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0, beta=0.0, gamma=0.01,
                   eta_clean=0.03, eta_masked=0.03, perception_kl="k3", loss_type="dapo"),
    "grpo": dict(epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0, beta=0.01, gamma=0.0,
                 eta_clean=0.0, eta_masked=0.0, perception_kl="k3", loss_type="dapo"),
    "dapo": dict(epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0, beta=0.0, gamma=0.0,
                 eta_clean=0.0, eta_masked=0.0, perception_kl="k3", loss_type="dapo"),
}


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


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float,
    dual_clip: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """PPO's clipped objective per token; returns (pg, ratio, low-clipped, high-clipped).

    pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and with dual clip c,
    pg = min(pg, -c A) where A < 0.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -dual_clip * advantages), pg)
    low_clipped = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high_clipped = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return pg, ratio, low_clipped, high_clipped


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length, num_items_in_batch) -> Tensor:
    """Reduce masked per-token losses to a scalar (names as in TRL and Liger-Kernel)."""
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    weights = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return (masked.sum(-1) / weights.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / weights.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_completion_length)
    if num_items_in_batch is None:
        normaliser = weights.sum()
    else:
        normaliser = torch.as_tensor(num_items_in_batch, dtype=per_token.dtype, device=per_token.device).reshape(())
    return masked.sum() / normaliser.clamp(min=1.0)


def _check_papo_inputs(hidden, weight, completion_ids, completion_mask, advantages, hidden_masked, masked_logprobs,
                       old_logprobs, ref_logprobs, bias, epsilon_low, epsilon_high, dual_clip, beta, gamma,
                       perception_kl, eta_clean, eta_masked, entropy, loss_type, max_completion_length,
                       num_items_in_batch):
    check_float_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, D), got {tuple(hidden.shape)}")
    batch_shape = hidden.shape[:2]
    check_int_tensor("completion_ids", completion_ids)
    check_shape("completion_ids", completion_ids, batch_shape, "(B, T) of hidden")
    check_tensor("completion_mask", completion_mask)
    check_shape("completion_mask", completion_mask, batch_shape, "(B, T) of hidden")
    if completion_mask.is_complex():
        raise TypeError(f"completion_mask must be a bool, integer or float tensor, got dtype {completion_mask.dtype}")
    check_float_tensor("advantages", advantages)
    if tuple(advantages.shape) not in ((batch_shape[0],), tuple(batch_shape)):
        raise ValueError(
            f"advantages must have shape ({batch_shape[0]},) or {tuple(batch_shape)} (B or (B, T) of hidden), "
            f"got {tuple(advantages.shape)}"
        )
    if hidden_masked is not None and masked_logprobs is not None:
        raise ValueError(
            "give at most one of hidden_masked (gradient through both passes) and masked_logprobs "
            "(precomputed, no gradient), got both"
        )
    for name, value in (("masked_logprobs", masked_logprobs), ("old_logprobs", old_logprobs),
                        ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_float_tensor(name, value)
            check_shape(name, value, batch_shape, "(B, T) of hidden")
    check_same_device(hidden=hidden, weight=weight, completion_ids=completion_ids, completion_mask=completion_mask,
                      advantages=advantages, hidden_masked=hidden_masked, masked_logprobs=masked_logprobs,
                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias)
    check_number("epsilon_low", epsilon_low, low=0.0, high=1.0, high_open=True)
    check_number("epsilon_high", epsilon_high, low=0.0)
    if dual_clip is not None:
        check_number("dual_clip", dual_clip, low=1.0, low_open=True)
    check_number("beta", beta, low=0.0)
    check_number("gamma", gamma)
    check_number("eta_clean", eta_clean)
    check_number("eta_masked", eta_masked)
    check_choice("perception_kl", perception_kl, PERCEPTION_KL_ESTIMATORS)
    check_choice("entropy", entropy, ENTROPY_MODES)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if perception_kl == "exact" and masked_logprobs is not None:
        raise ValueError(
            "perception_kl='exact' needs hidden_masked (the full masked distribution), got masked_logprobs; "
            "use perception_kl in ['k1', 'k2', 'k3'] with masked_logprobs"
        )
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (a positive int), got None")
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta > 0 needs ref_logprobs (log-probs under the reference policy), got beta={beta} "
                         "and ref_logprobs=None")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, "
                                 f"got shape {tuple(num_items_in_batch.shape)}")
            check_same_device(hidden=hidden, num_items_in_batch=num_items_in_batch)
        else:
            check_number("num_items_in_batch", num_items_in_batch, low=0.0)


def papo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    *,
    hidden_masked: Optional[Tensor] = None,
    masked_logprobs: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    gamma: float = 0.01,
    perception_kl: str = "k3",
    eta_clean: float = 0.03,
    eta_masked: float = 0.03,
    entropy: str = "exact",
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    backend: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The PAPO loss of a batch of responses, straight from final hidden states.

    Per token, with l = log p(y) from ``hidden`` and l~ = log q(y) from the masked pass:
    ``L = pg + beta * kl_ref - gamma * KL_prcp + eta_clean * H + eta_masked * H~``, where pg is
    PPO's clipped surrogate of r = exp(l - l_old), kl_ref the k3 estimate against the
    reference policy, KL_prcp the perception KL(p || q) (maximised), and H, H~ the
    entropies of both passes (minimised). Masked-out tokens contribute nothing.

    Defaults are PAPO-D's published setting (DAPO, arXiv 2507.06448: eps 0.2/0.28,
    gamma 0.01, eta 0.03 for both entropies, beta 0, token-mean), except that dual clip
    is off; ``PRESETS["papo_d"]`` and ``PRESETS["papo_g"]`` give the paper's settings
    in full, dual clip c = 3 included.

    Args:
        hidden: ``(B, T, D)`` final hidden states (after the final norm) of the clean pass,
            aligned so that position t predicts ``completion_ids[:, t]``.
        weight: ``(V, D)`` LM-head weight.
        completion_ids: ``(B, T)`` sampled response tokens, ids in ``[0, V)`` where the mask is on.
        completion_mask: ``(B, T)``; nonzero for real response tokens, 0 for padding.
        advantages: ``(B,)`` per sequence or ``(B, T)`` per token.
        hidden_masked: ``(B, T, D)`` the same positions on the masked image; gradient flows
            through both passes (this package's default way).
        masked_logprobs: ``(B, T)`` precomputed, gradient-free log-probs of the masked pass
            (the authors' default). Give at most one of the two; with neither, the PAPO
            terms (gamma, eta_clean, eta_masked) are off and this is plain GRPO/DAPO.
        old_logprobs: ``(B, T)`` log-probs of the rollout policy; None means on-policy (r = 1).
        ref_logprobs: ``(B, T)`` log-probs of the reference policy; needed when beta > 0.
        bias: optional ``(V,)`` LM-head bias.
        temperature: sampling temperature; logits are divided by it. > 0.
        epsilon_low, epsilon_high: clip range of the ratio, [1 - eps_low, 1 + eps_high].
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c A; None is off.
        beta: coefficient of the reference KL (k3), >= 0.
        gamma: coefficient of the perception KL (maximised).
        perception_kl: ``"k1"``, ``"k2"``, ``"k3"`` (sampled estimators of the log-ratio at
            the response token, k3 clamped as the authors do) or ``"exact"`` (full-vocabulary
            KL(p || q); needs ``hidden_masked``).
        eta_clean, eta_masked: coefficients of the clean and masked entropies (minimised).
        entropy: ``"exact"`` (full vocabulary) or ``"sampled"`` (the estimator -l). With
            ``masked_logprobs`` the masked entropy is always -l~ and carries no gradient.
        loss_type: ``"grpo"`` (mean over sequences of token means), ``"bnpo"`` (token mean of
            the local batch), ``"dapo"`` (token sum / ``num_items_in_batch``) or ``"dr_grpo"``
            (token sum / (B * ``max_completion_length``)).
        max_completion_length: needed by ``dr_grpo``.
        num_items_in_batch: response tokens in the whole generation batch, for ``dapo``;
            None uses the local count. Under DDP, which averages gradients, pass it divided
            by the number of processes.
        backend: ``"auto"`` or one of ``papo_kernels.BACKENDS``.

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached 0-dim tensors, means
        over the unmasked tokens: ``policy_loss``, ``clip_fraction_low``, ``clip_fraction_high``,
        ``perception_kl``, ``ref_kl``, ``entropy``, ``entropy_masked``, ``ratio_mean``.
    """
    _check_papo_inputs(
        hidden, weight, completion_ids, completion_mask, advantages, hidden_masked, masked_logprobs, old_logprobs,
        ref_logprobs, bias, epsilon_low, epsilon_high, dual_clip, beta, gamma, perception_kl, eta_clean, eta_masked,
        entropy, loss_type, max_completion_length, num_items_in_batch)
    mask = completion_mask != 0
    # A safe token where the mask is off, so padding ids (-100, say) never reach the head; ids are
    # checked only where the mask is on.
    tokens = completion_ids.where(mask, 0)
    temperature = check_linear_inputs(hidden, weight, tokens, bias, temperature, hidden_masked=hidden_masked,
                                      tokens_name="completion_ids")
    dtype = reference.compute_dtype(hidden.dtype)

    def gradient_free(value: Optional[Tensor]) -> Optional[Tensor]:
        """Inputs that carry no gradient, zeroed where masked so a -inf or NaN there cannot leak."""
        return None if value is None else value.detach().to(dtype).where(mask, 0.0)

    old_logprobs, ref_logprobs, masked_logprobs = map(gradient_free, (old_logprobs, ref_logprobs, masked_logprobs))
    advantages = advantages.detach().to(dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(tokens)

    use_papo = hidden_masked is not None or masked_logprobs is not None
    if hidden_masked is not None:
        stats = compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend)
        logprobs, logprobs_masked = stats.logprobs, stats.logprobs_masked
        entropy_clean, entropy_masked, exact_kl = stats.entropy, stats.entropy_masked, stats.kl
    else:
        logprobs, entropy_clean = compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend)
        logprobs_masked, exact_kl = masked_logprobs, None
        entropy_masked = None if masked_logprobs is None else -masked_logprobs
    if entropy == "sampled":
        entropy_clean = -logprobs
        entropy_masked = None if logprobs_masked is None else -logprobs_masked

    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    pg, ratio, low_clipped, high_clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages, epsilon_low, epsilon_high, dual_clip)
    per_token = pg

    zero = torch.zeros_like(logprobs)
    ref_kl = zero
    if ref_logprobs is not None:
        ref_kl = sampled_kl(logprobs, ref_logprobs, "k3")
        if beta > 0:
            per_token = per_token + beta * ref_kl

    perception = zero
    if use_papo:
        perception = exact_kl if perception_kl == "exact" else sampled_kl(logprobs, logprobs_masked, perception_kl)
        # A term joins the graph only with a nonzero coefficient: its output then gets no upstream
        # gradient, and the fused backends skip its work (the masked pass, with gamma = eta_masked = 0).
        for coefficient, term in ((-gamma, perception), (eta_clean, entropy_clean), (eta_masked, entropy_masked)):
            if coefficient != 0:
                per_token = per_token + coefficient * term

    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch)

    token_count = mask.sum().clamp(min=1)

    def token_mean(value: Tensor) -> Tensor:
        return torch.where(mask, value.detach().to(dtype), 0.0).sum() / token_count

    metrics = {
        "policy_loss": token_mean(pg),
        "clip_fraction_low": token_mean(low_clipped),
        "clip_fraction_high": token_mean(high_clipped),
        "perception_kl": token_mean(perception),
        "ref_kl": token_mean(ref_kl),
        "entropy": token_mean(entropy_clean),
        "entropy_masked": token_mean(entropy_masked if entropy_masked is not None else zero),
        "ratio_mean": token_mean(ratio),
    }
    return loss, metrics


class PAPOLoss(nn.Module):
    """Stores the hyperparameters of ``papo_loss`` and forwards to it.

    ``PAPOLoss(**PRESETS["papo_d"])`` or ``PAPOLoss.from_preset("papo_d", gamma=0.02)``.
    """

    def __init__(self, **hyperparameters):
        super().__init__()
        allowed = [name for name, p in inspect.signature(papo_loss).parameters.items() if p.kind == p.KEYWORD_ONLY]
        for name in hyperparameters:
            check_choice("PAPOLoss hyperparameter", name, allowed)
        self.hyperparameters = dict(hyperparameters)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PAPOLoss":
        check_choice("name", name, tuple(PRESETS))
        return cls(**{**PRESETS[name], **overrides})

    def forward(self, hidden, weight, completion_ids, completion_mask, advantages, **tensors):
        return papo_loss(hidden, weight, completion_ids, completion_mask, advantages,
                         **{**self.hyperparameters, **tensors})

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.hyperparameters.items())
