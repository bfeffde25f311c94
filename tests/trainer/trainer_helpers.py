"""Shared by the trainer tests: small settings (a few prompts, short responses, one thread), rollout slicing, and
two CPU processes under `accelerate launch`."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from papo_kernels.trainer import TrainerConfig
from papo_kernels.trainer.data import synthetic_words
from papo_kernels.trainer.policy import sequence_inputs
from papo_kernels.trainer.rollout import take_blocks, take_sequences
from papo_kernels.trainer.tiny_model import build_model, build_processor


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


def sampling_logits_and_logprobs(trainer, rollout, temperature: float):
    """From the model's own full logits: the completion positions' logits over ``temperature``, and the response
    log-probs under the sampling distribution (the suppressed ids' logits at -inf), 0 where the mask is off."""
    with torch.no_grad():
        logits = trainer.model(**sequence_inputs(rollout, torch.arange(len(rollout)), False)).logits
    length = rollout.completion_ids.shape[1]
    scaled = logits[:, -length - 1:-1] / temperature
    sampled = scaled.clone()
    sampled[..., trainer.suppress_ids] = float("-inf")
    logprobs = torch.log_softmax(sampled, dim=-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    return scaled, logprobs.where(rollout.completion_mask, 0.0)


REPOSITORY = Path(__file__).parents[2]


def save_model_folder(folder: Path, model_type: str, seed: int = 1) -> Path:
    """A local Hugging Face folder of the tiny ``model_type`` model with its tokenizer, image processor and chat
    template, for the colour task's words."""
    processor = build_processor(synthetic_words(["color"]), 56)
    build_model(processor.tokenizer, seed, model_type).save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    return folder


def launch_two_processes(worker: Path, output_dir: Path) -> dict:
    """Run ``worker output_dir`` in two CPU processes (gloo) under `accelerate launch`; return the
    ``output_dir/result.pt`` that its process 0 wrote."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker),
               str(output_dir)]
    # The workers import this checkout's package, whatever is installed.
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    completed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return torch.load(output_dir / "result.pt", weights_only=False)


def assert_same_update(one: dict, two: dict) -> None:
    """``update_on_fixed_rollout``'s results of one process and of two: the same rollout, loss and gradient."""
    assert (one["processes"], two["processes"]) == (1, 2)
    assert torch.equal(one["completion_ids"], two["completion_ids"]), "both runs must train on the same rollout"
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-7)
    scale = one["gradient"].abs().max()
    assert scale > 0
    torch.testing.assert_close(two["gradient"], one["gradient"], rtol=1e-4, atol=1e-6 * scale)
