"""``papo-train``: GRPO/PAPO training from the command line.

    papo-train                                   # tiny Qwen2-VL, synthetic shapes, offline, CPU
    papo-train --preset dapo --output-dir runs/dapo   # the same without the PAPO terms
    papo-train --model ~/models/Qwen2.5-VL-3B-Instruct --data train.jsonl --preset papo_g
    papo-train --config examples/qwen2_5_vl_3b_papo_d.yaml       # the GPU recipe (README, Training)
    accelerate launch --multi_gpu --num_processes 2 -m papo_kernels.train ...   # data parallel

Settings come from the config's defaults, then ``--config`` (YAML), then the flags
given. ``--resume`` continues from ``OUTPUT_DIR/checkpoint.pt`` with the config saved
there; flags may change only what ``trainer/resume.py`` allows (``--steps`` to extend a
run whose schedules do not depend on it, say) and anything else is refused.

A bad config, file or resume request, an output directory another run writes in, or an
output file that cannot be written (a full disk) ends the command with one line,
``papo-train: error: ...``, naming the field or file, and exit status 2. The first line
printed says how many processes train.
"""

import argparse
import dataclasses
import sys
import time
import warnings
from typing import List, Optional

from .loss import PRESETS
from .trainer.local_model import SUPPORTED_MODEL_TYPES
from .trainer.model_options import ATTN_IMPLEMENTATIONS, MIXED_PRECISIONS
from .trainer.checkpoint import load_checkpoint
from .trainer.config import TrainerConfig
from .trainer.data import SYNTHETIC_TASKS
from .trainer.errors import TrainerInputError, TrainerOutputError, TrainerWarning
from .trainer.loop import Trainer
from .trainer.metrics_log import METRICS_NAME
from .trainer.plotting import PLOT_NAME

# Config fields that have a flag of their own (the rest are set through --config).
FLAG_FIELDS = (
    "output_dir", "steps", "seed", "model", "model_type", "data", "preset", "tasks", "num_threads", "torch_dtype",
    "mixed_precision", "attn_implementation", "gradient_checkpointing", "prompts_per_step", "group_size",
    "max_new_tokens", "temperature", "top_p", "learning_rate", "lr_schedule", "gamma", "beta", "eta_clean",
    "eta_masked", "gamma_schedule", "gamma_final", "perception_kl", "entropy", "masked_gradient", "mask_probability",
    "mask_target", "scale_advantages_by_std", "dapo_filter", "ppo_epochs", "minibatches", "micro_batch_size",
    "eval_every", "save_every",
)
HELP = {
    "model": "local Hugging Face folder of a Qwen2-VL or Qwen2.5-VL model (default: the offline tiny Qwen2-VL)",
    "model_type": f"architecture: {', '.join(SUPPORTED_MODEL_TYPES)}; picks the offline tiny model (default "
                  "qwen2_vl); with --model it must match the folder's",
    "torch_dtype": "dtype of the weights, gradients and AdamW state: float32 (default) or bfloat16 (float16 is "
                   "refused: AdamW underflows in it)",
    "mixed_precision": f"accelerate's autocast over float32 weights: {', '.join(MIXED_PRECISIONS)} (fp16 on CUDA)",
    "attn_implementation": f"{', '.join(ATTN_IMPLEMENTATIONS)}; auto is flash_attention_2 when flash_attn imports "
                           "on CUDA, else sdpa",
    "gradient_checkpointing": "recompute each block's activations in the backward (less activation memory, one "
                              "more forward of each block)",
    "data": "JSONL of {\"image\": path, \"question\": str, \"answer\": str} (default: synthetic shapes)",
    "preset": f"loss preset of papo_kernels.PRESETS: {', '.join(PRESETS)}",
    "tasks": f"synthetic tasks (papo_kernels/trainer/data.py describes each): {', '.join(SYNTHETIC_TASKS)}",
    "gamma": "perception-KL coefficient (overrides the preset; 0 turns PAPO into plain GRPO/DAPO)",
    "masked_gradient": "gradient through the masked pass (--no-masked-gradient: the authors' detached log-probs)",
    "mask_target": "blacken the raw 'image' or the processor's 'pixel_values' in Qwen2-VL patch order",
}


def _flag_type(field: dataclasses.Field):
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if field.name in ("gamma", "beta", "eta_clean", "eta_masked"):
        return float
    if field.name in ("model", "model_type", "data", "perception_kl"):
        return str
    return type(default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papo-train", description="GRPO/PAPO training of a vision-language model.",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of TrainerConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="start a new run where OUTPUT_DIR holds an earlier run's checkpoint (deleted first)")
    fields = {field.name: field for field in dataclasses.fields(TrainerConfig)}
    for name in FLAG_FIELDS:
        flag, kind = "--" + name.replace("_", "-"), _flag_type(fields[name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=HELP.get(name))
        elif kind is list:
            parser.add_argument(flag, nargs="+", help=HELP.get(name))
        else:
            parser.add_argument(flag, type=kind, help=HELP.get(name))
    return parser


def build_config(args: argparse.Namespace) -> TrainerConfig:
    values = vars(args)
    if values.get("resume"):
        if "config" in values:
            raise TrainerInputError("--resume takes the config saved in the checkpoint; give flags, not --config")
        output_dir = values.get("output_dir", TrainerConfig.output_dir)
        saved = load_checkpoint(output_dir)["config"]
        try:
            config = TrainerConfig.from_dict(saved)
        except TrainerInputError as error:
            raise TrainerInputError(f"--resume: the config saved in {output_dir}: {error}") from None
        # The run continues where its checkpoint was read, wherever it was first written.
        config.output_dir = output_dir
    elif "config" in values:
        config = TrainerConfig.from_yaml(values["config"])
    else:
        config = TrainerConfig()
    overrides = {name: values[name] for name in FLAG_FIELDS if name in values}
    config = dataclasses.replace(config, **overrides)
    if "tasks" in overrides and config.data is not None:
        raise TrainerInputError("--tasks picks the synthetic tasks, which --data replaces; give one of them")
    return config.validate()


def _processes(accelerator) -> str:
    """How many processes train, and how: `accelerate launch --num_processes N` without --multi_gpu (or a config that
    sets it) runs one process on a machine without GPUs, which this line shows."""
    count = accelerator.num_processes
    if count == 1:
        return f"1 process on {accelerator.device.type} (for data parallelism: accelerate launch --multi_gpu " \
               "--num_processes N -m papo_kernels.train)"
    return f"{count} processes on {accelerator.device.type}, data parallel ({accelerator.distributed_type.value})"


def _mean(values: List[float]) -> float:
    return sum(values) / max(len(values), 1)


def _one_line_trainer_warnings(prog: str, show=warnings.showwarning):
    """A ``warnings.showwarning`` that prints a ``TrainerWarning`` as one line, like the errors; others as usual."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TrainerWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_trainer_warnings(parser.prog)
            config = build_config(args)
            trainer = Trainer(config, resume=getattr(args, "resume", False),
                              overwrite_output_dir=getattr(args, "overwrite_output_dir", False))
            if trainer.accelerator.is_main_process:
                print(f"{parser.prog}: {_processes(trainer.accelerator)}", flush=True)
            start = time.perf_counter()
            records = trainer.train()
    except (TrainerInputError, TrainerOutputError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if trainer.accelerator.is_main_process and records:
        window = max(1, len(records) // 10)
        rewards = [record["reward"] for record in records]
        evals = [record["eval_accuracy"] for record in records if "eval_accuracy" in record]
        print(f"{len(records)} steps in {time.perf_counter() - start:.1f} s; mean reward of the first {window} "
              f"steps {_mean(rewards[:window]):.3f}, of the last {window} {_mean(rewards[-window:]):.3f}"
              + (f"; greedy eval accuracy {evals[0]:.3f} -> {evals[-1]:.3f}" if evals else ""))
        print(f"wrote {config.output_dir}/{METRICS_NAME}, {config.output_dir}/{PLOT_NAME} and "
              f"{config.output_dir}/checkpoint.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
