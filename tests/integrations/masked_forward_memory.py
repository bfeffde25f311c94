"""Peak memory and time of one PAPOTrainer loss and backward, masked_forward="joint" against "sequential".

The peak is the process's: Linux's resident-set high-water mark (``VmHWM``), reset just before the step
(``/proc/self/clear_refs``) after freed heap pages went back to the system (``malloc_trim``), minus the resident
set at that moment; so it counts what the step itself touched. ``test_trl_masked_forward.py`` calls
``measure``; run this file to measure at a larger size (the README's numbers):

    python tests/integrations/masked_forward_memory.py --prompts 64 --repeats 5
"""

import argparse
import ctypes
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).parent))

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer  # noqa: E402
from trl_setup import (NUM_GENERATIONS, build_processor_and_model_folder, colour_dataset, common_fields,  # noqa: E402
                       generation_rows, length_reward)

MODES = ("joint", "sequential")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(trainer: PAPOTrainer, batch: dict, mode: str) -> Dict[str, float]:
    """``{"peak_mib", "seconds"}`` of ``compute_loss`` and its backward (a training step after generation)."""
    trainer.args.masked_forward = mode
    trainer.model.zero_grad(set_to_none=False)  # the gradients' memory is held before the step in both modes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current resident set
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, batch).backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - start_kib) / 1024, "seconds": seconds}


def tiny_trainer_and_batch(folder: Path, prompts: int, **fields):
    """A PAPOTrainer on the tiny Qwen2-VL (float32) and one micro-batch of ``prompts`` x NUM_GENERATIONS responses."""
    processor = build_processor_and_model_folder(folder / "model")
    dataset = colour_dataset(prompts)
    args = PAPOConfig(**common_fields(processor, folder / "out", per_device_train_batch_size=prompts * NUM_GENERATIONS,
                                      bf16=False, **fields))
    trainer = PAPOTrainer(model=str(folder / "model"), reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    if args.activation_checkpointing:  # as Trainer.train() turns it on
        trainer.model.activation_checkpointing_enable(args.activation_checkpointing_kwargs)
    return trainer, trainer._prepare_inputs(generation_rows(dataset, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        trainer, batch = tiny_trainer_and_batch(Path(folder), options.prompts,
                                                gradient_checkpointing=options.gradient_checkpointing)
        results = {mode: [] for mode in MODES}
        for _ in range(options.repeats + 1):  # the first round warms up; modes alternate within each round
            for mode in MODES:
                results[mode].append(measure(trainer, batch, mode))
    print(f"{options.prompts * NUM_GENERATIONS} sequences of {batch['prompt_ids'].shape[1]} + "
          f"{batch['completion_ids'].shape[1]} tokens, gradient checkpointing {options.gradient_checkpointing}, "
          f"medians of {options.repeats} alternating repeats after one warm-up round")
    medians = {mode: {key: statistics.median(run[key] for run in runs[1:]) for key in ("peak_mib", "seconds")}
               for mode, runs in results.items()}
    for mode, median in medians.items():
        print(f"{mode:>10}: peak {median['peak_mib']:7.1f} MiB  time {median['seconds']:.3f} s")
    print(f"sequential / joint: peak {medians['sequential']['peak_mib'] / medians['joint']['peak_mib']:.2f}x, "
          f"time {medians['sequential']['seconds'] / medians['joint']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
