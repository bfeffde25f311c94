"""One PAPOTrainer step per process of ``accelerate launch --use_deepspeed --zero_stage 3`` (two CPU processes,
DeepSpeed's CPU accelerator, gloo), for test_trl_zero3.py.

Usage: ``trl_zero3_worker.py MODEL_FOLDER OUTPUT_FOLDER``. PAPO-G's setting with loss_type "grpo" (its loss per
process does not depend on the number of processes, so one process can recompute it), two micro-batches of
accumulation, SGD without clipping. Each process writes ``rank<i>.pt``: the inputs and the loss of every
``_compute_loss`` call, every ``gathered_head`` call (with gradient or not, and whether the head was partitioned
then), and every weight after the step, gathered.
"""

import sys
from pathlib import Path

import deepspeed
import torch

import papo_kernels.integrations._trl_trainer as trl_trainer
from papo_kernels.hidden_states import gathered_head, unwrap_model
from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import colour_dataset, common_fields, length_reward, tiny_processor
from zero3_setup import skip_shared_memory_op_build

# What the test's one process uses too.
FIELDS = dict(loss_type="grpo", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, bf16=False,
              optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)


def trainer_fields(processor, output_dir: Path, **overrides) -> dict:
    return common_fields(processor, output_dir, **{**FIELDS, **overrides})


class RecordingPAPOTrainer(PAPOTrainer):
    """PAPOTrainer that keeps the inputs and the loss of each ``_compute_loss`` call."""

    losses = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.losses.append({"inputs": {key: value.clone() if isinstance(value, torch.Tensor) else value
                                       for key, value in inputs.items()},
                            "loss": loss.detach().clone()})
        return loss


def main(model_folder: str, output_folder: str) -> None:
    skip_shared_memory_op_build()
    gathers = []

    def recording_gathered_head(model):
        weight = unwrap_model(model).get_output_embeddings().weight
        gathers.append({"grad": torch.is_grad_enabled(), "partitioned": tuple(weight.shape) == (0,)})
        return gathered_head(model)

    trl_trainer.gathered_head = recording_gathered_head
    processor = tiny_processor()
    # use_cpu=False: accelerate's cpu=True drops DeepSpeed; gloo: accelerate finds no backend for DeepSpeed on CPU.
    args = PAPOConfig.from_preset("papo_g", **trainer_fields(processor, Path(output_folder) / "run", use_cpu=False,
                                                             ddp_backend="gloo"))
    trainer = RecordingPAPOTrainer(model=model_folder, reward_funcs=length_reward, args=args,
                                   train_dataset=colour_dataset(4), processing_class=processor)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {name: value.detach().clone() for name, value in model.named_parameters()}
    accelerator = trainer.accelerator
    torch.save({"processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                "zero_stage": accelerator.state.deepspeed_plugin.zero_stage, "losses": trainer.losses,
                "gathers": gathers, "weights": weights},
               Path(output_folder) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
