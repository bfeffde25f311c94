"""The experiment runner: a smoke suite end to end (two arms, two seeds, a handful of steps, one process per run),
the per-run measures, and the paired statistics against values worked out by hand."""

import csv
import json

import pytest

from experiments.__main__ import main
from experiments.arms import SUITES
from experiments.measures import prepare_records, run_measures
from experiments.runner import DONE_NAME, plan_runs, train_runs
from experiments.stats import mean_and_se, paired_comparison
from papo_kernels.trainer.checkpoint import load_checkpoint
from papo_kernels.trainer.metrics_log import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_smoke_suite_writes_runs_curves_plots_and_report(tmp_path, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--suite", "smoke", "--seeds", "2", "--runs-dir", str(runs), "--results-dir", str(results)]
    assert main(argv) == 0

    rows = read_csv(results / "runs.csv")
    assert sorted((row["arm"], row["seed"]) for row in rows) == [("dapo", "0"), ("dapo", "1"), ("papo_d", "0"),
                                                                  ("papo_d", "1")]
    for row in rows:
        for name in ("accuracy", "accuracy_masked", "junk", "junk_masked", "peak_accuracy"):
            assert 0.0 <= float(row[name]) <= 1.0, (name, row)
        assert float(row["vision_dependence"]) == pytest.approx(float(row["accuracy"]) - float(row["accuracy_masked"]))
        assert float(row["wall_seconds"]) > 0
        # The baseline has no masked pass: no perception KL; PAPO-D has one.
        assert (row["peak_perception_kl"] == "") == (row["arm"] == "dapo")
        assert row["arm"] != "dapo" or row["entropy_masked"] == row["perception_kl"] == ""
        measures = json.loads((runs / row["arm"] / f"seed{row['seed']}" / "result.json").read_text())
        assert measures["accuracy"] == pytest.approx(float(row["accuracy"]))

    curves = read_csv(results / "curves.csv")
    # Evaluations at steps 0 and 2 (eval_every 2, 3 steps) for each of the 4 runs.
    assert sorted(int(row["step"]) for row in curves) == [0] * 4 + [2] * 4
    for name in ("curves.png", "paired.png"):
        assert (results / name).read_bytes()[:8] == PNG
    report = (results / "report.md").read_text()
    for text in ("### papo_d against dapo (2 seeds)", "paired t-test p", "sign test p", "package commit",
                 "![Training curves of the compared arms](curves.png)"):
        assert text in report, text

    # A second invocation finds every run done and trains nothing.
    capsys.readouterr()
    assert main(argv) == 0
    assert "started" not in capsys.readouterr().out


def test_a_run_an_earlier_attempt_left_unfinished_trains_from_the_start(tmp_path):
    suite = SUITES["smoke"]
    [run] = plan_runs(suite, [suite.arm("dapo")], [0], tmp_path / "runs", {"steps": 1, "eval_every": 0})
    run.folder.mkdir(parents=True)
    (run.folder / "checkpoint.pt").write_bytes(b"the checkpoint of an attempt killed before its last step")
    (run.folder / "metrics.jsonl").write_text('{"step": 0, "reward": 0.5}\n')
    messages = []
    assert train_runs([run], workers=1, echo=messages.append) == [], messages
    assert (run.folder / DONE_NAME).is_file()
    assert load_checkpoint(run.folder)["next_step"] == 1
    assert [record["step"] for record in read_metrics(run.folder)] == [0]


def test_bad_arguments_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--suite", "smoke", "--arms", "ppo"])
    assert "--arms: got 'ppo', suite 'smoke' has ['dapo', 'papo_d']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--suite", "smoke", "--seeds", "0"])
    assert "--seeds: got 0, expected a positive integer" in capsys.readouterr().err


def record(step, **values):
    return {"step": step, "reward": 0.5, "format": 1.0, **values}


def test_run_measures_take_the_last_evaluation_and_the_tail_means():
    records = [record(step, perception_kl=float(step), entropy=1.0) for step in range(20)]
    records[0].update(eval_accuracy=0.9, eval_accuracy_masked=0.2, eval_junk=0.0, eval_junk_masked=0.5)
    records[19].update(eval_accuracy=0.5, eval_accuracy_masked=0.25, eval_junk=0.25, eval_junk_masked=0.0)
    del records[18]["perception_kl"]  # a skipped step: no loss metrics
    records[19]["format"] = 0.25
    measures = run_measures(prepare_records(records, masked_pass=True), steps=20)
    assert measures["accuracy"] == 0.5 and measures["peak_accuracy"] == 0.9 and measures["mean_accuracy"] == 0.7
    assert measures["vision_dependence"] == pytest.approx(0.25)
    assert measures["junk_sampled"] == pytest.approx((0.0 + 0.75) / 2)
    # The tail is the last 10% of 20 steps: steps 18 and 19, of which only 19 has the KL.
    assert measures["perception_kl"] == 19.0 and measures["entropy"] == 1.0
    assert measures["peak_perception_kl"] == 19.0
    assert measures["clip_fraction_high"] is None
    baseline = run_measures(prepare_records(records, masked_pass=False), steps=20)
    assert baseline["perception_kl"] is None and baseline["peak_perception_kl"] is None
    with pytest.raises(ValueError, match="no evaluation at its last step"):
        run_measures(prepare_records(records[:-1], masked_pass=True), steps=19)


def test_paired_statistics_match_hand_computed_values():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx((5 / 3 / 4) ** 0.5)
    # Differences 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), t = 3 / sqrt(0.5) = 4.2426 on 4 degrees of freedom,
    # two-sided p = 0.01324; the sign test of 5 wins and no loss gives p = 2 / 2^5 = 0.0625.
    result = paired_comparison([0.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert result.mean == 3.0 and result.se == pytest.approx(0.5 ** 0.5)
    assert result.t_p == pytest.approx(0.013236, abs=1e-5)
    assert (result.wins, result.losses) == (5, 0) and result.sign_p == pytest.approx(0.0625)
    ties = paired_comparison([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert ties.t_p is None and ties.sign_p == 1.0 and (ties.wins, ties.losses) == (0, 0)
    with pytest.raises(ValueError, match="the same non-zero number of seeds"):
        paired_comparison([0.1], [0.1, 0.2])
