"""The report's figures: training curves per arm (mean over seeds with the standard error band) and the
seed-by-seed paired comparison."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .arms import Arm  # noqa: E402
from .stats import mean_and_se  # noqa: E402

# Panel title, then (curve field, line style) pairs; a dashed line is the masked image's.
CURVE_PANELS = (
    ("held-out greedy accuracy (dashed: masked images)", (("eval_accuracy", "-"), ("eval_accuracy_masked", "--"))),
    ("perception KL per token", (("perception_kl", "-"),)),
    ("entropy per token (dashed: masked images)", (("entropy", "-"), ("entropy_masked", "--"))),
    ("upper clip fraction", (("clip_fraction_high", "-"),)),
    ("junk: held-out answers (dashed: masked images), sampled responses (dotted)",
     (("eval_junk", "-"), ("eval_junk_masked", "--"), ("junk_sampled", ":"))),
    ("sampled reward", (("reward", "-"),)),
)


def _mean_curve(curves: Sequence[List[Dict]], field: str) -> Tuple[List[int], List[float], List[float]]:
    """Steps, mean and standard error over the runs, at the steps where every run has a value."""
    steps, means, errors = [], [], []
    for rows in zip(*curves):
        values = [row[field] for row in rows]
        if any(value is None for value in values):
            continue
        mean, se = mean_and_se(values)
        steps.append(rows[0]["step"])
        means.append(mean)
        errors.append(se or 0.0)
    return steps, means, errors


def plot_curves(arms: Sequence[Arm], curves: Dict[str, Dict[int, List[Dict]]], path: Path, title: str) -> Path:
    """``curves[arm][seed]``: the run's curve rows (``measures.curve_rows``)."""
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for axis, (name, fields) in zip(axes.flat, CURVE_PANELS):
        for number, arm in enumerate(arms):
            color = f"C{number}"
            for field, style in fields:
                steps, means, errors = _mean_curve(list(curves[arm.name].values()), field)
                if not steps:
                    continue
                axis.plot(steps, means, style, color=color, linewidth=1.5, label=arm.label if style == "-" else None)
                axis.fill_between(steps, [m - e for m, e in zip(means, errors)],
                                  [m + e for m, e in zip(means, errors)], color=color, alpha=0.15, linewidth=0)
        if name.startswith("perception KL"):
            axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_pairs(pairs: Sequence[Tuple[Arm, Arm]], measures: Dict[str, Dict[int, Dict]], path: Path,
               fields: Sequence[Tuple[str, str]], title: Optional[str] = None) -> Path:
    """One panel per (pair, measure): each seed's baseline and PAPO values joined by a line, means in black.
    ``measures[arm][seed]`` are the run's measures."""
    figure, axes = plt.subplots(len(pairs), len(fields), figsize=(4.5 * len(fields), 3.8 * len(pairs)),
                                squeeze=False)
    for row, (baseline, papo) in enumerate(pairs):
        seeds = sorted(set(measures[baseline.name]) & set(measures[papo.name]))
        for column, (field, name) in enumerate(fields):
            axis = axes[row][column]
            for seed in seeds:
                values = [measures[baseline.name][seed][field], measures[papo.name][seed][field]]
                axis.plot([0, 1], values, marker="o", color="grey", alpha=0.6, linewidth=1)
                axis.annotate(str(seed), (1.03, values[1]), fontsize=7, color="grey", va="center")
            for x, arm in enumerate((baseline, papo)):
                mean, se = mean_and_se([measures[arm.name][seed][field] for seed in seeds])
                axis.errorbar([x], [mean], yerr=[se or 0.0], marker="s", color="black", capsize=4, markersize=7)
            axis.set_xticks([0, 1], [baseline.name, papo.name])
            axis.set_xlim(-0.3, 1.3)
            axis.set_title(f"{name} ({len(seeds)} seeds)", fontsize=10)
            axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
