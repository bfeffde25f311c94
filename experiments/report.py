"""Collect the finished runs of a suite into CSVs, figures and a markdown report.

Files written to the results folder:

- ``runs.csv``: one row per run (arm, seed, wall seconds, every measure of ``measures.py``);
- ``curves.csv``: one row per run and evaluation step (the curves the figures draw);
- ``curves.png`` (the compared arms), ``hacking.png`` (the high-gamma arms, when in the suite),
  ``paired.png`` (each seed's baseline and PAPO values);
- ``report.md``: the provenance, the settings, mean and standard error per arm, the paired
  comparisons with their tests, and the loss-hacking arms step by step.
"""

import csv
import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import papo_kernels
from papo_kernels.trainer.metrics_log import read_metrics

from .arms import Suite
from .measures import RUN_MEASURES, curve_rows, prepare_records, run_measures
from .plots import plot_curves, plot_pairs
from .runner import Run
from .stats import mean_and_se, paired_comparison

CURVE_FIELDS = ("eval_accuracy", "eval_accuracy_masked", "eval_junk", "eval_junk_masked", "reward", "perception_kl",
                "entropy", "entropy_masked", "clip_fraction_high", "clip_fraction_low", "junk_sampled")
TABLE_MEASURES = ("accuracy", "accuracy_masked", "vision_dependence", "mean_accuracy", "peak_accuracy", "junk",
                  "junk_sampled", "perception_kl", "peak_perception_kl", "entropy", "entropy_masked",
                  "clip_fraction_high")
HACKING_MEASURES = ("accuracy", "peak_accuracy", "junk", "junk_sampled", "perception_kl", "peak_perception_kl",
                    "entropy", "entropy_masked", "clip_fraction_high")
PAIRED_MEASURES = (("accuracy", "held-out accuracy"), ("vision_dependence", "vision dependence"),
                   ("mean_accuracy", "mean accuracy over the run"))
SIGNIFICANCE = 0.05


@dataclass
class Collected:
    runs: List[Run]  # the finished ones
    measures: Dict[str, Dict[int, Dict]]  # arm -> seed -> measures
    curves: Dict[str, Dict[int, List[Dict]]]  # arm -> seed -> curve rows
    wall: Dict[str, Dict[int, float]]  # arm -> seed -> seconds


def collect(runs: Sequence[Run]) -> Collected:
    """Measures and curves of the finished runs; each run's measures also go to ``result.json`` in its folder."""
    finished = [run for run in runs if run.is_done()]
    collected = Collected(finished, {}, {}, {})
    for run in finished:
        loss = run.config.loss_kwargs()
        masked_pass = any(loss[name] for name in ("gamma", "eta_clean", "eta_masked"))
        records = prepare_records(read_metrics(run.folder), masked_pass)
        measures = run_measures(records, run.config.steps)
        (run.folder / "result.json").write_text(json.dumps(measures, indent=1))
        collected.measures.setdefault(run.arm.name, {})[run.seed] = measures
        collected.curves.setdefault(run.arm.name, {})[run.seed] = curve_rows(records)
        collected.wall.setdefault(run.arm.name, {})[run.seed] = run.wall_time()
    return collected


def package_commit() -> str:
    """The git commit of the imported ``papo_kernels`` (with ``+changes`` when its tree differs from it)."""
    folder = Path(papo_kernels.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "--",
                                  str(folder)], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" +uncommitted changes" if changed else "")


def _write_csv(path: Path, rows: List[Dict], fields: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows([{name: "" if row.get(name) is None else row[name] for name in fields} for row in rows])


def write_csvs(collected: Collected, folder: Path) -> None:
    rows, curve_table = [], []
    for run in collected.runs:
        name, seed = run.arm.name, run.seed
        rows.append({"arm": name, "seed": seed, "wall_seconds": round(collected.wall[name][seed], 1),
                     **collected.measures[name][seed]})
    for arm, per_seed in collected.curves.items():
        for seed, curve in sorted(per_seed.items()):
            curve_table += [{"arm": arm, "seed": seed, **row} for row in curve]
    _write_csv(folder / "runs.csv", rows, ("arm", "seed", "wall_seconds") + RUN_MEASURES)
    _write_csv(folder / "curves.csv", curve_table, ("arm", "seed", "step") + CURVE_FIELDS)


def _number(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_se(values: Sequence[Optional[float]]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    mean, se = mean_and_se(values)
    return f"{mean:.3f} ± {_number(se)}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _p(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def arm_table(suite: Suite, collected: Collected) -> List[str]:
    lines = ["| arm | seeds | " + " | ".join(TABLE_MEASURES) + " |", "|" + " --- |" * (len(TABLE_MEASURES) + 2)]
    for arm in suite.arms:
        per_seed = collected.measures.get(arm.name, {})
        if not per_seed:
            continue
        cells = [_mean_se([measures[name] for measures in per_seed.values()]) for name in TABLE_MEASURES]
        lines.append(f"| {arm.name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return lines


def pair_section(collected: Collected, baseline: str, papo: str) -> List[str]:
    base, other = collected.measures.get(baseline, {}), collected.measures.get(papo, {})
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return [f"### {papo} against {baseline}", "", "No seed has both runs finished.", ""]
    lines = [f"### {papo} against {baseline} ({len(seeds)} seeds)", "",
             "| seed | " + " | ".join(f"{baseline} {label} | {papo} {label} | difference"
                                      for _, label in PAIRED_MEASURES) + " |",
             "|" + " --- |" * (1 + 3 * len(PAIRED_MEASURES))]
    for seed in seeds:
        cells = []
        for name, _ in PAIRED_MEASURES:
            a, b = base[seed][name], other[seed][name]
            cells += [f"{a:.3f}", f"{b:.3f}", _signed(b - a)]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"| measure | mean difference ({papo} - {baseline}) ± se | paired t-test p | wins / losses / ties | "
              "sign test p |", "| --- | --- | --- | --- | --- |"]
    for name, label in PAIRED_MEASURES:
        result = paired_comparison([base[s][name] for s in seeds], [other[s][name] for s in seeds])
        ties = len(seeds) - result.wins - result.losses
        lines.append(f"| {label} | {_signed(result.mean)} ± {_number(result.se)} | {_p(result.t_p)} | "
                     f"{result.wins} / {result.losses} / {ties} | {_p(result.sign_p)} |")
    return lines + [""]


def hacking_section(suite: Suite, collected: Collected) -> List[str]:
    """The high-gamma arms seed by seed (their paired comparison: the cure), then their curves, mean over seeds,
    at every evaluation step."""
    lines = pair_section(collected, *suite.hacking)
    lines += ["| arm | seed | " + " | ".join(HACKING_MEASURES) + " |", "|" + " --- |" * (len(HACKING_MEASURES) + 2)]
    for arm_name in suite.hacking:
        for seed, measures in sorted(collected.measures.get(arm_name, {}).items()):
            lines.append(f"| {arm_name} | {seed} | " + " | ".join(_number(measures[name])
                                                                   for name in HACKING_MEASURES) + " |")
    lines.append("")
    fields = ("eval_accuracy", "eval_junk", "junk_sampled", "perception_kl", "entropy", "entropy_masked",
              "clip_fraction_high")
    for arm_name in suite.hacking:
        per_seed = collected.curves.get(arm_name)
        if not per_seed:
            continue
        lines += [f"**{suite.arm(arm_name).label}** ({len(per_seed)} seeds; mean over seeds at each evaluation, "
                  "training signals averaged since the previous one)", "",
                  "| step | " + " | ".join(fields) + " |", "|" + " --- |" * (len(fields) + 1)]
        for rows in zip(*per_seed.values()):
            cells = []
            for field in fields:
                values = [row[field] for row in rows if row[field] is not None]
                cells.append(_number(sum(values) / len(values)) if values else "n/a")
            lines.append(f"| {rows[0]['step']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_report(suite: Suite, collected: Collected, folder: Path, command: str, timing: Optional[Dict]) -> Path:
    """Write the CSVs, the figures and ``report.md`` into ``folder``; return the report's path. ``timing``: the
    elapsed seconds and processes of the invocation that trained the runs, when known."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csvs(collected, folder)
    compared = [suite.arm(name) for name in dict.fromkeys(name for pair in suite.pairs for name in pair)
                if name in collected.curves]
    figures = []
    if compared:
        plot_curves(compared, collected.curves, folder / "curves.png", f"{suite.name}: PAPO against its baselines")
        figures.append(("Training curves of the compared arms", "curves.png"))
    hacking = [suite.arm(name) for name in suite.hacking if name in collected.curves]
    if hacking:
        plot_curves(hacking, collected.curves, folder / "hacking.png", f"{suite.name}: high gamma, without and "
                    "with the double entropy loss")
        figures.append(("The loss-hacking arms", "hacking.png"))
    pairs = [(suite.arm(a), suite.arm(b)) for a, b in suite.pairs + ((suite.hacking,) if suite.hacking else ())
             if a in collected.measures and b in collected.measures]
    if pairs:
        plot_pairs(pairs, collected.measures, folder / "paired.png", PAIRED_MEASURES)
        figures.append(("Seed by seed (grey lines; black: mean ± se)", "paired.png"))

    walls = [seconds for per_seed in collected.wall.values() for seconds in per_seed.values()]
    # The suite's settings as the runs had them (--steps may override the suite's steps).
    settings = {name: getattr(collected.runs[0].config, name) for name in suite.settings} if collected.runs \
        else dict(suite.settings)
    lines = [f"# Experiment `{suite.name}`: {suite.description}", "",
             f"- package commit: `{package_commit()}` (`{Path(papo_kernels.__file__).parent}`)",
             f"- machine: {platform.machine()} CPU, {platform.system()}, torch {torch.__version__}, "
             f"{settings.get('num_threads', 1)} thread per training process",
             f"- command: `{command}`",
             f"- runs: {len(collected.runs)}; training wall time per run {min(walls):.0f}-{max(walls):.0f} s "
             f"(sum {sum(walls) / 60:.1f} min)" if walls else "- runs: none finished",
             ]
    if timing is not None:
        lines.append(f"- elapsed while training (the last invocation that trained runs): "
                     f"{timing['elapsed_seconds'] / 60:.1f} min with {timing['workers']} process(es) at a time")
    lines += ["", "## Settings", "", "Shared by every run (on top of the `TrainerConfig` defaults): "
              + ", ".join(f"`{name}={value}`" for name, value in settings.items()), "", "| arm | overrides | "
              "loss settings |", "| --- | --- | --- |"]
    for run in {run.arm.name: run for run in collected.runs}.values():
        loss = run.config.loss_kwargs()
        loss_text = ", ".join(f"{name} {loss[name]}" for name in ("gamma", "eta_clean", "eta_masked", "beta",
                                                                    "epsilon_low", "epsilon_high", "perception_kl"))
        lines.append(f"| {run.arm.name} | {run.arm.overrides} | {loss_text} |")
    lines += ["", "## Per arm: mean ± standard error over seeds", "",
              "Final greedy evaluation on the held-out prompts (`accuracy`), on the same prompts with masked images "
              "(`accuracy_masked`), `vision_dependence` = their difference, `peak_accuracy` the best evaluation "
              "of the run, `junk` the share of answers that are no answer of the task; the training signals are "
              "means over the last 10% of the steps (`peak_perception_kl`: the largest such window).", ""]
    lines += arm_table(suite, collected)
    lines += ["", "## PAPO against its baseline, seed by seed", ""]
    for baseline, papo in suite.pairs:
        lines += pair_section(collected, baseline, papo)
    if suite.hacking:
        lines += ["## Loss hacking at high gamma, and the double entropy loss", ""] + hacking_section(suite, collected)
    lines += ["## Figures", ""] + [f"{caption}:\n\n![{caption}]({name})\n" for caption, name in figures]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
