"""Final hidden states at the completion positions, through a (wrapped) model's own forward.

``papo_loss`` needs the hidden states the LM head would see and the head's weight,
not the logits. Calling a backbone directly (``model.module.model(...)``) would
bypass the wrapper's forward: DDP would then not average the gradients of that
pass (FSDP would not gather its shards). ``completion_hidden_states`` calls the
model as a whole instead, with a forward pre-hook on the output embeddings that
takes the head's input (the final hidden states, after the final norm, whatever the
architecture) and hands the head an empty slice, so no logits are computed; the
model's ``logits_to_keep`` keeps only the positions that are needed.

``output_head`` hands the head's weight and bias to the loss. Under DeepSpeed ZeRO-3 a
parameter is a placeholder of shape (0,) outside its module's forward; ``gathered_head``
gathers the head (``deepspeed.zero.GatheredParameters``) and must stay open until the
loss's backward has run, since autograd accumulates the weight's gradient into the full
(V, D) parameter, from which ZeRO-3 reduce-scatters it to the partitions. Every forward
of the model for that loss must run before the gather opens: the head's own post-forward
hook partitions it again, even inside the context::

    hidden = completion_hidden_states(model, inputs, completion_length)  # every forward first
    with gathered_head(model) as (weight, bias):
        loss, metrics = papo_loss(hidden, weight, ..., bias=bias)
        loss.backward()  # engine.backward(loss) / accelerator.backward(loss), which may also step

Without ZeRO-3 (plain, DDP, FSDP2) ``gathered_head`` gathers nothing and gives
``output_head(model)``.
"""

import inspect
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Tuple

from torch import Tensor, nn

from ._checks import check_int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP-style wrappers (their ``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _output_embeddings(model: nn.Module) -> nn.Module:
    """The LM head, refused where ``hidden @ head.weight.T + head.bias`` is not what it computes (an adapter
    over it)."""
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
    return head


def _is_zero3(value: Optional[Tensor]) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(value, "ds_id")


def _is_partitioned(value: Optional[Tensor]) -> bool:
    """True for a ZeRO-3 parameter that is not gathered on this process now (its placeholder has shape (0,))."""
    if not _is_zero3(value):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return value.ds_status != ZeroParamStatus.AVAILABLE


def _refuse_release_before_backward(parameter: Tensor, grad: Tensor) -> None:
    """Gradient hook on the tensor ``output_head`` hands out for a gathered ZeRO-3 parameter: the backward reaches
    it before autograd accumulates into the parameter, which must still hold its full shape then."""
    if _is_partitioned(parameter):
        raise RuntimeError(f"the backward reached the LM head's {tuple(parameter.ds_shape)} parameter after its "
                           "DeepSpeed ZeRO-3 gather ended, so its gradient cannot reach the partitions; keep "
                           "`with gathered_head(model)` open until the loss's backward has run")


def output_head(model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight (V, D), bias (V,) or None)`` of the model's LM head, for ``papo_loss``.

    Sharded parameters (FSDP2 ``DTensor``) are gathered with ``full_tensor()``, which keeps
    the gradient path to the shards. A DeepSpeed ZeRO-3 head must be gathered already
    (inside ``gathered_head``, which gives these same tensors); it is then handed out as
    a view that refuses, in the backward, to pass a gradient to a head gathered no more.
    """
    head = _output_embeddings(model)

    def full(name: str, value: Optional[Tensor]) -> Optional[Tensor]:
        if _is_partitioned(value):
            raise ValueError(f"model: its LM head's {name} {tuple(value.ds_shape)} is partitioned by DeepSpeed "
                             "ZeRO-3 (an empty placeholder outside the module's forward); read the head inside "
                             "`with gathered_head(model) as (weight, bias):`, held until the loss's backward has run")
        if _is_zero3(value):
            view = value.view_as(value)
            if view.requires_grad:
                view.register_hook(lambda grad: _refuse_release_before_backward(value, grad))
            return view
        if value is not None and value.numel() == 0:
            raise ValueError(f"model: its LM head's {name} is empty (shape {tuple(value.shape)}), partitioned "
                             "outside the model's forward; papo_loss needs the whole tensor")
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    return full("weight", head.weight), full("bias", getattr(head, "bias", None))


@contextmanager
def gathered_head(model: nn.Module) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """``output_head(model)``, with a DeepSpeed ZeRO-3 head gathered on every process for the duration.

    Under ZeRO-3 this is a collective (every process of the group enters it, in the same
    order) and must be held until the loss's backward has run, and it must open after every
    forward of the model that the loss uses (see the module's docstring). A head that is
    already gathered (in an enclosing ``GatheredParameters``) is not gathered again.
    Without ZeRO-3 nothing is gathered here (FSDP2 shards are gathered by ``output_head``).
    """
    head = _output_embeddings(model)
    partitioned = [value for value in (head.weight, getattr(head, "bias", None)) if _is_partitioned(value)]
    if not partitioned:
        yield output_head(model)
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned):
        yield output_head(model)


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
    # First of the head's pre-hooks: its input as the model gives it. After DeepSpeed ZeRO-3's pre-hook, the input
    # taken would carry ZeRO-3's hooks for the head's own backward, which then fails ("active_backward_submodules is
    # empty during backward pass").
    handle = head.register_forward_pre_hook(take_hidden_states, prepend=True)
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
