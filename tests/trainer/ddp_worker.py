"""One update on a fixed global rollout, run by test_trainer_ddp.py and test_trainer_fsdp.py in one process or
under `accelerate launch`.

Every process samples the same global rollout (same weights, same seed), keeps its
slice of the responses and runs ``Trainer.update``; process 0 saves the synchronised
gradient and the global loss to ``OUTPUT_DIR/result.pt``, beside the run's checkpoint.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from papo_kernels.trainer import Trainer  # noqa: E402
from papo_kernels.trainer.rollout import encode_prompts, masked_pixel_values, roll_out  # noqa: E402
from trainer_helpers import small_config, subset  # noqa: E402


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP2 shard (DTensor) gathered with full_tensor(), which every process must call."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def update_on_fixed_rollout(trainer: Trainer) -> dict:
    accelerator = trainer.accelerator
    torch.manual_seed(1234)
    examples = trainer.dataset.batch(0, trainer.config.prompts_per_step)
    prompt = encode_prompts(trainer.processor, examples)
    masked = masked_pixel_values(trainer.processor, examples, prompt, "image", 14, 0.6,
                                 torch.Generator().manual_seed(0))
    with trainer.sampling():
        rollout = roll_out(trainer.model, trainer.processor, examples, trainer.config.group_size, masked, prompt,
                           max_new_tokens=3, temperature=1.0, top_p=1.0, suppress_ids=trainer.suppress_ids,
                           eos_ids=trainer.eos_ids, pad_id=trainer.pad_id)
    advantages = torch.linspace(-1.0, 1.0, len(rollout))
    share = len(rollout) // accelerator.num_processes
    index = torch.arange(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    metrics = trainer.update(subset(rollout, index), advantages[index], step=0)
    loss = accelerator.reduce(torch.tensor(metrics["loss"]), "mean")
    gradient = torch.cat([full(p.grad).reshape(-1) for p in trainer.model.parameters()])
    return {"loss": loss, "gradient": gradient, "completion_ids": rollout.completion_ids,
            "processes": accelerator.num_processes}


def one_update(output_dir) -> dict:
    """``update_on_fixed_rollout`` of a new trainer, whose checkpoint is then written to ``output_dir``."""
    # No clipping, so the gradients compare as computed; 4 responses per micro-batch, so accumulation runs too.
    trainer = Trainer(small_config(output_dir, micro_batch_size=4, max_grad_norm=1e9))
    result = update_on_fixed_rollout(trainer)
    trainer.save(1)
    return result


if __name__ == "__main__":
    result = one_update(sys.argv[1])
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        torch.save(result, Path(sys.argv[1]) / "result.pt")
