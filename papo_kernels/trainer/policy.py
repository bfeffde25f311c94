"""The policy's forward for training: final hidden states of the response positions, never the logits.

``CompletionHiddenStates`` wraps a Qwen2-VL-family model and calls its backbone
(``model.model``), not its LM head, so no (tokens x vocabulary) logits tensor is
built; the head's weight is returned beside the hidden states and the fused loss
applies it tile by tile. The head is restricted to the tokens sampling can emit
(special tokens are suppressed at generation), so training and sampling use the
same distribution.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import linear_logprobs
from .rollout import Inputs, Rollout, take_sequences


class CompletionHiddenStates(nn.Module):
    """``forward(inputs, completion_length) -> (hidden, weight, bias)``.

    hidden ``(N, T, D)``: the backbone's final hidden states (after the final norm) at the
    positions that predict the T response tokens; weight ``(V', D)`` and bias ``(V',)`` (or
    None): the LM head's rows of ``vocabulary``, the token ids the policy may sample.
    """

    def __init__(self, model: nn.Module, vocabulary: Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("vocabulary", vocabulary, persistent=False)

    def forward(self, inputs: Inputs, completion_length: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        output = self.model.model(**inputs, use_cache=False)
        # Position t - 1 predicts token t: the last completion_length + 1 positions, less the final one.
        hidden = output.last_hidden_state[:, -completion_length - 1:-1]
        head = self.model.get_output_embeddings()
        bias = None if head.bias is None else head.bias[self.vocabulary]
        return hidden, head.weight[self.vocabulary], bias


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


def vocabulary_index(vocabulary: Tensor, vocab_size: int) -> Tensor:
    """``(vocab_size,)`` long: the position of each token id in ``vocabulary``, -1 for ids outside it."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[vocabulary] = torch.arange(vocabulary.numel())
    return index


def head_tokens(completion_ids: Tensor, completion_mask: Tensor, token_index: Tensor) -> Tensor:
    """Response ids as rows of the restricted head; 0 at padding (a safe index the mask removes)."""
    tokens = token_index[completion_ids].where(completion_mask, 0)
    if bool((tokens < 0).any()):
        raise RuntimeError("a sampled response token is outside the trained vocabulary; suppress_tokens and the "
                           "trained vocabulary disagree")
    return tokens


@torch.no_grad()
def response_logprobs(policy: CompletionHiddenStates, rollout: Rollout, token_index: Tensor, temperature: float,
                      micro_batch_size: int, masked: bool = False) -> Tensor:
    """``(N, T)`` log-probs of the responses under ``policy`` (clean or masked image), 0 at padding."""
    rows = []
    for index in torch.arange(len(rollout)).split(micro_batch_size):
        mask = rollout.completion_mask[index]
        hidden, weight, bias = policy(sequence_inputs(rollout, index, masked), mask.shape[1])
        tokens = head_tokens(rollout.completion_ids[index], mask, token_index)
        logprobs = linear_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature).logprobs
        rows.append(logprobs.where(mask, 0.0))
    return torch.cat(rows)
