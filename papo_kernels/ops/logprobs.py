"""Token log-probabilities and exact entropies of a linear LM head."""

from typing import NamedTuple, Optional

from torch import Tensor

from .._guards import no_autocast
from ..backends import resolve_backend
from ..vocab_parallel import VocabShard, check_linear_call, hidden_inputs


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
    vocab_parallel_group=None,
    vocab_parallel_hidden_grad: str = "all_reduce",
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
        backend: ``"auto"`` or one of ``papo_kernels.BACKENDS``, with or without a
            vocabulary-parallel head (each one takes it; ``"auto"`` picks as without one).
        vocab_parallel_group: a ``torch.distributed`` process group over whose ranks the head is
            split by vocabulary rows, as in ``papo_loss``: ``weight`` (and ``bias``) are this
            rank's block of rows, ``tokens`` global ids, everything else the same on every rank;
            every rank gets the same outputs and the gradient of its own block.
        vocab_parallel_hidden_grad: as in ``papo_loss``: ``"all_reduce"`` (the hidden gradients
            summed over the group in backward) or ``"partial"`` (each rank's own part).

    Returns:
        ``LinearLogprobs(logprobs, entropy)``, both of shape ``(...)`` in float32
        (float64 for float64 input), differentiable with respect to hidden, weight and bias;
        the same under ``torch.autocast`` as without it.
    """
    temperature, shard = check_linear_call(vocab_parallel_group, vocab_parallel_hidden_grad, hidden, weight, tokens,
                                           bias, temperature, backend)
    return compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend, shard)


def compute_linear_logprobs(hidden, weight, tokens, bias, temperature, backend,
                            shard: Optional[VocabShard] = None) -> LinearLogprobs:
    """``linear_logprobs`` on inputs that have passed its checks (``shard``: this rank's block of a
    vocabulary-parallel head)."""
    ops = resolve_backend(backend, hidden.device, hidden.dtype)

    batch_shape = tokens.shape
    (flat_hidden,) = hidden_inputs(shard, hidden.reshape(-1, hidden.shape[-1]))
    flat_tokens = tokens.reshape(-1).long()
    ids = flat_tokens if shard is None else shard.local_ids(flat_tokens)
    with no_autocast(hidden.device):
        logprobs, entropy = ops.linear_logprobs(flat_hidden, weight, ids, bias, temperature, shard)
    return LinearLogprobs(logprobs.reshape(batch_shape), entropy.reshape(batch_shape))
