"""accelerate's FSDP2 on two CPU processes (gloo): the refusals, one update, a checkpoint and its resume.

Run by test_trainer_fsdp.py under `accelerate launch`. accelerate turns FSDP on only for GPU
process groups (its state sets the FSDP distributed type for the multi-GPU kinds alone), so
this worker sets it on the CPU state after construction: distributed type FSDP and an FSDP2
plugin with accelerate's transformer-based wrapping. Everything after that is accelerate's and
torch's own code (accelerate's fully_shard of the model and its carving of the embeddings and
the head into units, its no_sync, clipping and reduce) driven by the trainer's update,
sampling, checkpoint and resume. Process 0 writes ``OUTPUT_DIR/result.pt``.
"""

import dataclasses
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))

from papo_kernels.trainer import Trainer  # noqa: E402
from papo_kernels.trainer.errors import TrainerInputError  # noqa: E402
from ddp_worker import full, update_on_fixed_rollout  # noqa: E402
from trainer_helpers import small_config  # noqa: E402


def use_fsdp(accelerator: Accelerator, version: int) -> None:
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version,
                                                                   auto_wrap_policy="transformer_based_wrap")


def refusal(config, accelerator) -> str:
    try:
        Trainer(config, accelerator=accelerator)
    except TrainerInputError as error:
        return str(error)
    return "accepted"


def state_of(trainer: Trainer):
    """Full weights and AdamW first moments of the trained model, by parameter name."""
    weights, moments = {}, {}
    for name, parameter in trainer.model.named_parameters():
        weights[name] = full(parameter.detach()).clone()
        moments[name] = full(trainer.optimizer.state[parameter]["exp_avg"]).clone()
    return weights, moments


def main(output_dir: Path) -> None:
    accelerator = Accelerator(cpu=True)
    use_fsdp(accelerator, version=1)
    refusals = {"fsdp_version 1": refusal(small_config(output_dir / "refused", eval_every=0), accelerator)}
    use_fsdp(accelerator, version=2)
    refusals["eval_every 1"] = refusal(small_config(output_dir / "refused", eval_every=1), accelerator)

    # No clipping, so the gradients compare as computed; 4 responses per micro-batch, so accumulation runs too.
    config = small_config(output_dir / "run", micro_batch_size=4, max_grad_norm=1e9, eval_every=0,
                          lr_schedule="constant")
    trainer = Trainer(config, accelerator=accelerator)
    sharded = sorted(name for name, parameter in trainer.model.named_parameters() if isinstance(parameter, DTensor))
    result = update_on_fixed_rollout(trainer)
    if accelerator.is_main_process:  # step 0's record, as train() writes it before the save: a resume reads it
        trainer.metrics_log.start()
        trainer.metrics_log.write({"step": 0})
    trainer.save(1)
    saved = state_of(trainer)
    trainer.close()  # the output directory is the resumed run's now
    resumed = Trainer(dataclasses.replace(config, steps=2), resume=True, accelerator=accelerator)
    restored = state_of(resumed)
    if accelerator.is_main_process:
        torch.save({**result, "refusals": refusals, "sharded": sharded,
                    "parameters": [name for name, _ in trainer.model.named_parameters()],
                    "saved": saved, "restored": restored}, output_dir / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
