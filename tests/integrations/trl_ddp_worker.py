"""One PAPOTrainer run per process of ``accelerate launch`` (DDP over gloo on CPU), for test_trl_ddp.py.

Usage: ``trl_ddp_worker.py MODEL_FOLDER OUTPUT_FOLDER``. Each process writes ``rank<i>.pt``: the masked images
of its samples per rollout, the local metrics of every papo_loss call, the logged metrics, the initial and final weights.
"""

import sys
from pathlib import Path

import torch

import papo_kernels.integrations._trl_trainer as trl_trainer
from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import colour_dataset, common_fields, length_reward, tiny_processor


class RecordingPAPOTrainer(PAPOTrainer):
    """PAPOTrainer that keeps each rollout's masked and clean pixel_values and the samples' global positions."""

    rollouts = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        first = self.accelerator.process_index * len(inputs)
        self.rollouts.append({"positions": list(range(first, first + len(inputs))),
                              "masked": [rows.clone() for rows in output["masked_pixel_values"]],
                              "clean": output["pixel_values"].clone()})
        return output


def main(model_folder: str, output_folder: str) -> None:
    local_metrics = []
    papo_loss = trl_trainer.papo_loss

    def record_metrics(*args, **kwargs):
        loss, metrics = papo_loss(*args, **kwargs)
        local_metrics.append({name: value.item() for name, value in metrics.items()})
        return loss, metrics

    trl_trainer.papo_loss = record_metrics
    processor = tiny_processor()
    # Two processes of 2 samples each hold one prompt's 4 responses: every group spans both processes.
    args = PAPOConfig.from_preset("papo_d", **common_fields(processor, Path(output_folder) / "run", max_steps=2,
                                                            per_device_train_batch_size=2, bf16=True))
    trainer = RecordingPAPOTrainer(model=model_folder, reward_funcs=length_reward, args=args,
                                   train_dataset=colour_dataset(4), processing_class=processor)
    initial = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"processes": trainer.accelerator.num_processes, "rollouts": trainer.rollouts,
                "local_metrics": local_metrics, "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
                "initial": initial,
                "weights": {name: value.detach().clone() for name, value in trainer.model.named_parameters()}},
               Path(output_folder) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
