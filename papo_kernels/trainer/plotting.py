"""The training curves: reward, accuracy, perception KL and both entropies against step."""

from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PLOT_NAME = "training_curves.png"


def _series(records: List[Dict[str, Any]], key: str):
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


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
            if steps:
                axis.plot(steps, values, label=label, marker="o" if key == "eval_accuracy" else None,
                          linewidth=1.5 if key == "eval_accuracy" else 0.8)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(output_dir) / PLOT_NAME
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
