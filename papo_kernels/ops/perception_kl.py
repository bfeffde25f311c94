"""Clean and masked token statistics of a shared LM head and the exact perception KL between them."""

from typing import NamedTuple, Optional

from torch import Tensor

from .._guards import no_autocast
from ..backends import resolve_backend
from ..vocab_parallel import VocabShard, check_linear_call, hidden_inputs


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
    vocab_parallel_group=None,
    vocab_parallel_hidden_grad: str = "all_reduce",
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
        backend: ``"auto"`` or one of ``papo_kernels.BACKENDS``, with or without a
            vocabulary-parallel head (each one takes it; ``"auto"`` picks as without one).
        vocab_parallel_group: a ``torch.distributed`` process group over whose ranks the head is
            split by vocabulary rows, as in ``papo_loss``: ``weight`` (and ``bias``) are this
            rank's block of rows, ``tokens`` global ids, everything else the same on every rank;
            every rank gets the same outputs and the gradient of its own block.
        vocab_parallel_hidden_grad: as in ``papo_loss``: ``"all_reduce"`` (the hidden gradients
            summed over the group in backward) or ``"partial"`` (each rank's own part).

    Returns:
        ``LinearPerceptionKL(logprobs, logprobs_masked, entropy, entropy_masked, kl)``, each of
        shape ``(...)`` in float32 (float64 for float64 input), differentiable with respect to
        hidden, hidden_masked, weight and bias; the same under ``torch.autocast`` as without it.
    """
    temperature, shard = check_linear_call(vocab_parallel_group, vocab_parallel_hidden_grad, hidden, weight, tokens,
                                           bias, temperature, backend, hidden_masked=hidden_masked)
    return compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend, shard)


def compute_linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature, backend,
                                 shard: Optional[VocabShard] = None):
    """``linear_perception_kl`` on inputs that have passed its checks (``shard``: this rank's block of a
    vocabulary-parallel head)."""
    ops = resolve_backend(backend, hidden.device, hidden.dtype)

    batch_shape = tokens.shape
    dim = hidden.shape[-1]
    flat_hidden, flat_hidden_masked = hidden_inputs(shard, hidden.reshape(-1, dim), hidden_masked.reshape(-1, dim))
    flat_tokens = tokens.reshape(-1).long()
    ids = flat_tokens if shard is None else shard.local_ids(flat_tokens)
    with no_autocast(hidden.device):
        outputs = ops.linear_perception_kl(flat_hidden, flat_hidden_masked, weight, ids, bias, temperature, shard)
    return LinearPerceptionKL(*(out.reshape(batch_shape) for out in outputs))
