"""The training curves: reward, accuracy, perception KL and both entropies against step, written atomically."""

from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .files import write_atomically  # noqa: E402

PLOT_NAME = "training_curves.png"
SMOOTHING = 20


def _series(records: List[Dict[str, Any]], key: str):
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _running_mean(values: List[float], window: int) -> List[float]:
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_metrics(records: List[Dict[str, Any]], output_dir, title: str) -> Path:
    """Write ``output_dir/training_curves.png`` from the step records of ``metrics.jsonl``."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        (axes[0], "reward and accuracy", [("reward", "reward (sampled)"), ("accuracy", "accuracy (sampled)"),
                                          ("eval_accuracy", "accuracy (greedy, held out)")]),
        (axes[1], "perception KL (per token)", [("perception_kl", "KL(clean || masked)")]),
        (axes[2], "entropy (per token)", [("entropy", "clean image"), ("entropy_masked", "masked image")]),
    ]
    for axis, name, keys in panels:
        for key, label in keys:
            steps, values = _series(records, key)
            if not steps:
                continue
            if key == "eval_accuracy":
                axis.plot(steps, values, label=label, marker="o", linewidth=1.5)
                continue
            # The raw per-step values are noisy: faint, with their running mean over SMOOTHING steps on top.
            line, = axis.plot(steps, values, linewidth=0.6, alpha=0.35)
            axis.plot(steps, _running_mean(values, SMOOTHING), color=line.get_color(), linewidth=1.5,
                      linestyle="--" if key == "entropy_masked" else "-", label=f"{label}, mean of {SMOOTHING} steps")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(output_dir) / PLOT_NAME
    try:
        write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(figure)
    return path
