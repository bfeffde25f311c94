"""Shared set-up of the TRL integration tests: the offline tiny Qwen2-VL saved as a model folder, a data set of
synthetic colour prompts in TRL's conversational format, a reward, and the config fields every test shares."""

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from datasets import Dataset

from papo_kernels.trainer.data import synthetic_example, synthetic_words
from papo_kernels.trainer.tiny_model import END_OF_TURN, build_model, build_processor

IMAGE_SIZE = 56
NUM_GENERATIONS = 4
REPOSITORY = Path(__file__).parents[2]


def tiny_processor():
    """The tiny Qwen2-VL processor (built the same in every process)."""
    return build_processor(synthetic_words(["color"]), IMAGE_SIZE)


def build_processor_and_model_folder(folder: Path, seed: int = 0):
    """The tiny processor, and its model saved to ``folder`` (TRL loads the reference model from a path)."""
    processor = tiny_processor()
    build_model(processor.tokenizer, seed).save_pretrained(folder)
    return processor


def colour_dataset(num_prompts: int, seed: int = 0) -> Dataset:
    """``prompt`` (conversational, an image placeholder then the question), ``image`` and ``answer`` columns."""
    rng = random.Random(seed)
    examples = [synthetic_example("color", rng, IMAGE_SIZE) for _ in range(num_prompts)]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}]
                   for example in examples],
        "image": [example.image for example in examples],
        "answer": [example.answer for example in examples],
    })


def first_word_reward(completions: List[list], answer: List[str], **kwargs) -> List[float]:
    """1 when the completion's first word is the answer."""
    return [float(completion[0]["content"].split()[:1] == [expected])
            for completion, expected in zip(completions, answer)]


def length_reward(completions: List[list], **kwargs) -> List[float]:
    """The completion's length in characters: it varies within a group from the first step, so advantages do."""
    return [float(len(completion[0]["content"])) for completion in completions]


def common_fields(processor, output_dir: Path, **overrides) -> Dict:
    """Fields shared by GRPOConfig and PAPOConfig in these tests: CPU, no logging to disk, the special tokens
    other than end-of-turn never sampled (a sampled image token would break the next forward)."""
    tokenizer = processor.tokenizer
    suppressed = sorted(set(tokenizer.all_special_ids) - {tokenizer.convert_tokens_to_ids(END_OF_TURN)})
    fields = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  num_generations=NUM_GENERATIONS, max_completion_length=4, per_device_train_batch_size=4,
                  generation_kwargs={"suppress_tokens": suppressed}, seed=0, gradient_checkpointing=False)
    fields.update(overrides)
    return fields


def generation_rows(dataset: Dataset, num_prompts: int) -> List[dict]:
    """The rows TRL's sampler gives one generation batch: each of the first prompts ``NUM_GENERATIONS`` times."""
    return [dataset[index] for index in range(num_prompts) for _ in range(NUM_GENERATIONS)]


def current_logprobs(trainer, batch: dict, model=None) -> torch.Tensor:
    """The log-probs of the batch's response tokens under ``model`` (the trainer's own by default), by the
    trainer's ``_get_per_token_logps_and_entropies`` (TRL's own head, for a GRPOTrainer)."""
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model if model is None else model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1), batch["completion_ids"].size(1),
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            num_images=batch["num_images"], mm_token_type_ids=batch["mm_token_type_ids"])
    return logps


def parameter_gradients(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
            if parameter.grad is not None}


def run_in_two_processes(worker: Path, model_folder: Path, output_folder: Path, mixed_precision: str) -> List[dict]:
    """``worker MODEL_FOLDER OUTPUT_FOLDER`` in two CPU processes under ``accelerate launch`` (DDP over gloo); the
    ``rank<i>.pt`` each process wrote."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), str(worker.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(worker),
               str(model_folder), str(output_folder)]
    completed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    ranks = [torch.load(output_folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [result["processes"] for result in ranks] == [2, 2]
    return ranks
