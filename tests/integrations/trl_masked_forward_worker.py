"""PAPOTrainer's loss and backward in two CPU processes under DDP (gloo), masked_forward "joint" then "sequential".

Usage: ``trl_masked_forward_worker.py MODEL_FOLDER OUTPUT_FOLDER`` under ``accelerate launch`` with 2 processes.
Each process prepares its own micro-batch (its own responses) and wraps the model as the trainer does
(``accelerator.prepare_model``, gradient checkpointing on), once with DDP's ``find_unused_parameters=True`` (TRL's
setting for vision-language models) and once with False (where every parameter must get its gradient in each
synchronised backward). It writes ``rank<i>.pt``: per setting and mode the loss, the gradients after the backward
and the gradient buckets DDP all-reduced; and the joint form's gradients under ``no_sync``, the process's own.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import colour_dataset, common_fields, generation_rows, length_reward, parameter_gradients, \
    tiny_processor


def losses_and_gradients(model_folder: str, output_folder: str, find_unused_parameters: bool) -> dict:
    processor = tiny_processor()
    args = PAPOConfig(**common_fields(processor, Path(output_folder) / "run", per_device_train_batch_size=4,
                                      bf16=False, gradient_checkpointing=True, gamma=0.5,
                                      ddp_find_unused_parameters=find_unused_parameters))
    dataset = colour_dataset(2)
    trainer = PAPOTrainer(model=model_folder, reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.model.train()
    trainer.model.activation_checkpointing_enable(args.activation_checkpointing_kwargs)  # as Trainer.train() does
    trainer.current_gradient_accumulation_steps = 1
    rank = trainer.accelerator.process_index
    batch = trainer._prepare_inputs(generation_rows(dataset, 2)[4 * rank:4 * rank + 4])
    model = trainer.accelerator.prepare_model(trainer.model)
    assert model.find_unused_parameters is find_unused_parameters
    all_reduces = []

    def counting_allreduce(state, bucket):
        all_reduces.append(bucket.index())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_allreduce)
    result = {}
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
    return result


def main(model_folder: str, output_folder: str) -> None:
    results = {find_unused: losses_and_gradients(model_folder, output_folder, find_unused) for find_unused in
               (True, False)}
    rank = torch.distributed.get_rank()
    torch.save({"processes": torch.distributed.get_world_size(), **results}, Path(output_folder) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
