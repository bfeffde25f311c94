"""The policy's forward for training: final hidden states of the response positions, never the logits.

``CompletionHiddenStates`` runs a Qwen2-VL-family model, possibly wrapped by
accelerate (DDP, FSDP2), through its own forward with
``hidden_states.completion_hidden_states``: a pre-hook on the LM head takes the final
hidden states and hands the head an empty slice, so no (tokens x vocabulary) logits
are built. The head's weight itself is returned beside them (never a copy) with the
sampling bias (``sampling_bias``), and the fused loss applies them tile by tile.

Because the pass is the wrapper's own forward, DDP sees it, and FSDP2 gathers every
unit's shards in its hooks as the model runs: the head's unit (accelerate gives the
final norm and the head one that stays gathered after the forward) holds the full
weight when ``output_head`` reads it, and ``output_head`` gathers a head that is still
sharded. ``sharding.py`` covers the rest of FSDP.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import linear_logprobs
from ..hidden_states import completion_hidden_states, output_head
from .rollout import Inputs, Rollout, take_sequences

SUPPRESSED_LOGIT = -1.0e4  # far enough below any real logit that e^(z - lse) is 0 in float32 and float64


def sampling_bias(vocab_size: int, suppressed_ids: Sequence[int], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """``(V,)``: 0 for the ids sampling may emit, -1e4 for the ids it suppresses, added to the LM head's logits.

    Sampling sets the logits of the suppressed ids (special tokens, head rows past the tokenizer) to -inf. In
    the loss they get -1e4 (divided by the temperature), whose probability is exactly 0 in float32 while
    every logit stays finite (0 x log p stays 0 in the entropies and the KL). So the loss's softmax is the
    sampling distribution, temperature applied (top_p < 1 aside): its log-probs, the ratio exp(l - l_old),
    both entropies and the perception KL are those of the distribution the responses were drawn from,
    whatever the tokenizer's layout, while the head is read as it is, never copied or sliced.
    """
    bias = torch.zeros(vocab_size, dtype=dtype, device=device)
    bias[list(suppressed_ids)] = SUPPRESSED_LOGIT
    return bias


class CompletionHiddenStates:
    """``(inputs, completion_length) -> (hidden, weight, bias)`` for ``model`` (a Hugging Face model, or one wrapped by
    accelerate).

    hidden ``(N, T, D)``: the final hidden states (after the final norm) at the positions that
    predict the T response tokens; weight ``(V, D)``: the LM head's weight itself; bias ``(V,)``: the
    head's bias, if it has one, plus ``sampling_bias``.
    """

    def __init__(self, model: nn.Module, sampling_bias: Tensor):
        self.model = model
        self.sampling_bias = sampling_bias

    def __call__(self, inputs: Inputs, completion_length: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        hidden = completion_hidden_states(self.model, inputs, completion_length)
        weight, bias = output_head(self.model)
        suppression = self.sampling_bias.to(weight.dtype)
        return hidden, weight, suppression if bias is None else bias + suppression


def sequence_inputs(rollout: Rollout, index: Tensor, masked: bool) -> Inputs:
    """Backbone inputs of prompt + response for the responses ``index``, on the clean or the masked image."""
    pixel_values = rollout.masked_pixel_values if masked else rollout.prompt["pixel_values"]
    prompt = take_sequences({**rollout.prompt, "pixel_values": pixel_values}, index)
    completion_ids = rollout.completion_ids[index]
    completion_mask = rollout.completion_mask[index].to(prompt["attention_mask"].dtype)
    inputs = dict(prompt)
    inputs["input_ids"] = torch.cat([prompt["input_ids"], completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompt["attention_mask"], completion_mask], dim=1)
    text = torch.zeros_like(completion_ids, dtype=prompt["mm_token_type_ids"].dtype)
    inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], text], dim=1)
    inputs["position_ids"] = rollout.position_ids[:, index]
    return inputs


def clean_and_masked_inputs(rollout: Rollout, index: Tensor) -> Inputs:
    """One batch of 2n sequences: the n clean ones, then the same n on their masked images."""
    clean, masked = sequence_inputs(rollout, index, masked=False), sequence_inputs(rollout, index, masked=True)
    # position_ids is (3, batch, length); everything else has the batch first.
    return {key: torch.cat([clean[key], masked[key]], dim=1 if key == "position_ids" else 0) for key in clean}


def head_tokens(completion_ids: Tensor, completion_mask: Tensor, sampling_bias: Tensor) -> Tensor:
    """Response ids for the loss, 0 at padding (a safe index the mask removes); refuses a sampled id the
    sampling bias suppresses."""
    tokens = completion_ids.where(completion_mask, 0)
    if bool((sampling_bias[tokens][completion_mask] < 0).any()):
        raise RuntimeError("a sampled response token is one that sampling suppresses; suppress_tokens and the "
                           "sampling bias disagree")
    return tokens


@torch.no_grad()
def response_logprobs(policy: CompletionHiddenStates, rollout: Rollout, temperature: float,
                      micro_batch_size: int, masked: bool = False) -> Tensor:
    """``(N, T)`` log-probs of the responses under ``policy`` (clean or masked image), 0 at padding."""
    parts = []
    for index in torch.arange(len(rollout)).split(micro_batch_size):
        mask = rollout.completion_mask[index]
        hidden, weight, bias = policy(sequence_inputs(rollout, index, masked), mask.shape[1])
        tokens = head_tokens(rollout.completion_ids[index], mask, policy.sampling_bias)
        logprobs = linear_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature).logprobs
        parts.append(logprobs.where(mask, 0.0))
    return torch.cat(parts)
