"""What FSDP (accelerate's FSDP2: torch's ``fully_shard``) changes for the trainer: sampling and full checkpoints.

accelerate shards the Hugging Face model in place: each decoder and vision block is a
unit, the input embeddings another, the final norm and the LM head a unit that stays
gathered after the forward, and the rest (the vision patch embedding and merger,
among others) the root's. A training pass runs the model's own forward
(``policy.CompletionHiddenStates``), so FSDP's hooks gather each unit as it runs; the
head is read after the forward, gathered (``policy.py``), and its gradient reaches the
shards in the backward.

What is left is here:

- sampling: transformers' ``generate`` runs the vision encoder before the model's
  forward, outside the root's hooks, so ``gathered_root`` gathers the root's unit around
  it; and FSDP2 takes the first unit whose forward runs as its root, so
  ``initialise_root`` runs one forward of a single token through the model first;
- checkpoints hold full tensors: ``full_state`` gathers the model and optimizer state
  on every process (a collective) into plain tensors on the CPU, ``load_full_*_state``
  load such state into sharded or plain modules. The same format, keyed by parameter
  name, is written with and without FSDP, so a run may resume under another
  data-parallel strategy with the same number of processes;
- FSDP version 1 (accelerate's default ``fsdp_version``) is refused, and so is
  evaluation under FSDP, which runs on the main process only and cannot drive a
  sharded model.

DeepSpeed is refused (FSDP2 shards the same way here; ``PAPOTrainer`` in
``integrations.trl`` runs under ZeRO-3): its engine steps inside ``backward`` on a fixed
accumulation count where a minibatch here has a varying number of micro-batches, clips by
its own config, keeps the optimizer state partitioned where checkpoints hold full state
by parameter name, and the main-process evaluation could not drive a ZeRO-3 model.
accelerate's ``cpu=True``, which the trainer sets without a GPU, would drop DeepSpeed
silently and train plain data parallel, so the launch's request is refused as well.
"""

import os
from contextlib import contextmanager
from typing import Any, Dict, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from .config import TrainerConfig
from .errors import TrainerInputError

# Full (unsharded) tensors, moved to the CPU; with FSDP only the main process receives them.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD_FULL_STATE = StateDictOptions(full_state_dict=True)
LOCAL_STATE = StateDictOptions()  # each process's shards as they are, for the names


def check_strategy(accelerator: Accelerator, config: TrainerConfig) -> None:
    """Refuse what the trainer cannot do under the accelerator's FSDP setting, naming the setting, and DeepSpeed."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED \
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise TrainerInputError("accelerate DeepSpeed: papo-train does not run under DeepSpeed; launch with "
                                "--use_fsdp --fsdp_version 2 (sharded like ZeRO-3), or use PAPOTrainer "
                                "(papo_kernels.integrations.trl), which runs under ZeRO-3")
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise TrainerInputError("accelerate FSDP: fsdp_version 1 is not supported; launch with --fsdp_version 2 "
                                "(torch's fully_shard)")
    if config.eval_every:
        raise TrainerInputError(f"config field 'eval_every': got {config.eval_every}, but evaluation runs on the "
                                "main process only, which cannot run a model sharded by FSDP; give 0 under FSDP")


def initialise_root(model: nn.Module, token_id: int) -> None:
    """Under FSDP, make ``model`` FSDP2's root: one forward of the single token ``token_id`` (no image) without
    gradient, then every unit resharded (the head's unit stays gathered after a forward otherwise). A no-op for a
    plain or DDP model."""
    if not isinstance(model, FSDPModule):
        return
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.tensor([[token_id]], device=device), use_cache=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def gathered_root(model: nn.Module):
    """Under FSDP, the root unit's parameters gathered for the duration (the blocks gather themselves as they run);
    a no-op for a plain or DDP model."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(model state, optimizer state)`` of ``model`` (unwrapped) with full tensors on the CPU, keyed by parameter
    name; every process must call it (FSDP gathers the shards), and under FSDP only the main process gets the
    tensors."""
    return (get_model_state_dict(model, options=FULL_STATE),
            get_optimizer_state_dict(model, optimizer, options=FULL_STATE))


def load_full_model_state(model: nn.Module, model_state: Dict[str, torch.Tensor]) -> None:
    """Load ``full_state``'s model state (given to every process), sharding it under FSDP. Every tensor of the
    model must be in it: ``set_model_state_dict`` raises for unexpected keys but loads past missing ones, which
    would leave those weights as the fresh model has them."""
    expected = get_model_state_dict(model, options=LOCAL_STATE).keys()  # names only: nothing is gathered
    missing = sorted(set(expected) - set(model_state))
    if missing:
        raise RuntimeError(f"Missing key(s) in state_dict: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    set_model_state_dict(model, model_state, options=LOAD_FULL_STATE)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              optimizer_state: Dict[str, Any]) -> None:
    """Load ``full_state``'s optimizer state (given to every process), sharding it under FSDP."""
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=LOAD_FULL_STATE)
