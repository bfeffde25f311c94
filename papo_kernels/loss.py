"""``papo_loss``: the PAPO objective of a batch of responses, on one of two paths.

Per response token (shared PAPO_SPEC.md, ``objective.py``):

    L_t = pg + beta * kl_ref - gamma * KL_prcp + eta_clean * H + eta_masked * H~

aggregated over tokens by ``loss_type``. The perception KL is maximised (minus
sign); both entropies are minimised.

- The fast path (``fast_path/``) computes the loss and its gradient in one sweep over
  row chunks: 12 N D V of matrix work, nothing recomputed. It is the default for training.
- The per-token path applies the objective to the outputs of the LM-head ops
  (``linear_logprobs``, ``linear_perception_kl``) and lets autograd do the rest; their
  fused backwards recompute the logits (16 N D V). It serves evaluation under no_grad,
  the ``reference`` backend, higher-order gradients and sequence-level importance sampling.

Both apply the same per-token code, to the unmasked tokens only: whatever a masked
position holds (padding ids, NaN advantages or hidden states) is never read.

Under ``torch.compile`` papo_loss checks what needs no tensor values while it is traced and
runs the rest as one opaque custom op (``loss_op.py``), whose kernel is this eager function.
Under ``torch.func`` transforms only ``path='per_token'`` with ``backend='reference'`` (plain
autograd) runs; every other choice is a clear error.

Both paths also run over a vocabulary-parallel head (``vocab_parallel_group``, ``vocab_parallel.py``),
eagerly: under ``torch.compile`` such a call runs outside the graph (``torch.compiler.disable``).
"""

import inspect
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_bias_values, check_choice, check_completion_values, check_float_tensor, check_has_data
from ._checks import check_head
from ._checks import check_hidden_masked
from ._checks import check_int, check_int_tensor, check_number, check_same_device, check_shape
from ._checks import check_tensor
from . import loss_op
from ._guards import no_autocast
from .backends import BACKENDS, reference
from .fast_path import EPILOGUES, FastPAPOLossFunction, FastPathCall, FastPathOptions
from .fast_path import resolve_epilogue
from .objective import ENTROPY_MODES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PERCEPTION_KL_ESTIMATORS, Objective
from .objective import Statistics, TokenBatch, Terms, aggregation_weights, token_losses
from .ops.logprobs import compute_linear_logprobs
from .ops.perception_kl import compute_linear_perception_kl
from .vocab_parallel import VocabShard, agree_on_inputs, check_group, check_without_group, hidden_inputs

PATHS = ("auto", "fast", "per_token")
FLOAT32 = torch.finfo(torch.float32)
LOSS_BACKENDS = tuple(dict.fromkeys(BACKENDS + EPILOGUES))
# The largest max_completion_length: dr_grpo divides by B x max_completion_length, and float64 counts every integer
# up to 2**53.
MAX_COMPLETION_LENGTH = 2**53
HYPERPARAMETERS = ("temperature", "epsilon_low", "epsilon_high", "dual_clip", "beta", "ref_kl_importance_weighted",
                   "gamma", "perception_kl", "eta_clean", "eta_masked", "entropy", "loss_type",
                   "importance_sampling_level", "max_completion_length", "num_items_in_batch", "path", "backend",
                   "workspace_bytes")
METRIC_NAMES = ("policy_loss", "clip_fraction_low", "clip_fraction_high", "perception_kl", "ref_kl", "entropy",
                "entropy_masked", "ratio_mean")

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


def _setting(name: str, value, *, divisor: bool = False, **interval) -> float:
    """``check_number``, and a float32 number, since the loss computes in float32: at most float32's largest in
    magnitude, and for a ``divisor`` (temperature, num_items_in_batch) at least its smallest normal, so that
    dividing by it stays finite."""
    value = check_number(name, value, **interval)
    reason = "the loss computes in float32 for all but float64 inputs"
    if divisor and not FLOAT32.tiny <= value <= FLOAT32.max:
        raise ValueError(f"{name} must lie in [{FLOAT32.tiny:.4g}, {FLOAT32.max:.4g}] (float32's normal numbers: "
                         f"{reason}, and divides by it), got {value}")
    if abs(value) > FLOAT32.max:
        raise ValueError(f"{name} must be at most {FLOAT32.max:.4g} in magnitude (float32's range: {reason}), "
                         f"got {value}")
    return value


def check_hyperparameters(hyperparameters: Dict[str, object]) -> Dict[str, object]:
    """The values and choices of papo_loss's scalar settings (the checks that need no tensor), as Python values."""
    h = dict(hyperparameters)
    h["temperature"] = _setting("temperature", h["temperature"], divisor=True, low=0.0, low_open=True)
    h["epsilon_low"] = _setting("epsilon_low", h["epsilon_low"], low=0.0, high=1.0, high_open=True)
    h["epsilon_high"] = _setting("epsilon_high", h["epsilon_high"], low=0.0)
    if h["dual_clip"] is not None:
        h["dual_clip"] = _setting("dual_clip", h["dual_clip"], low=1.0, low_open=True)
    h["beta"] = _setting("beta", h["beta"], low=0.0)
    if not isinstance(h["ref_kl_importance_weighted"], bool):
        raise TypeError(f"ref_kl_importance_weighted must be True or False, got {h['ref_kl_importance_weighted']!r}")
    for name in ("gamma", "eta_clean", "eta_masked"):
        h[name] = _setting(name, h[name])
    check_choice("perception_kl", h["perception_kl"], PERCEPTION_KL_ESTIMATORS)
    check_choice("entropy", h["entropy"], ENTROPY_MODES)
    check_choice("loss_type", h["loss_type"], LOSS_TYPES)
    check_choice("importance_sampling_level", h["importance_sampling_level"], IMPORTANCE_SAMPLING_LEVELS)
    check_choice("path", h["path"], PATHS)
    check_choice("backend", h["backend"], LOSS_BACKENDS)
    if h["workspace_bytes"] is not None:  # None: the fast path's policy (fast_path/workspace.py)
        h["workspace_bytes"] = int(check_number("workspace_bytes", h["workspace_bytes"], low=1.0))
    if h["loss_type"] == "dr_grpo" and h["max_completion_length"] is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (a positive int), got None")
    if h["max_completion_length"] is not None:
        h["max_completion_length"] = check_int("max_completion_length", h["max_completion_length"], low=1,
                                               high=MAX_COMPLETION_LENGTH)
    if h["num_items_in_batch"] is not None:
        h["num_items_in_batch"] = _setting("num_items_in_batch", h["num_items_in_batch"], divisor=True, low=0.0,
                                           low_open=True)
    check_path(h)
    return h


def _check_papo_inputs(hidden, weight, completion_ids, completion_mask, advantages, hidden_masked, masked_logprobs,
                       old_logprobs, ref_logprobs, policy_weights, bias, hyperparameters) -> Dict[str, object]:
    """Every check that needs no tensor values; returns the hyperparameters as validated Python values."""
    check_float_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, D), got {tuple(hidden.shape)}")
    batch_shape = hidden.shape[:2]
    check_hidden_masked(hidden, hidden_masked)
    check_head(hidden, weight, bias)
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
                        ("ref_logprobs", ref_logprobs), ("policy_weights", policy_weights)):
        if value is not None:
            check_float_tensor(name, value)
            check_shape(name, value, batch_shape, "(B, T) of hidden")
    tensors = dict(hidden=hidden, weight=weight, completion_ids=completion_ids, completion_mask=completion_mask,
                   advantages=advantages, hidden_masked=hidden_masked, masked_logprobs=masked_logprobs,
                   old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, policy_weights=policy_weights, bias=bias)
    num_items_in_batch = hyperparameters["num_items_in_batch"]
    if isinstance(num_items_in_batch, Tensor):
        tensors["num_items_in_batch"] = num_items_in_batch
    check_same_device(**tensors)
    check_has_data(hidden=hidden)

    h = check_hyperparameters(hyperparameters)
    if h["perception_kl"] == "exact" and masked_logprobs is not None:
        raise ValueError(
            "perception_kl='exact' needs hidden_masked (the full masked distribution), got masked_logprobs; "
            "use perception_kl in ['k1', 'k2', 'k3'] with masked_logprobs"
        )
    if h["beta"] > 0 and ref_logprobs is None:
        raise ValueError(f"beta > 0 needs ref_logprobs (log-probs under the reference policy), got beta={h['beta']} "
                         "and ref_logprobs=None")
    return h


def _warn_masked_terms_off(h: Dict[str, object]) -> None:
    """gamma and eta_masked weigh statistics of the masked pass: without one their terms are off, said once per
    call site (Python's default warning filter), not dropped in silence; eta_clean applies."""
    dropped = [f"{name}={h[name]}" for name in ("gamma", "eta_masked") if h[name] != 0]
    if dropped:
        warnings.warn(f"papo_loss: {' and '.join(dropped)} weigh the masked pass, which was not given "
                      "(hidden_masked or masked_logprobs): those terms are off and the loss is GRPO/DAPO with the "
                      "clean entropy term (eta_clean); give the masked pass, or gamma=0 and eta_masked=0 (the "
                      "'grpo' and 'dapo' presets)", UserWarning, stacklevel=3)


def _check_not_transformed(h: Dict[str, object]) -> None:
    """torch.func's transforms (grad, vmap, jacrev, ...) differentiate plain autograd only: the reference backend on
    the per-token path. The fast path and the fused backends are autograd.Functions that compute their own
    gradients, which the transforms cannot run."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return
    if h["path"] != "per_token" or h["backend"] != "reference":
        raise ValueError(f"papo_loss under a torch.func transform (grad, vmap, jacrev, ...) needs path='per_token' "
                         f"with backend='reference' (plain autograd, which the transforms differentiate), got "
                         f"path={h['path']!r}, backend={h['backend']!r}: the fast path and the fused backends compute "
                         "their own gradients, which torch.func cannot transform")


def _token_batch(mask: Tensor, index: Tensor, advantages: Tensor, old_logprobs, ref_logprobs, masked_logprobs,
                 policy_weights, dtype: torch.dtype, h: Dict[str, object]) -> TokenBatch:
    """The gradient-free per-token inputs at the unmasked positions ``index`` (flat), in ``dtype``."""
    def at_tokens(value: Optional[Tensor]) -> Optional[Tensor]:
        return None if value is None else value.detach().reshape(-1)[index].to(dtype)

    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape)
    sequence_ids = torch.div(index, mask.shape[1], rounding_mode="floor")
    weights = aggregation_weights(mask, sequence_ids, h["loss_type"], dtype, h["max_completion_length"],
                                  h["num_items_in_batch"])
    return TokenBatch(advantages=at_tokens(advantages), aggregation_weights=weights, sequence_ids=sequence_ids,
                      num_sequences=mask.shape[0], old_logprobs=at_tokens(old_logprobs),
                      ref_logprobs=at_tokens(ref_logprobs), masked_logprobs=at_tokens(masked_logprobs),
                      policy_weights=at_tokens(policy_weights))


def check_path(h: Dict[str, object]) -> None:
    """The path and backend go together: the fast path computes with an epilogue, the per-token path with the
    LM-head ops, and the fast path cannot take importance_sampling_level='sequence'. None of it depends on grad
    mode, so it is checked with the other settings (``PAPOLoss`` at construction)."""
    fast_only = h["backend"] not in BACKENDS
    path = h["path"]
    if path == "fast" and h["backend"] not in EPILOGUES:
        raise ValueError(f"path='fast' computes with an epilogue, one of backend {list(EPILOGUES)}, "
                         f"got backend={h['backend']!r}; use path='per_token' for it")
    if h["importance_sampling_level"] == "sequence" and (path == "fast" or (path == "auto" and fast_only)):
        raise ValueError(f"the fast path (path={path!r}, backend={h['backend']!r}) needs every token's "
                         "gradient from its own statistics, which importance_sampling_level='sequence' couples "
                         f"across a sequence; use path='per_token' with backend one of {list(BACKENDS)}")
    if path == "per_token" and fast_only:
        raise ValueError(f"path='per_token' runs the LM-head ops, backend one of {list(BACKENDS)}, "
                         f"got backend={h['backend']!r}")


def _choose_path(h: Dict[str, object], wants_grad: bool) -> str:
    """``auto``: the fast path when a gradient is wanted and nothing needs the per-token path, or when the backend
    is an epilogue the per-token ops do not have (``native``); the same with or without a vocabulary-parallel head,
    which both paths take on every backend. The settings passed ``check_path``."""
    if h["path"] != "auto":
        return h["path"]
    fast_only = h["backend"] not in BACKENDS
    per_token_only = h["backend"] == "reference" or h["importance_sampling_level"] == "sequence"
    return "fast" if fast_only or (wants_grad and not per_token_only) else "per_token"


def _per_token_path(hidden, hidden_masked, weight, bias, tokens, batch: TokenBatch, objective: Objective,
                    temperature: float, backend: str, shard: Optional[VocabShard]) -> Tuple[Tensor, Terms]:
    if hidden_masked is not None:
        paired = compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend,
                                              shard)
        stats = Statistics(paired.logprobs, paired.entropy, paired.logprobs_masked, paired.entropy_masked, paired.kl)
    else:
        stats = Statistics(*compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend, shard))
    losses, terms = token_losses(stats, batch, objective)
    return (batch.aggregation_weights * losses).sum(), terms


def _fast_path(hidden, hidden_masked, weight, bias, tokens, batch: TokenBatch, objective: Objective,
               h: Dict[str, object], wants_grad: bool, shard: Optional[VocabShard]) -> Tuple[Tensor, Terms]:
    epilogue = resolve_epilogue(h["backend"], hidden.device, hidden.dtype)
    options = FastPathOptions(h["temperature"], h["workspace_bytes"])
    call = FastPathCall(tokens, batch, objective, options, epilogue, wants_grad, shard)
    hidden, hidden_masked = hidden_inputs(shard, hidden, hidden_masked)
    loss, *terms = FastPAPOLossFunction.apply(hidden, hidden_masked, weight, bias, call)
    return loss, Terms(*terms)


def _metrics(terms: Terms, count: int, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
    """Token means over the unmasked tokens (0 where there are none or the term is absent), and their count."""
    zero = torch.zeros((), dtype=dtype, device=device)

    def token_mean(value: Optional[Tensor]) -> Tensor:
        return zero if value is None or count == 0 else value.detach().to(dtype).sum() / count

    values = (terms.policy, terms.low_clipped, terms.high_clipped, terms.perception, terms.ref_kl, terms.entropy,
              terms.entropy_masked, terms.ratio)
    metrics = {name: token_mean(value) for name, value in zip(METRIC_NAMES, values)}
    metrics["tokens"] = torch.tensor(float(count), dtype=dtype, device=device)
    return metrics


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
    policy_weights: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    dual_clip: Optional[float] = None,
    beta: float = 0.0,
    ref_kl_importance_weighted: bool = False,
    gamma: float = 0.01,
    perception_kl: str = "k3",
    eta_clean: float = 0.03,
    eta_masked: float = 0.03,
    entropy: str = "exact",
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    path: str = "auto",
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    vocab_parallel_group=None,
    vocab_parallel_hidden_grad: str = "all_reduce",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The PAPO loss of a batch of responses, straight from final hidden states.

    Per token, with l = log p(y) from ``hidden`` and l~ = log q(y) from the masked pass:
    ``L = w pg + beta * kl_ref - gamma * KL_prcp + eta_clean * H + eta_masked * H~``, where pg is
    PPO's clipped surrogate of r = exp(l - l_old), w the optional policy weight, kl_ref the k3
    estimate against the reference policy, KL_prcp the perception KL(p || q) (maximised), and
    H, H~ the entropies of both passes (minimised). Masked-out tokens contribute nothing and
    are never read.

    Defaults are PAPO-D's published setting (DAPO, arXiv 2507.06448: eps 0.2/0.28,
    gamma 0.01, eta 0.03 for both entropies, beta 0, token-mean), except that dual clip
    is off; ``PRESETS["papo_d"]`` and ``PRESETS["papo_g"]`` give the paper's settings
    in full, dual clip c = 3 included.

    Logits and every reduction are float32 (float64 for float64 inputs) with the inputs in
    their own dtype, under ``torch.autocast`` exactly as without it.

    Args:
        hidden: ``(B, T, D)`` final hidden states (after the final norm) of the clean pass,
            aligned so that position t predicts ``completion_ids[:, t]``.
        weight: ``(V, D)`` LM-head weight.
        completion_ids: ``(B, T)`` sampled response tokens, ids in ``[0, V)`` where the mask is on.
        completion_mask: ``(B, T)``; bool, or 0/1 (1 for real response tokens, 0 for padding).
        advantages: ``(B,)`` per sequence or ``(B, T)`` per token.
        hidden_masked: ``(B, T, D)`` the same positions on the masked image; gradient flows
            through both passes (this package's default way).
        masked_logprobs: ``(B, T)`` precomputed, gradient-free log-probs of the masked pass
            (the authors' default). Give at most one of the two; with neither, the terms of
            the masked pass (gamma, eta_masked) are off, with a warning where their
            coefficients are not 0, and this is GRPO/DAPO plus the clean entropy (eta_clean).
        old_logprobs: ``(B, T)`` log-probs of the rollout policy; None means on-policy (r = 1).
        ref_logprobs: ``(B, T)`` log-probs of the reference policy; needed when beta > 0.
        policy_weights: ``(B, T)`` gradient-free weights of the policy-gradient term per token
            (TRL's importance-sampling correction of vLLM rollouts, top-entropy or off-policy masks).
        bias: optional ``(V,)`` LM-head bias, finite: a token that can never be drawn takes a
            bias far below the other logits (say -1e4), not -inf, which is refused.
        temperature: sampling temperature; logits are divided by it. > 0.
        epsilon_low, epsilon_high: clip range of the ratio, [1 - eps_low, 1 + eps_high].
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c A; None is off.
        beta: coefficient of the reference KL (k3), >= 0.
        ref_kl_importance_weighted: the reference KL is r * k3, with r the policy-gradient term's
            ratio before its clip, gradient included (TRL's ``use_bias_correction_kl``), and so is
            the ``ref_kl`` metric; False is the plain k3 (the paper's).
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
        importance_sampling_level: ``"token"`` (PPO's per-token ratio) or ``"sequence"`` (GSPO:
            the log-ratio averaged over each sequence's tokens; runs the per-token path).
        max_completion_length: needed by ``dr_grpo``; at least the longest response, at most 2**53.
        num_items_in_batch: response tokens in the whole generation batch, for ``dapo``, a number
            > 0 (or a one-element tensor); None uses the local count. Under DDP, which averages
            gradients, pass it divided by the number of processes.
        path: ``"auto"`` (the fast path when a gradient is wanted, else the per-token ops),
            ``"fast"`` or ``"per_token"``.
        backend: ``"auto"`` (``triton`` on CUDA, ``native`` on the CPU for the fast path);
            for the per-token path one of ``papo_kernels.BACKENDS`` (``"reference"`` always
            takes the per-token path), for the fast path the epilogue, ``"torch"``,
            ``"triton"`` or ``"native"`` (which has no per-token op, so it takes the fast
            path under ``no_grad`` too).
        workspace_bytes: the fast path's budget in bytes for one chunk of rows (its float32
            logits, the half-precision dZ on CUDA, the epilogue's temporaries, the chunk's hidden
            rows and their gradients), at least 1. None (the default) picks it from the device:
            on CUDA min(4 GiB, 10% of free memory), since each chunk re-reads the float32 weight
            gradient and fewer chunks are faster; on the CPU 256 MiB.
            ``papo_kernels.fast_path.LOW_MEMORY_WORKSPACE_BYTES`` (256 MiB) is the low-memory setting.
            The per-token path's chunked backends always run at that default (README, "Backends of the
            per-token ops").
        vocab_parallel_group: a ``torch.distributed`` process group over whose ranks the head is
            split by vocabulary rows (Megatron-style tensor parallelism); None (the default) for a
            whole head. Then ``weight`` (and ``bias``) are this rank's contiguous block of rows, in
            rank order, of any size; ``completion_ids`` are global ids; every other input is the
            same on every rank. Every statistic is exact (partials all-reduced per row, O(N)
            floats); every rank returns the same loss and metrics and gets the gradient of its own
            block of the weight and bias. Every rank of the group must make the call; bad or
            disagreeing inputs are a ValueError on every rank. See ``papo_kernels.vocab_parallel``.
        vocab_parallel_hidden_grad: with ``vocab_parallel_group``, ``"all_reduce"`` (the default)
            sums the hidden gradients over the group in backward, so ``hidden.grad`` and
            ``hidden_masked.grad`` are complete on every rank; ``"partial"`` leaves each rank the
            part its block gives, for frameworks that reduce it themselves (Megatron's
            ``copy_to_tensor_model_parallel_region``, or sequence parallelism's all-gather).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached 0-dim tensors, means
        over the unmasked tokens: ``policy_loss``, ``clip_fraction_low``, ``clip_fraction_high``,
        ``perception_kl``, ``ref_kl``, ``entropy``, ``entropy_masked``, ``ratio_mean``, and
        ``tokens``, their number, so that ``sum(mean * tokens) / sum(tokens)`` combines
        micro-batches and processes.
    """
    hyperparameters = dict(
        temperature=temperature, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip, beta=beta,
        ref_kl_importance_weighted=ref_kl_importance_weighted, gamma=gamma, perception_kl=perception_kl,
        eta_clean=eta_clean, eta_masked=eta_masked, entropy=entropy, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, path=path, backend=backend, workspace_bytes=workspace_bytes)
    if vocab_parallel_group is None:
        check_without_group(vocab_parallel_hidden_grad)
    if torch.compiler.is_compiling():
        if vocab_parallel_group is not None:  # the call and its collectives run eagerly, outside the graph
            return torch.compiler.disable(papo_loss)(
                hidden, weight, completion_ids, completion_mask, advantages, hidden_masked=hidden_masked,
                masked_logprobs=masked_logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                policy_weights=policy_weights, bias=bias, vocab_parallel_group=vocab_parallel_group,
                vocab_parallel_hidden_grad=vocab_parallel_hidden_grad, **hyperparameters)
        return loss_op.traced_papo_loss(hidden, weight, completion_ids, completion_mask, advantages, hidden_masked,
                                        masked_logprobs, old_logprobs, ref_logprobs, policy_weights, bias,
                                        hyperparameters)

    def check() -> Dict[str, object]:
        return _check_papo_inputs(hidden, weight, completion_ids, completion_mask, advantages, hidden_masked,
                                  masked_logprobs, old_logprobs, ref_logprobs, policy_weights, bias, hyperparameters)

    def check_block() -> Dict[str, object]:
        """A rank's checks include its bias block's values, so that a refusal reaches every rank."""
        h = check()
        check_bias_values(bias)
        return h

    shard = None
    if vocab_parallel_group is None:
        h = check()
    else:
        h, shard = agree_on_inputs(vocab_parallel_group, vocab_parallel_hidden_grad, check_block, hidden=hidden,
                                   hidden_masked=hidden_masked, weight=weight, bias=bias, tokens=completion_ids,
                                   mask=completion_mask, ids_name="completion_ids", settings=_shared_settings)
    _check_not_transformed(h)
    if hidden_masked is None and masked_logprobs is None:
        _warn_masked_terms_off(h)
    vocab_size = weight.shape[0] if shard is None else shard.vocab_size
    check_completion_values(completion_ids, completion_mask, vocab_size, h["max_completion_length"], bias)
    differentiable = (hidden, hidden_masked, weight, bias)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    chosen_path = _choose_path(h, wants_grad)

    with no_autocast(hidden.device):
        mask = completion_mask != 0
        index = mask.reshape(-1).nonzero().squeeze(1)
        dtype = reference.compute_dtype(hidden.dtype)
        batch = _token_batch(mask, index, advantages, old_logprobs, ref_logprobs, masked_logprobs, policy_weights,
                             dtype, h)
        objective = Objective(h["epsilon_low"], h["epsilon_high"], h["dual_clip"], h["beta"], h["gamma"],
                              h["perception_kl"], h["eta_clean"], h["eta_masked"], h["entropy"],
                              h["importance_sampling_level"], h["ref_kl_importance_weighted"])
        dim = hidden.shape[-1]
        rows = hidden.reshape(-1, dim)[index]
        rows_masked = None if hidden_masked is None else hidden_masked.reshape(-1, dim)[index]
        tokens = completion_ids.reshape(-1)[index].long()
        if chosen_path == "fast":
            loss, terms = _fast_path(rows, rows_masked, weight, bias, tokens, batch, objective, h, wants_grad, shard)
        else:
            loss, terms = _per_token_path(rows, rows_masked, weight, bias, tokens, batch, objective,
                                          h["temperature"], h["backend"], shard)
        return loss, _metrics(terms, index.numel(), dtype, hidden.device)


def _shared_settings(h: Dict[str, object]) -> Dict[str, object]:
    """The settings every rank of a vocabulary-parallel group must share (the workspace is each rank's own)."""
    return {name: value for name, value in h.items() if name != "workspace_bytes"}


def check_settings(settings: Dict[str, object]) -> Dict[str, object]:
    """``check_hyperparameters`` on papo_loss's defaults updated with ``settings`` (names of HYPERPARAMETERS), for
    whatever holds settings before the first call (``PAPOLoss``, TRL's ``PAPOConfig``)."""
    defaults = {name: p.default for name, p in inspect.signature(papo_loss).parameters.items()
                if name in HYPERPARAMETERS}
    return check_hyperparameters({**defaults, **settings})


class PAPOLoss(nn.Module):
    """Stores the hyperparameters of ``papo_loss`` and forwards to it.

    ``PAPOLoss(**PRESETS["papo_d"])`` or ``PAPOLoss.from_preset("papo_d", gamma=0.02)``.
    """

    def __init__(self, **hyperparameters):
        super().__init__()
        keywords = [name for name, p in inspect.signature(papo_loss).parameters.items() if p.kind == p.KEYWORD_ONLY]
        for name in hyperparameters:
            check_choice("PAPOLoss hyperparameter", name, keywords)
        check_settings({name: value for name, value in hyperparameters.items() if name in HYPERPARAMETERS})
        if hyperparameters.get("vocab_parallel_group") is not None:
            check_group(hyperparameters["vocab_parallel_group"],
                        hyperparameters.get("vocab_parallel_hidden_grad", "all_reduce"))
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
