"""PAPOTrainer's loss and backward in two CPU processes under DDP (gloo), masked_forward "joint" then "sequential".

Usage: ``trl_masked_forward_worker.py MODEL_FOLDER OUTPUT_FOLDER`` under ``accelerate launch`` with 2 processes.
Each process prepares its own micro-batch (its own responses), wraps the model as the trainer does
(``accelerator.prepare_model``: DDP with TRL's settings, gradient checkpointing on, so every parameter must get
its gradient in each synchronised backward), and writes ``rank<i>.pt``: per mode the loss, the gradients after the
backward, and how many gradient buckets DDP all-reduced; and the gradients of the joint form without
synchronisation (``no_sync``), the process's own.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import colour_dataset, common_fields, generation_rows, length_reward, parameter_gradients, \
    tiny_processor


def main(model_folder: str, output_folder: str) -> None:
    processor = tiny_processor()
    args = PAPOConfig(**common_fields(processor, Path(output_folder) / "run", per_device_train_batch_size=4,
                                      bf16=False, gradient_checkpointing=True, gamma=0.5))
    dataset = colour_dataset(2)
    trainer = PAPOTrainer(model=model_folder, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rank = trainer.accelerator.process_index
    batch = trainer._prepare_inputs(generation_rows(dataset, 2)[4 * rank:4 * rank + 4])
    model = trainer.accelerator.prepare_model(trainer.model)
    all_reduces = []

    def counting_allreduce(state, bucket):
        all_reduces.append(bucket.index())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    result = {"processes": trainer.accelerator.num_processes, "local": {}}
    with model.no_sync():
        model.zero_grad()
        trainer.compute_loss(model, batch).backward()
        result["local"] = parameter_gradients(trainer.model)
    for mode in ("joint", "sequential"):
        trainer.args.masked_forward = mode
        model.zero_grad()
        all_reduces.clear()
        loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        result[mode] = {"loss": loss.item(), "gradients": parameter_gradients(trainer.model),
                        "all_reduces": list(all_reduces)}
    torch.save(result, Path(output_folder) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
