"""Train the runs of a suite, each in its own process, a few at a time.

A run is one (arm, seed): its folder holds ``config.yaml`` (the full ``TrainerConfig``),
``train.log`` (the trainer's output), ``metrics.jsonl`` and, once it has trained every
step, ``done.json`` (its wall time). A run with ``done.json`` and the same config is not
trained again, so a suite can be extended (more seeds, arms) or re-reported; a run is
never stopped before its last step. Any other run trains from the start in a fresh folder:
what an earlier attempt left there (a checkpoint, over which ``papo-train`` refuses to
start a new run, its metrics) is removed first; the folder is the runner's own.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import yaml

from papo_kernels.trainer import TrainerConfig

from .arms import Arm, Suite

DONE_NAME = "done.json"
CONFIG_NAME = "config.yaml"
LOG_NAME = "train.log"
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    folder: Path
    config: TrainerConfig

    @property
    def name(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    def is_done(self) -> bool:
        """Trained to the end with this config."""
        config_path = self.folder / CONFIG_NAME
        if not (self.folder / DONE_NAME).is_file() or not config_path.is_file():
            return False
        return yaml.safe_load(config_path.read_text()) == self.config.to_dict()

    def wall_time(self) -> float:
        return json.loads((self.folder / DONE_NAME).read_text())["wall_seconds"]


def plan_runs(suite: Suite, arms: Sequence[Arm], seeds: Sequence[int], runs_dir: Path,
              overrides: Dict) -> List[Run]:
    """Every (arm, seed) run, seed-major so the arms of one seed finish close together."""
    runs = []
    for seed in seeds:
        for arm in arms:
            folder = runs_dir / arm.name / f"seed{seed}"
            values = {**suite.settings, **arm.overrides, **overrides, "seed": seed, "output_dir": str(folder)}
            config = dataclasses.replace(TrainerConfig(), **values).validate()
            runs.append(Run(arm, seed, folder, config))
    return runs


def _start(run: Run) -> subprocess.Popen:
    if run.folder.exists():
        shutil.rmtree(run.folder)
    run.folder.mkdir(parents=True)
    (run.folder / CONFIG_NAME).write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    log = open(run.folder / LOG_NAME, "w", encoding="utf-8")
    # One thread per process (the config's num_threads); OMP_NUM_THREADS keeps the libraries' pools alike.
    env = {**os.environ, "OMP_NUM_THREADS": str(run.config.num_threads)}
    process = subprocess.Popen([sys.executable, "-m", "papo_kernels.train", "--config",
                                str(run.folder / CONFIG_NAME)], stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return process


def train_runs(runs: Sequence[Run], workers: int, echo=print) -> List[str]:
    """Train the runs not yet done, ``workers`` processes at a time; return the names of the runs that failed."""
    pending = [run for run in runs if not run.is_done()]
    echo(f"{len(runs) - len(pending)} of {len(runs)} runs already done; training {len(pending)} "
         f"with {workers} process(es) at a time")
    running, failed = [], []  # running: (run, process, start time)
    while pending or running:
        while pending and len(running) < workers:
            run = pending.pop(0)
            running.append((run, _start(run), time.perf_counter()))
            echo(f"started {run.name}")
        time.sleep(POLL_SECONDS)
        for entry in list(running):
            run, process, start = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            seconds = time.perf_counter() - start
            if process.returncode == 0:
                (run.folder / DONE_NAME).write_text(json.dumps({"wall_seconds": seconds}))
                echo(f"finished {run.name} in {seconds:.0f} s")
            else:
                failed.append(run.name)
                echo(f"FAILED {run.name} (exit code {process.returncode}); see {run.folder / LOG_NAME}")
    return failed
