"""Final hidden states at the completion positions, through a (wrapped) model's own forward.

``papo_loss`` needs the hidden states the LM head would see and the head's weight,
not the logits. Calling a backbone directly (``model.module.model(...)``) would
bypass the wrapper's forward: DDP would then not average the gradients of that
pass (FSDP would not gather its shards). ``completion_hidden_states`` calls the
model as a whole instead, with a forward pre-hook on the output embeddings that
takes the head's input (the final hidden states, after the final norm, whatever the
architecture) and hands the head an empty slice, so no logits are computed; the
model's ``logits_to_keep`` keeps only the positions that are needed.
"""

import inspect
from typing import Mapping, Optional, Tuple

from torch import Tensor, nn

from ._checks import check_int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP-style wrappers (their ``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _output_embeddings(model: nn.Module) -> nn.Module:
    """The LM head, refused where ``hidden @ head.weight.T + head.bias`` is not what it computes (an adapter
    over it) or where its weight is not there to read (partitioned)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"model: {type(inner).__name__} has no output embeddings with a weight "
                         "(get_output_embeddings()); a causal LM head is needed")
    base = getattr(head, "base_layer", None)
    if isinstance(base, nn.Module):  # PEFT's tuner layers (LoRA and the like) wrap the layer they adapt
        raise ValueError(f"model: its LM head is an adapter layer ({type(head).__name__} over "
                         f"{type(base).__name__}, a PEFT tuner such as LoRA), whose output is not hidden @ "
                         "weight.T + bias, so papo_loss would leave the adapter out; keep lm_head out of the "
                         "adapter's target_modules (modules_to_save=['lm_head'] trains the whole head and works)")
    if head.weight.numel() == 0:
        raise ValueError(f"model: its LM head's weight is empty (shape {tuple(head.weight.shape)}): it is "
                         "partitioned outside the model's forward (DeepSpeed ZeRO-3 does this), and papo_loss "
                         "needs the whole weight; use FSDP2 or ZeRO stage 1 or 2")
    return head


def output_head(model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight (V, D), bias (V,) or None)`` of the model's LM head, for ``papo_loss``.

    Sharded parameters (FSDP2 ``DTensor``) are gathered with ``full_tensor()``, which keeps
    the gradient path to the shards.
    """
    head = _output_embeddings(model)

    def full(value: Optional[Tensor]) -> Optional[Tensor]:
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    return full(head.weight), full(getattr(head, "bias", None))


def completion_hidden_states(model: nn.Module, inputs: Mapping[str, Tensor], completion_length: int) -> Tensor:
    """``(B, T, D)`` final hidden states at the positions that predict the last T tokens of ``input_ids``.

    Row t is the hidden state the LM head turns into the logits of token ``input_ids[:, -T + t]``
    (position ``L - T - 1 + t`` of the sequence of length L): with ``weight, bias = output_head(model)``,
    ``hidden @ weight.T + bias`` equals ``model(**inputs).logits[:, -T - 1:-1]``, without computing them.

    Args:
        model: a causal LM (Hugging Face style, with ``get_output_embeddings()``), possibly wrapped in
            DDP or another wrapper whose ``.module`` is the model; called through its own forward.
        inputs: keyword arguments of the forward: ``input_ids`` (B, L) of prompt + completion,
            ``attention_mask`` and any multimodal inputs (``pixel_values``, ``image_grid_thw``...).
        completion_length: T, the number of completion tokens at the end of ``input_ids``; 1 <= T < L.
    """
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must hold input_ids, got keys {sorted(inputs)}")
    length = inputs["input_ids"].shape[-1]
    completion_length = check_int("completion_length", completion_length, low=1, high=length - 1)
    head = _output_embeddings(model)
    captured = []

    def take_hidden_states(module, args):
        captured.append(args[0])
        return (args[0][:, :0],) + tuple(args[1:])

    forward_parameters = inspect.signature(unwrap_model(model).forward).parameters
    keep = {"logits_to_keep": completion_length + 1} if "logits_to_keep" in forward_parameters else {}
    handle = head.register_forward_pre_hook(take_hidden_states)
    try:
        model(**inputs, **keep, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the LM head of {type(unwrap_model(model)).__name__} ran {len(captured)} times in one "
                           "forward; completion_hidden_states needs exactly one call")
    hidden = captured[0]
    if hidden.dim() != 3 or hidden.shape[1] < completion_length + 1:
        raise RuntimeError(f"the LM head received hidden states of shape {tuple(hidden.shape)}; expected "
                           f"(B, >= {completion_length + 1}, D)")
    return hidden[:, -completion_length - 1:-1]
