"""The policy's forward for training: final hidden states of the response positions, never the logits.

``CompletionHiddenStates`` runs a Qwen2-VL-family model, possibly wrapped by
accelerate (DDP, FSDP2), through its own forward with
``hidden_states.completion_hidden_states``: a pre-hook on the LM head takes the final
hidden states and hands the head an empty slice, so no (tokens x vocabulary) logits
are built. The head's weight is returned beside them and the fused loss applies it
tile by tile; it is a view of the head's first rows, never a copy (``head_rows`` says
how many rows, and under which distribution the log-probs and the ratio are taken).

Because the pass is the wrapper's own forward, DDP sees it, and FSDP2 gathers every
unit's shards in its hooks as the model runs: the head's unit (accelerate gives the
final norm and the head one that stays gathered after the forward) holds the full
weight when ``output_head`` reads it, and ``output_head`` gathers a head that is still
sharded. ``sharding.py`` covers the rest of FSDP.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import linear_logprobs
from ..hidden_states import completion_hidden_states, output_head
from .rollout import Inputs, Rollout, take_sequences


def head_rows(sampled_ids: Tensor, vocab_size: int) -> int:
    """How many leading rows of the LM head (``vocab_size`` rows) the loss uses.

    ``sampled_ids`` (ascending) are the ids sampling may emit (special tokens are suppressed).

    - When they are exactly ``0 .. k-1`` (``tiny_model.build_tokenizer(special_tokens_last=True)``:
      the words, then end-of-turn, then the other control tokens), the loss uses the first k rows: a softmax
      over exactly the tokens sampling draws from, so the log-probs l, the ratio
      exp(l - l_old), the entropies and the perception KL are those of the sampling
      distribution (temperature applied; top_p < 1 aside).
    - Otherwise it uses all ``vocab_size`` rows: log-probs under the full-vocabulary softmax,
      suppressed tokens (and head rows past the tokenizer) included, while sampling
      renormalises over the unsuppressed ones. Then l = log p_sample(y) + log(1 - S), S being
      the full softmax's mass on the suppressed ids; the ratio exp(l - l_old) compares two
      full-softmax policies and equals the sampling ratio times (1 - S) / (1 - S_old), the
      same when the suppressed mass did not move; entropies and KL are full-vocabulary too.
      Qwen2-VL and Qwen2.5-VL take this case (their suppressed <|im_start|>, id 151644, sits
      between <|endoftext|>, 151643, and the end-of-turn <|im_end|>, 151645), and so does the
      offline default, whose tiny tokenizer puts the control tokens first.

    Either way the weight the loss reads is ``head.weight[:rows]``, a view, never a copy.
    """
    k = sampled_ids.numel()
    if torch.equal(sampled_ids.cpu(), torch.arange(k)):
        return k
    return vocab_size


class CompletionHiddenStates:
    """``(inputs, completion_length) -> (hidden, weight, bias)`` for ``model`` (a Hugging Face model, or one wrapped by
    accelerate).

    hidden ``(N, T, D)``: the final hidden states (after the final norm) at the positions that
    predict the T response tokens; weight ``(rows, D)`` and bias ``(rows,)`` (or None): views of
    the LM head's first ``rows`` rows (see ``head_rows``), sharing its storage.
    """

    def __init__(self, model: nn.Module, rows: int):
        self.model = model
        self.rows = rows

    def __call__(self, inputs: Inputs, completion_length: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        hidden = completion_hidden_states(self.model, inputs, completion_length)
        weight, bias = output_head(self.model)
        return hidden, weight[:self.rows], None if bias is None else bias[:self.rows]


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


def head_tokens(completion_ids: Tensor, completion_mask: Tensor, rows: int) -> Tensor:
    """Response ids as rows of the head the loss reads (its first ``rows``); 0 at padding (a safe index the mask
    removes)."""
    tokens = completion_ids.where(completion_mask, 0)
    if bool((tokens >= rows).any()):
        raise RuntimeError("a sampled response token is outside the trained vocabulary; suppress_tokens and the "
                           "trained vocabulary disagree")
    return tokens


@torch.no_grad()
def response_logprobs(policy: CompletionHiddenStates, rollout: Rollout, rows: int, temperature: float,
                      micro_batch_size: int, masked: bool = False) -> Tensor:
    """``(N, T)`` log-probs of the responses under ``policy`` (clean or masked image), 0 at padding."""
    parts = []
    for index in torch.arange(len(rollout)).split(micro_batch_size):
        mask = rollout.completion_mask[index]
        hidden, weight, bias = policy(sequence_inputs(rollout, index, masked), mask.shape[1])
        tokens = head_tokens(rollout.completion_ids[index], mask, rows)
        logprobs = linear_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature).logprobs
        parts.append(logprobs.where(mask, 0.0))
    return torch.cat(parts)
