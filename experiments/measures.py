"""What each run measured, read from its ``metrics.jsonl``.

Final evaluation (greedy answers to the held-out prompts at the last step):
``accuracy`` on the clean images, ``accuracy_masked`` on masked copies (one fixed mask
per prompt, the training mask settings), ``vision_dependence`` = their difference,
``junk`` and ``junk_masked`` (answers that are no answer of the task),
``peak_accuracy`` (the best evaluation of the run, a collapse shows as peak > final) and
``mean_accuracy`` (the mean of every evaluation of the run: the area under the learning
curve, which measures how fast it learned).

Training signals, each the mean over the last ``TAIL_FRACTION`` of the steps:
``perception_kl``, ``entropy``, ``entropy_masked``, ``clip_fraction_high``,
``clip_fraction_low``, ``junk_sampled`` (the share of sampled responses that are not
exactly one word: junk tokens beside or instead of the answer, 1 - the format score) and
``reward``;
``peak_perception_kl`` is the largest mean over any window of that length. The loss
signals exist only for steps that updated the policy (a step whose advantages are all
0 is skipped); their means are over those steps, and None when a window has none. A run
without PAPO terms has no masked pass: its perception KL and masked entropy are None.
"""

from typing import Dict, List, Optional, Sequence

EVAL_FIELDS = {"accuracy": "eval_accuracy", "accuracy_masked": "eval_accuracy_masked", "junk": "eval_junk",
               "junk_masked": "eval_junk_masked"}
TRAIN_FIELDS = ("reward", "perception_kl", "entropy", "entropy_masked", "clip_fraction_high", "clip_fraction_low",
                "junk_sampled")
TAIL_FRACTION = 0.1
MASKED_PASS_FIELDS = ("perception_kl", "entropy_masked")
RUN_MEASURES = tuple(EVAL_FIELDS) + ("vision_dependence", "peak_accuracy", "mean_accuracy") + TRAIN_FIELDS + (
    "peak_perception_kl",)


def prepare_records(records: Sequence[Dict], masked_pass: bool) -> List[Dict]:
    """The step records with ``junk_sampled`` added; without a masked pass (a baseline, for which the trainer
    logs 0), less the perception KL and the masked entropy."""
    prepared = []
    for record in records:
        record = {name: value for name, value in record.items() if masked_pass or name not in MASKED_PASS_FIELDS}
        record["junk_sampled"] = 1.0 - float(record["format"])
        prepared.append(record)
    return prepared


def window_mean(records: Sequence[Dict], name: str) -> Optional[float]:
    """Mean of ``name`` over the records that have it; None when none has."""
    values = [float(record[name]) for record in records if name in record]
    return sum(values) / len(values) if values else None


def run_measures(records: Sequence[Dict], steps: int) -> Dict[str, Optional[float]]:
    """The measures of one finished run (``records``: its ``metrics.jsonl``, one per step, ``prepare_records``)."""
    if [record["step"] for record in records] != list(range(steps)):
        raise ValueError(f"metrics: expected one record per step 0..{steps - 1}, got {len(records)} records")
    evaluations = [record for record in records if "eval_accuracy" in record]
    if not evaluations or evaluations[-1]["step"] != steps - 1:
        raise ValueError("metrics: the run has no evaluation at its last step (eval_every 0?)")
    last = evaluations[-1]
    measures = {name: float(last[field]) for name, field in EVAL_FIELDS.items()}
    measures["vision_dependence"] = measures["accuracy"] - measures["accuracy_masked"]
    measures["peak_accuracy"] = max(float(record["eval_accuracy"]) for record in evaluations)
    measures["mean_accuracy"] = sum(float(record["eval_accuracy"]) for record in evaluations) / len(evaluations)
    window = max(1, round(TAIL_FRACTION * steps))
    for name in TRAIN_FIELDS:
        measures[name] = window_mean(records[-window:], name)
    window_kls = [window_mean(records[start:start + window], "perception_kl")
                  for start in range(steps - window + 1)]
    measures["peak_perception_kl"] = max((kl for kl in window_kls if kl is not None), default=None)
    return measures


def curve_rows(records: Sequence[Dict]) -> List[Dict[str, Optional[float]]]:
    """One row per evaluation: its step, the evaluation fields and each training signal averaged over the steps
    since the previous evaluation (what the curves plot)."""
    rows, since = [], []
    for record in records:
        since.append(record)
        if "eval_accuracy" not in record:
            continue
        row = {"step": record["step"]}
        row.update({field: float(record[field]) for field in EVAL_FIELDS.values()})
        row.update({name: window_mean(since, name) for name in TRAIN_FIELDS})
        rows.append(row)
        since = []
    return rows
