"""Shared by the trainer tests: small settings (a few prompts, short responses, one thread) and rollout slicing."""

import dataclasses

from papo_kernels.trainer import TrainerConfig
from papo_kernels.trainer.rollout import take_blocks, take_sequences


def small_config(output_dir, **overrides) -> TrainerConfig:
    values = dict(output_dir=str(output_dir), steps=2, prompts_per_step=4, group_size=4, max_new_tokens=3,
                  eval_every=0, save_every=0, num_threads=1, micro_batch_size=8)
    values.update(overrides)
    return TrainerConfig(**values)


def subset(rollout, index):
    """The responses ``index`` of ``rollout`` as a rollout of their own."""
    prompt = take_sequences(rollout.prompt, index)
    masked = take_blocks(rollout.masked_pixel_values, rollout.prompt["image_grid_thw"], index)
    return dataclasses.replace(rollout, prompt=prompt, masked_pixel_values=masked,
                               completion_ids=rollout.completion_ids[index],
                               completion_mask=rollout.completion_mask[index],
                               position_ids=rollout.position_ids[:, index],
                               texts=[rollout.texts[i] for i in index.tolist()],
                               answers=[rollout.answers[i] for i in index.tolist()])
