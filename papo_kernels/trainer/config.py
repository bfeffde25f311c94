"""The training configuration: one dataclass, loadable from YAML, checked before a run starts.

The loss settings start from a preset of ``papo_kernels.PRESETS`` (``papo_d`` by
default; ``dapo`` and ``grpo`` are the baselines with the PAPO terms off), and the
fields ``gamma``, ``beta``, ``eta_clean``, ``eta_masked``, ``epsilon_low``,
``epsilon_high`` and ``perception_kl`` override it where set.

``validate`` accepts Python and NumPy numbers alike (a NumPy scalar is replaced by the
Python number it holds) and refuses NaN and infinity in every numeric field, an int
beyond float's range in a number field, and an integer field beyond int64 (torch's
integers).
"""

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import yaml

from .._checks import shown
from ..loss import PERCEPTION_KL_ESTIMATORS, PRESETS
from .data import SYNTHETIC_TASKS
from .errors import TrainerInputError
from .local_model import SUPPORTED_MODEL_TYPES
from .model_options import ATTN_IMPLEMENTATIONS, MIXED_PRECISIONS, TORCH_DTYPES
from .rewards import ANSWER_FORMATS


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``3e-4`` as a number, as YAML 1.2 does (YAML 1.1 makes it a string), and
    refuses a key given twice in one mapping (YAML 1.1 loaders keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key_node.value!r}",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                    list("-+0123456789."))

MASK_TARGETS = ("image", "pixel_values")
GAMMA_SCHEDULES = ("fixed", "linear")
LR_SCHEDULES = ("constant", "cosine")
ENTROPY_MODES = ("exact", "sampled")
LOSS_OVERRIDES = ("gamma", "beta", "eta_clean", "eta_masked", "epsilon_low", "epsilon_high", "perception_kl")
MIN_IMAGE_SIZE = 28  # Qwen2-VL's smallest image: one 2 x 2 block of 14-pixel vision patches
MAX_SEED = 2**64 - 1  # torch.manual_seed takes no larger one
MAX_INTEGER = 2**63 - 1  # int64, torch's integers
DEFAULT_TASKS = ["color"]


@dataclass
class TrainerConfig:
    # Run.
    output_dir: str = "runs/papo-tiny"
    steps: int = 400
    seed: int = 0
    # Torch threads per process. 1 is the default because this tiny model gains little from more, and on a
    # shared 2-core machine 2 threads measured 2.2-3.7 s per step against 0.46 s with 1 (OpenMP waits on busy cores).
    num_threads: int = 1
    # Model and data: a local Hugging Face model folder and a JSONL file, or None for the offline tiny default.
    model: Optional[str] = None
    # The architecture, 'qwen2_vl' or 'qwen2_5_vl': of the offline tiny model (null: 'qwen2_vl'); with a model
    # folder, null takes the folder's, and a value must match it.
    model_type: Optional[str] = None
    data: Optional[str] = None
    tasks: List[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # synthetic tasks, when data is None
    image_size: int = 56  # synthetic images are image_size x image_size pixels
    # Precision, attention and memory (model_options.py). torch_dtype: the weights, their gradients and AdamW's
    # state; mixed_precision: accelerate's autocast over float32 weights ('no', 'bf16', 'fp16' on CUDA).
    torch_dtype: str = "float32"
    mixed_precision: str = "no"
    attn_implementation: str = "auto"  # flash_attention_2 when flash_attn imports on CUDA, else sdpa; or eager
    gradient_checkpointing: bool = False  # recompute block activations in the backward
    # Rollout.
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    # Reward = accuracy_weight * accuracy + format_weight * format.
    answer_format: str = "first_word"
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    # Advantages.
    scale_advantages_by_std: bool = True
    dapo_filter: bool = False  # drop groups whose rewards are all equal
    skip_uninformative_steps: bool = True  # no optimizer step when every advantage is 0
    # Masked image.
    mask_probability: float = 0.6
    mask_cell: int = 14
    mask_target: str = "image"  # blacken the raw image, or the processor's pixel_values in patch order
    # Loss.
    preset: str = "papo_d"
    gamma: Optional[float] = None
    beta: Optional[float] = None
    eta_clean: Optional[float] = None
    eta_masked: Optional[float] = None
    epsilon_low: Optional[float] = None
    epsilon_high: Optional[float] = None
    perception_kl: Optional[str] = None
    entropy: str = "exact"
    masked_gradient: bool = True  # False: the authors' masked log-probs without gradient
    # "linear": gamma (and the entropy coefficients alike) goes from a nonzero gamma to gamma_final
    gamma_schedule: str = "fixed"
    gamma_final: float = 0.0
    gamma_anneal_fraction: float = 1.0  # over this fraction of the steps, then stays at gamma_final
    # Optimisation.
    learning_rate: float = 3e-4
    # Cosine decay to a tenth of the peak: with a constant rate the default PAPO-D run (seed 0) fell from greedy
    # accuracy 1.0 at step 300 to 0.55 at step 399; with cosine, seeds 0 and 1 ended at 1.0 (2026-11-25, this CPU).
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer steps per epoch over parts of the responses whose sizes differ by at most one
    micro_batch_size: int = 128  # responses per forward (gradient accumulation inside a minibatch)
    # Logging and checkpoints.
    eval_every: int = 50  # greedy accuracy on eval_prompts held-out prompts; 0 is off
    eval_prompts: int = 64
    save_every: int = 100  # and at the end

    def loss_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``papo_loss``: the preset with this config's overrides applied."""
        kwargs = dict(PRESETS[self.preset])
        kwargs.update({name: getattr(self, name) for name in LOSS_OVERRIDES if getattr(self, name) is not None})
        kwargs.update(temperature=self.temperature, entropy=self.entropy)
        return kwargs

    def coefficient_scale(self, step: int) -> float:
        """Factor on gamma and both entropy coefficients at ``step`` (the gamma schedule)."""
        gamma = self.loss_kwargs()["gamma"]
        if self.gamma_schedule == "fixed" or gamma == 0:
            return 1.0
        progress = min(1.0, step / max(1.0, self.gamma_anneal_fraction * self.steps))
        return (gamma + progress * (self.gamma_final - gamma)) / gamma

    def validate(self) -> "TrainerConfig":
        """Raise ``TrainerInputError`` naming the first field whose value is not allowed; NumPy scalars are
        replaced by the Python values they hold first."""
        def fail(name: str, allowed: str) -> None:
            raise TrainerInputError(f"config field {name!r}: got {shown(getattr(self, name))}, expected {allowed}")

        for config_field in dataclasses.fields(self):
            if isinstance(getattr(self, config_field.name), np.generic):
                setattr(self, config_field.name, getattr(self, config_field.name).item())
        if not isinstance(self.output_dir, str) or not self.output_dir:
            fail("output_dir", "a non-empty path")
        for name in ("steps", "num_threads", "prompts_per_step", "group_size", "max_new_tokens", "image_size",
                     "mask_cell", "ppo_epochs", "minibatches", "micro_batch_size", "eval_prompts"):
            value = getattr(self, name)
            if not _is_integer(value) or not 1 <= value <= MAX_INTEGER:
                fail(name, "a positive integer up to 2**63 - 1")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if not _is_integer(value) or not 0 <= value <= MAX_INTEGER:
                fail(name, "an integer in [0, 2**63 - 1]")
        if not _is_integer(self.seed) or self.seed < 0:
            fail("seed", "an integer >= 0")
        if self.seed > MAX_SEED:
            fail("seed", "an integer in [0, 2**64 - 1] (torch's seed range)")
        if self.group_size < 2:
            fail("group_size", "an integer >= 2 (group-relative advantages need at least two responses)")
        if self.image_size < MIN_IMAGE_SIZE:
            fail("image_size", f"an integer >= {MIN_IMAGE_SIZE} (one 2 x 2 block of 14-pixel vision patches)")
        if self.torch_dtype == "float16":
            fail("torch_dtype", "'float32' or 'bfloat16': AdamW on float16 weights writes inf and NaN (its eps 1e-8 "
                 "and small squared gradients underflow to 0 in float16); for float16 compute use torch_dtype "
                 "'float32' with mixed_precision 'fp16'")
        choices = {"preset": tuple(PRESETS), "answer_format": ANSWER_FORMATS, "mask_target": MASK_TARGETS,
                   "entropy": ENTROPY_MODES, "gamma_schedule": GAMMA_SCHEDULES, "lr_schedule": LR_SCHEDULES,
                   "torch_dtype": tuple(TORCH_DTYPES), "mixed_precision": MIXED_PRECISIONS,
                   "attn_implementation": ATTN_IMPLEMENTATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")
        if self.mixed_precision != "no" and self.torch_dtype != "float32":
            fail("mixed_precision", f"'no' with torch_dtype {self.torch_dtype!r} (mixed precision computes in half "
                 "precision over float32 weights; give torch_dtype 'float32' to use it)")
        if self.model_type is not None and self.model_type not in SUPPORTED_MODEL_TYPES:
            fail("model_type", f"null or one of {list(SUPPORTED_MODEL_TYPES)}")
        if self.perception_kl is not None and self.perception_kl not in PERCEPTION_KL_ESTIMATORS:
            fail("perception_kl", f"null or one of {list(PERCEPTION_KL_ESTIMATORS)}")
        if not isinstance(self.tasks, list) or not self.tasks or any(t not in SYNTHETIC_TASKS for t in self.tasks):
            fail("tasks", f"a non-empty list of {list(SYNTHETIC_TASKS)}")
        if self.data is not None and self.tasks != DEFAULT_TASKS:
            fail("tasks", f"the default {DEFAULT_TASKS} with data (the synthetic tasks are not drawn when data is "
                 "given); give data or tasks, not both")
        for name in ("temperature", "learning_rate", "max_grad_norm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "a finite number > 0")
        for name in ("accuracy_weight", "format_weight", "weight_decay", "gamma_final"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a finite number >= 0")
        for name in ("gamma", "beta", "eta_clean", "eta_masked", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                fail(name, "null (the preset's value) or a finite number >= 0")
        if self.epsilon_low is not None and (not _is_number(self.epsilon_low) or not 0 <= self.epsilon_low < 1):
            fail("epsilon_low", "null (the preset's value) or a number in [0, 1)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if not _is_number(self.mask_probability) or not 0 <= self.mask_probability <= 1:
            fail("mask_probability", "a number in [0, 1]")
        if not _is_number(self.gamma_anneal_fraction) or not 0 < self.gamma_anneal_fraction <= 1:
            fail("gamma_anneal_fraction", "a number in (0, 1]")
        for name in ("scale_advantages_by_std", "dapo_filter", "skip_uninformative_steps", "masked_gradient",
                     "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if self.gamma_schedule == "linear" and self.loss_kwargs()["gamma"] == 0 and self.gamma_final != 0:
            fail("gamma_final", "0 with gamma 0 (the linear schedule multiplies gamma, eta_clean and eta_masked by "
                 "gamma_t / gamma, a ratio to the starting gamma, so from gamma 0 it never reaches gamma_final); "
                 "start from a nonzero gamma")
        if not self.masked_gradient and self.loss_kwargs()["perception_kl"] == "exact":
            fail("masked_gradient", "true with perception_kl 'exact' (the exact KL needs the masked pass's "
                 "hidden states)")
        if self.mask_target == "pixel_values" and self.mask_cell != 14:
            fail("mask_cell", "14 (the vision patch size) with mask_target 'pixel_values'")
        for name in ("model", "data"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "a path or null")
        return self

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise TrainerInputError(f"unknown config field(s) {unknown}; allowed are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path) -> "TrainerConfig":
        path = Path(path)
        if not path.is_file():
            raise TrainerInputError(f"--config: no such YAML file: {path}")
        try:
            with open(path, "rb") as handle:  # bytes: the YAML reader detects the encoding and names bad bytes
                values = yaml.load(handle, Loader=_ConfigLoader)
        except yaml.YAMLError as error:
            raise TrainerInputError(f"--config: {path} is not valid YAML: {_yaml_problem(error)}") from None
        except OSError as error:
            raise TrainerInputError(f"--config: cannot read {path} ({error.strerror})") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise TrainerInputError(f"--config: {path} must hold a mapping of field: value, got "
                                    f"{type(values).__name__}")
        try:
            return cls.from_dict(values)
        except TrainerInputError as error:
            raise TrainerInputError(f"--config: {path}: {error}") from None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number that is not a bool (an int beyond float's range is not finite)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what the YAML reader found wrong, and where."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())
