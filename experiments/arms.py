"""The arms (loss settings) and suites (task, steps, arms, pairs) of the experiments.

An arm is a named set of ``TrainerConfig`` overrides; a suite trains every arm on the
same task for the same steps over the same seeds, and names the pairs to compare
seed by seed (a PAPO arm against its baseline). Every run of a suite shares the
suite's settings; only the arm's overrides differ.
"""

from dataclasses import dataclass
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # how plots and the report name it
    overrides: Dict[str, Any]  # TrainerConfig fields on top of the suite's settings


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    settings: Dict[str, Any]  # TrainerConfig fields every run shares
    arms: Tuple[Arm, ...]
    pairs: Tuple[Tuple[str, str], ...]  # (baseline arm, PAPO arm): the seed-by-seed comparisons
    # (high gamma without double entropy, the same gamma with it), if in the suite: compared seed by seed too.
    hacking: Tuple[str, ...] = ()
    default_seeds: int = 5
    first_seed: int = 0

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ValueError(f"--arms: got {name!r}, suite {self.name!r} has {[arm.name for arm in self.arms]}")


HIGH_GAMMA = 0.05

ARMS = {
    arm.name: arm for arm in (
        Arm("dapo", "DAPO", dict(preset="dapo")),
        Arm("papo_d", "PAPO-D (gamma 0.01, double entropy 0.03)", dict(preset="papo_d")),
        Arm("grpo", "GRPO", dict(preset="grpo")),
        Arm("papo_g", "PAPO-G (gamma 0.02)", dict(preset="papo_g")),
        Arm("papo_d_high_gamma_no_de", f"PAPO-D, gamma {HIGH_GAMMA}, no double entropy",
            dict(preset="papo_d", gamma=HIGH_GAMMA, eta_clean=0.0, eta_masked=0.0)),
        Arm("papo_d_high_gamma", f"PAPO-D, gamma {HIGH_GAMMA}, double entropy 0.03",
            dict(preset="papo_d", gamma=HIGH_GAMMA)),
    )
}

# Shared by every run of the main suite. Two minibatches per step, so the policy moves between the
# optimizer steps of a batch and the clip fractions measure something (with one, the ratio is 1).
PAPO_SETTINGS = dict(tasks=["count"], steps=400, minibatches=2, eval_every=25, eval_prompts=256, save_every=0,
                     num_threads=1)

SUITES = {
    suite.name: suite for suite in (
        Suite("papo", "PAPO against its baselines on the counting task, and the loss hacking at high gamma",
              PAPO_SETTINGS, tuple(ARMS[name] for name in ("dapo", "papo_d", "grpo", "papo_g",
                                                           "papo_d_high_gamma_no_de", "papo_d_high_gamma")),
              pairs=(("dapo", "papo_d"), ("grpo", "papo_g")),
              hacking=("papo_d_high_gamma_no_de", "papo_d_high_gamma"),
              first_seed=1),  # seeds 1-5: seed 0 was the pilots' (experiments/README.md)
        Suite("smoke", "Two arms, a handful of steps: checks the runner end to end (the CI test)",
              dict(tasks=["count"], steps=3, prompts_per_step=4, group_size=4, max_new_tokens=3, minibatches=2,
                   eval_every=2, eval_prompts=8, save_every=0, num_threads=1),
              (ARMS["dapo"], ARMS["papo_d"]), pairs=(("dapo", "papo_d"),), default_seeds=2),
    )
}
