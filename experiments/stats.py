"""Summary statistics: mean and standard error per arm, and the seed-by-seed paired comparison."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from scipy import stats


def mean_and_se(values: Sequence[float]) -> tuple:
    """``(mean, standard error of the mean)``; the standard error is None for fewer than 2 values."""
    values = list(values)
    if not values:
        raise ValueError("mean_and_se: no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


@dataclass(frozen=True)
class Paired:
    """PAPO minus baseline on the same seeds."""
    differences: List[float]  # one per seed, in the seeds' order
    mean: float
    se: Optional[float]
    t_p: Optional[float]  # two-sided paired t-test; None with fewer than 2 seeds or all differences equal
    wins: int  # seeds where PAPO is higher
    losses: int  # seeds where the baseline is higher (ties count in neither)
    sign_p: float  # two-sided exact sign test on the wins and losses


def paired_comparison(baseline: Sequence[float], papo: Sequence[float]) -> Paired:
    if len(baseline) != len(papo) or not baseline:
        raise ValueError(f"paired_comparison: need the same non-zero number of seeds, got {len(baseline)} and "
                         f"{len(papo)}")
    differences = [b - a for a, b in zip(baseline, papo)]
    mean, se = mean_and_se(differences)
    t_p = None
    if len(differences) >= 2 and len(set(differences)) > 1:
        t_p = float(stats.ttest_rel(papo, baseline).pvalue)
    wins = sum(difference > 0 for difference in differences)
    losses = sum(difference < 0 for difference in differences)
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return Paired(differences, mean, se, t_p, wins, losses, sign_p)
