"""Small settings shared by the trainer tests: a few prompts, short responses, one thread."""

from papo_kernels.trainer import TrainerConfig


def small_config(output_dir, **overrides) -> TrainerConfig:
    values = dict(output_dir=str(output_dir), steps=2, prompts_per_step=4, group_size=4, max_new_tokens=3,
                  eval_every=0, save_every=0, num_threads=1, micro_batch_size=8)
    values.update(overrides)
    return TrainerConfig(**values)
