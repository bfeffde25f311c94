"""Token log-probabilities and exact entropies of a linear LM head."""

from typing import NamedTuple, Optional

from torch import Tensor

from .._checks import check_linear_inputs
from .._guards import no_autocast
from ..backends import resolve_backend


class LinearLogprobs(NamedTuple):
    logprobs: Tensor
    entropy: Tensor


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> LinearLogprobs:
    """Per-token log-prob of ``tokens`` and exact entropy under a linear LM head.

    Same as ``log_p = log_softmax((hidden @ weight.T + bias) / temperature, -1)``,
    then ``(log_p.gather(-1, tokens[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1))``,
    without allocating the logits (on the fused backends).

    Args:
        hidden: ``(..., D)`` final hidden states; float16, bfloat16, float32 or float64.
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        tokens: ``(...)`` integer ids in ``[0, V)``, one per hidden state.
        bias: optional ``(V,)`` LM-head bias.
        temperature: logits are divided by it, as at sampling time; > 0.
        backend: ``"auto"`` or one of ``papo_kernels.BACKENDS``.

    Returns:
        ``LinearLogprobs(logprobs, entropy)``, both of shape ``(...)`` in float32
        (float64 for float64 input), differentiable with respect to hidden, weight and bias;
        the same under ``torch.autocast`` as without it.
    """
    temperature = check_linear_inputs(hidden, weight, tokens, bias, temperature)
    return compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend)


def compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend) -> LinearLogprobs:
    """``linear_logprobs`` on inputs that have passed its checks."""
    ops = resolve_backend(backend, hidden.device, hidden.dtype)

    batch_shape = tokens.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    with no_autocast(hidden.device):
        logprobs, entropy = ops.linear_logprobs(flat_hidden, weight, tokens.reshape(-1).long(), bias, temperature)
    return LinearLogprobs(logprobs.reshape(batch_shape), entropy.reshape(batch_shape))
