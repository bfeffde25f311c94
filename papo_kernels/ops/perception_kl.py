"""Clean and masked token statistics of a shared LM head and the exact perception KL between them."""

from typing import NamedTuple, Optional

from torch import Tensor

from .._checks import check_linear_inputs
from .._guards import no_autocast
from ..backends import resolve_backend


class LinearPerceptionKL(NamedTuple):
    logprobs: Tensor
    logprobs_masked: Tensor
    entropy: Tensor
    entropy_masked: Tensor
    kl: Tensor


def linear_perception_kl(
    hidden: Tensor,
    hidden_masked: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> LinearPerceptionKL:
    """Log-probs and exact entropies of both passes and the exact KL(p_clean || p_masked).

    With ``log_p = log_softmax((hidden @ weight.T + bias) / temperature, -1)`` and
    ``log_q`` the same for ``hidden_masked``: ``kl = (log_p.exp() * (log_p - log_q)).sum(-1)``,
    and log-probs and entropies as in ``linear_logprobs`` for each pass; without
    allocating the logits (on the fused backends).

    Args:
        hidden: ``(..., D)`` final hidden states of the clean pass.
        hidden_masked: ``(..., D)`` the same positions in the pass with the masked image.
        weight: ``(V, D)`` LM-head weight shared by both passes, same dtype as ``hidden``.
        tokens: ``(...)`` integer ids in ``[0, V)``; the same response tokens for both passes.
        bias: optional ``(V,)`` LM-head bias.
        temperature: logits are divided by it, as at sampling time; > 0.
        backend: ``"auto"`` or one of ``papo_kernels.BACKENDS``.

    Returns:
        ``LinearPerceptionKL(logprobs, logprobs_masked, entropy, entropy_masked, kl)``, each of
        shape ``(...)`` in float32 (float64 for float64 input), differentiable with respect to
        hidden, hidden_masked, weight and bias; the same under ``torch.autocast`` as without it.
    """
    temperature = check_linear_inputs(hidden, weight, tokens, bias, temperature, hidden_masked=hidden_masked)
    return compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend)


def compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend):
    """``linear_perception_kl`` on inputs that have passed its checks."""
    ops = resolve_backend(backend, hidden.device, hidden.dtype)

    batch_shape = tokens.shape
    dim = hidden.shape[-1]
    with no_autocast(hidden.device):
        outputs = ops.linear_perception_kl(hidden.reshape(-1, dim), hidden_masked.reshape(-1, dim), weight,
                                           tokens.reshape(-1).long(), bias, temperature)
    return LinearPerceptionKL(*(out.reshape(batch_shape) for out in outputs))
