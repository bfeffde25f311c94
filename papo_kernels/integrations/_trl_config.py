"""``PAPOConfig``: TRL's ``GRPOConfig`` with the PAPO terms, the masked image and PAPO-D's defaults."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from trl import GRPOConfig

from .._checks import check_int, check_number
from ..backends import BACKENDS, resolve_backend
from ..loss import (ENTROPY_MODES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PERCEPTION_KL_ESTIMATORS, PRESETS,
                    check_settings)

MASK_TARGETS = ("image", "pixel_values")
GAMMA_SCHEDULES = ("fixed", "linear")
MASKED_FORWARDS = ("joint", "sequential")
# papo_loss keyword -> PAPOConfig field, for the presets (TRL's names for the GRPO settings).
PRESET_FIELDS = {"epsilon_low": "epsilon", "epsilon_high": "epsilon_high", "dual_clip": "delta", "beta": "beta",
                 "gamma": "gamma", "eta_clean": "eta_clean", "eta_masked": "eta_masked",
                 "perception_kl": "perception_kl", "loss_type": "loss_type"}


@dataclass
class PAPOConfig(GRPOConfig):
    r"""Configuration of ``PAPOTrainer``: ``GRPOConfig`` plus PAPO's perception and entropy terms.

    The defaults are PAPO-D's published loss setting (arXiv 2507.06448), GRPO fields included:
    ``epsilon=0.2``, ``epsilon_high=0.28``, ``delta=3.0`` (the dual clip), ``beta=0.0``,
    ``loss_type="dapo"``, ``gamma=0.01``, ``eta_clean=eta_masked=0.03``, ``perception_kl="k3"``.
    ``use_bias_correction_kl`` keeps TRL's default (True: with ``beta > 0`` the reference KL is TRL's,
    the ratio times k3).
    ``PAPOConfig.from_preset(name, **overrides)`` sets any of ``papo_kernels.PRESETS`` in full, the
    paper's plain k3 reference KL included (``use_bias_correction_kl=False``; ``papo_g`` sets
    ``beta=0.01``, which loads a reference model).

    The GRPO settings keep TRL's names: the clip range is ``epsilon`` / ``epsilon_high`` (None means
    ``epsilon``, as in TRL), the dual clip c is TRL's ``delta`` (``papo_loss(dual_clip=delta)``; the two
    are the same loss when ``delta > 1 + epsilon_high``, which is required here), and ``loss_type`` is
    one of ``grpo``, ``bnpo``, ``dapo``, ``dr_grpo``.

    PAPO parameters:
        gamma (`float`, defaults to `0.01`): coefficient of the perception KL between the policy on the
            clean and on the masked image (maximised); >= 0.
        eta_clean, eta_masked (`float`, default `0.03`): coefficients of the entropies of the clean and
            masked passes (minimised); >= 0. With gamma = eta_clean = eta_masked = 0 no masked pass runs.
        allow_negative_coefficients (`bool`, defaults to `False`): for ablations only, accept gamma < 0
            (which minimises the perception KL, the opposite of PAPO) and eta_clean, eta_masked < 0
            (which maximise the entropies).
        perception_kl (`str`, defaults to `"k3"`): `"k1"`, `"k2"`, `"k3"` or `"exact"` (full vocabulary).
        entropy (`str`, defaults to `"exact"`): `"exact"` full-vocabulary entropies or `"sampled"` (-log p(y)).
        masked_gradient (`bool`, defaults to `True`): gradient through the masked pass; `False` scores the
            masked image once per rollout without gradient (the authors' default; not with `"exact"`).
        masked_forward (`str`, defaults to `"joint"`): how the loss runs the clean and masked passes with
            `masked_gradient`: `"joint"`, one forward and backward over both as one batch of 2B sequences;
            `"sequential"`, one pass after the other, each with its own backward, so the activations held
            are one pass's (the masked pass runs twice, once without gradient; the gradients are the
            joint form's, and under DDP the all-reduce runs once).
        mask_probability (`float`, defaults to `0.6`): chance that a cell of the image is blackened.
        mask_cell (`int`, defaults to `14`): cell side in pixels; with `mask_target="pixel_values"` it must
            be the vision patch size.
        mask_target (`str`, defaults to `"image"`): blacken cells of the raw image and run the image
            processor, or blacken patches of `pixel_values` (`"pixel_values"`, Qwen-VL patch order).
        gamma_schedule (`str`, defaults to `"fixed"`): `"linear"` anneals gamma (and both eta by the same
            factor) to `gamma_final` over `gamma_anneal_fraction` of the training steps; it starts from gamma,
            so it needs gamma != 0 unless gamma_final is 0.
        backend (`str`, defaults to `"auto"`): backend of `papo_loss` and `linear_logprobs`; one that
            cannot run on the trainer's device (`"triton"` without CUDA or Triton's interpreter) is refused.
    """

    epsilon_high: Optional[float] = field(
        default=0.28, metadata={"help": "Upper clip epsilon (None: epsilon); PAPO-D (DAPO) uses 0.28, PAPO-G 0.3."})
    delta: Optional[float] = field(
        default=3.0, metadata={"help": "Dual clip c (TRL's two-sided clip): the loss of a negative-advantage token "
                                       "is at most -c A. Must exceed 1 + epsilon_high; None is off."})
    gamma: float = field(default=0.01, metadata={"help": "Coefficient of the perception KL (maximised), >= 0."})
    eta_clean: float = field(default=0.03,
                             metadata={"help": "Coefficient of the clean pass's entropy (minimised), >= 0."})
    eta_masked: float = field(default=0.03,
                              metadata={"help": "Coefficient of the masked pass's entropy (minimised), >= 0."})
    allow_negative_coefficients: bool = field(
        default=False, metadata={"help": "Ablations only: accept negative gamma, eta_clean and eta_masked."})
    perception_kl: str = field(default="k3", metadata={"help": "Perception KL estimator: k1, k2, k3 or exact."})
    entropy: str = field(default="exact", metadata={"help": "Entropy: exact (full vocabulary) or sampled."})
    masked_gradient: bool = field(
        default=True, metadata={"help": "Gradient through the masked pass (False: the authors' detached masked "
                                        "log-probs)."})
    masked_forward: str = field(
        default="joint", metadata={"help": "joint (clean and masked passes as one batch) or sequential (one after "
                                           "the other, each with its own backward: one pass's activations)."})
    mask_probability: float = field(default=0.6, metadata={"help": "Chance that a cell is blackened."})
    mask_cell: int = field(default=14, metadata={"help": "Cell side in pixels."})
    mask_target: str = field(default="image", metadata={"help": "Mask the raw image or the pixel_values."})
    gamma_schedule: str = field(default="fixed", metadata={"help": "fixed, or linear annealing to gamma_final."})
    gamma_final: float = field(default=0.0, metadata={"help": "Gamma at the end of a linear schedule."})
    gamma_anneal_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the training steps over which gamma anneals."})
    backend: str = field(default="auto", metadata={"help": "Backend of papo_loss and linear_logprobs: auto or one "
                                                           "of papo_kernels.BACKENDS."})

    def __post_init__(self):
        super().__post_init__()
        self._check_papo_fields()
        self._check_grpo_fields()
        self._check_backend_runs_here()
        try:  # what papo_loss itself checks (beta, temperature, dr_grpo's length, ...), at construction
            check_settings({**self.papo_loss_options(), "temperature": self.temperature, "gamma": self.gamma,
                            "eta_clean": self.eta_clean, "eta_masked": self.eta_masked})
        except (TypeError, ValueError) as error:
            raise ValueError(f"PAPOConfig: {error}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PAPOConfig":
        """The published loss setting ``papo_kernels.PRESETS[name]`` in full, its GRPO fields included (clip
        range, dual clip, beta, loss type, and the paper's plain k3 reference KL: ``use_bias_correction_kl=False``),
        then ``overrides``. Rollout and optimiser fields (``num_generations``,
        ``max_completion_length``, ``learning_rate``, ``weight_decay``, ``top_p``) keep TRL's defaults: the paper's
        values depend on the model and the hardware, so give them as ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"name must be one of {list(PRESETS)}, got {name!r}")
        unknown = sorted(set(PRESETS[name]) - set(PRESET_FIELDS))
        if unknown:
            raise ValueError(f"preset {name!r} sets {unknown}, which PAPOConfig cannot map to a field")
        values = {PRESET_FIELDS[key]: value for key, value in PRESETS[name].items()}
        return cls(**{**values, "use_bias_correction_kl": False, **overrides})

    @property
    def uses_masked_image(self) -> bool:
        """Whether any PAPO term is on (papo_loss needs the masked pass for each of them)."""
        return self.gamma != 0 or self.eta_clean != 0 or self.eta_masked != 0

    @property
    def upper_clip_epsilon(self) -> float:
        """The ratio's upper clip is 1 + this: ``epsilon_high``, or ``epsilon`` where it is None (as in TRL)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def coefficient_scale(self, step: int, total_steps: int) -> float:
        """Factor on gamma, eta_clean and eta_masked at optimizer step ``step`` of ``total_steps``."""
        if self.gamma_schedule == "fixed" or self.gamma == 0:
            return 1.0
        progress = min(1.0, step / max(1.0, self.gamma_anneal_fraction * total_steps))
        return (self.gamma + progress * (self.gamma_final - self.gamma)) / self.gamma

    def papo_loss_options(self) -> Dict[str, Any]:
        """The ``papo_loss`` keywords this config fixes for the whole run (the coefficients aside)."""
        return dict(epsilon_low=self.epsilon, epsilon_high=self.upper_clip_epsilon, dual_clip=self.delta,
                    beta=self.beta, ref_kl_importance_weighted=self.use_bias_correction_kl, perception_kl=self.perception_kl, entropy=self.entropy, loss_type=self.loss_type,
                    max_completion_length=self.max_completion_length,
                    importance_sampling_level=self.importance_sampling_level, backend=self.backend)

    def _take_number(self, name: str, fail, allowed: str, **interval) -> None:
        """Field ``name`` as a Python float (NumPy and one-element tensors taken as the numbers they hold);
        ``fail(name, allowed)`` where it is no finite number in ``interval``."""
        try:
            setattr(self, name, check_number(name, getattr(self, name), **interval))
        except (TypeError, ValueError):
            fail(name, allowed)

    def _check_papo_fields(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"PAPOConfig.{name}: got {getattr(self, name)!r}, expected {allowed}")

        choices = {"perception_kl": PERCEPTION_KL_ESTIMATORS, "entropy": ENTROPY_MODES, "mask_target": MASK_TARGETS,
                   "gamma_schedule": GAMMA_SCHEDULES, "backend": BACKENDS, "masked_forward": MASKED_FORWARDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")
        for name in ("masked_gradient", "allow_negative_coefficients", "use_bias_correction_kl"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        negative = {"gamma": "minimises the perception KL, the opposite of PAPO",
                    "eta_clean": "maximises the clean pass's entropy", "eta_masked": "maximises the masked pass's entropy"}
        for name, effect in negative.items():
            if self.allow_negative_coefficients:
                self._take_number(name, fail, "a finite number")
            else:
                self._take_number(name, fail, f"a finite number >= 0 (a negative {name} {effect}; set "
                                  "allow_negative_coefficients=True for such an ablation)", low=0.0)
        self._take_number("gamma_final", fail, "a finite number >= 0", low=0.0)
        if self.gamma_schedule == "linear" and self.gamma == 0 and self.gamma_final != 0:
            fail("gamma_schedule", f"'fixed' with gamma=0 and gamma_final={self.gamma_final}: the linear schedule "
                 "multiplies gamma, eta_clean and eta_masked by (gamma + progress (gamma_final - gamma)) / gamma, "
                 "a ratio to the starting gamma, so from gamma=0 it never reaches gamma_final; start from a "
                 "nonzero gamma")
        self._take_number("mask_probability", fail, "a number in [0, 1]", low=0.0, high=1.0)
        try:
            self.mask_cell = check_int("mask_cell", self.mask_cell, low=1)
        except (TypeError, ValueError):
            fail("mask_cell", "a positive int")
        self._take_number("gamma_anneal_fraction", fail, "a number in (0, 1]", low=0.0, low_open=True, high=1.0)
        if self.masked_forward == "sequential" and self.fp16:
            fail("masked_forward", "'joint' with fp16=True (the sequential form's first backward would bypass the "
                 "fp16 loss scaler); use bf16 or float32 for 'sequential'")
        if not self.masked_gradient and self.perception_kl == "exact":
            fail("masked_gradient", "True with perception_kl='exact' (the exact KL needs the masked pass's hidden "
                 "states)")

    def _check_backend_runs_here(self) -> None:
        """An explicit backend must run on the device the trainer will use (``auto`` always picks one that does)."""
        try:
            resolve_backend(self.backend, self.device, torch.float32)
        except ValueError as error:
            raise ValueError(f"PAPOConfig.backend: got {self.backend!r}, which cannot run on this trainer's device "
                             f"({self.device}): {error}") from None

    def _check_grpo_fields(self) -> None:
        """GRPO options that papo_loss does not implement, or values outside its ranges, are refused, not ignored."""
        def refuse(name: str, allowed: str) -> None:
            raise ValueError(f"PAPOConfig.{name}={getattr(self, name)!r} is not supported by PAPOTrainer; "
                             f"allowed: {allowed}")

        if self.loss_type not in LOSS_TYPES:
            refuse("loss_type", f"one of {list(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            refuse("importance_sampling_level", f"one of {list(IMPORTANCE_SAMPLING_LEVELS)}")
        self._take_number("epsilon", refuse, "a number in [0, 1) (the ratio's lower clip 1 - epsilon stays positive)",
                          low=0.0, high=1.0, high_open=True)
        if self.epsilon_high is not None:
            self._take_number("epsilon_high", refuse, "None (the same as epsilon) or a number >= 0", low=0.0)
        epsilon_high = self.upper_clip_epsilon
        if self.delta is not None:
            self._take_number("delta", refuse, f"None or a number > 1 + epsilon_high = {1 + epsilon_high} (the dual "
                              "clip)", low=1 + epsilon_high, low_open=True)
        if self.entropy_coef != 0 or self.use_adaptive_entropy:
            name = "entropy_coef" if self.entropy_coef != 0 else "use_adaptive_entropy"
            refuse(name, "entropy_coef=0 and use_adaptive_entropy=False; PAPO's entropy terms are eta_clean and "
                   "eta_masked")
