"""The benchmark harness runs end to end on tiny CPU shapes, so it never rots, and counts FLOPs right."""

import csv
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import papo_kernels

from benchmarks import distributions, flops, run
from benchmarks.implementations import MODES, OPS, Shape, backward, implementations, make_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "skipped", "error", "oom", "over_budget"}


def test_flop_floor_of_the_qwen_3b_head():
    n, d, v = 2048, 2048, 151936
    one_pass_forward = 1_274_531_545_088  # 2 N D V: 1.27 TFLOP for 2048 tokens through a 2048 x 151936 head
    assert flops.lm_head_flops("logprobs", "forward", n, d, v) == one_pass_forward
    assert flops.lm_head_flops("logprobs", "backward", n, d, v) == 2 * one_pass_forward
    assert flops.lm_head_flops("perception_kl", "full", n, d, v) == 6 * one_pass_forward
    assert flops.lm_head_flops("papo_loss", "full", n, d, v) == 6 * one_pass_forward
    assert flops.matmul_flops(n, d, v) == one_pass_forward
    assert flops.tflops(one_pass_forward, 1000.0) == pytest.approx(1.274531545088)


# Cut Cross-Entropy's kernels fail under Triton's interpreter (InterpreterError): it runs on CUDA only.
CPU_IMPLEMENTATIONS = [impl for impl in implementations() if impl.name != "cut_cross_entropy"]
CPU_CASES = [pytest.param(impl, op, distribution, id=f"{impl.name}-{op}-{distribution}")
             for impl in CPU_IMPLEMENTATIONS for op in OPS if op in impl.ops
             for distribution in (distributions.DISTRIBUTIONS if op == "papo_loss" else ("spread",))]


@pytest.mark.parametrize("impl, op, distribution", CPU_CASES)
def test_every_implementation_computes_the_same_outputs_and_gradients(impl, op, distribution):
    """The comparison is fair only if every peer computes what the package computes."""
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        pytest.skip(f"{impl.module} not installed")
    reason = impl.skip_reason(op, "full", torch.device("cpu"), torch.float32, interpreter_shape=True)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(Shape(8, 16, 128), torch.float32, torch.device("cpu"), distribution=distribution)

    def outputs_and_gradients(build):
        outputs = build(op, inputs)()
        backward(op, inputs, outputs)
        gradients = [leaf.grad for leaf in inputs.leaves()]
        inputs.zero_grad()
        return [out.detach() for out in outputs], gradients

    reference = next(impl for impl in implementations() if impl.name == "papo_kernels.reference")
    expected = outputs_and_gradients(reference.build)
    got = outputs_and_gradients(impl.build)
    for name, want, have in zip(("output", "gradient"), expected, got):
        for index, (a, b) in enumerate(zip(want, have)):
            if a is None or b is None:
                assert a is None and b is None, f"{name} {index}: one of them is None"
                continue
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {index}: {m}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The CI run, in its own process: the runner sets torch's thread count and glibc's malloc options."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks.run", "--cpu", "--quick", "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (csv_path,) = out.glob("*.csv")
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    return csv_path, rows


def test_csv_is_long_format_and_labelled_cpu(quick_run):
    csv_path, rows = quick_run
    assert csv_path.name.startswith("cpu-")
    assert tuple(rows[0]) == run.COLUMNS
    assert {row["status"] for row in rows} <= STATUSES
    for row in rows:
        assert row["device"].startswith("CPU ")
        assert row["version"] == papo_kernels.__version__
        assert row["git_sha"] and row["date"]


def test_every_backend_op_and_mode_is_measured(quick_run):
    _, rows = quick_run
    sweep = run.SWEEPS["quick"]
    smallest = str(sweep.ns[0])
    measured = {(row["implementation"], row["op"], row["mode"]): row for row in rows
                if row["case"] == "sweep" and row["N"] == smallest}
    names = [f"papo_kernels.{name}" for name in papo_kernels.BACKENDS if name != "auto"] + ["naive_torch",
                                                                                          "trl_chunked_logprob"]
    for name in names:
        for op in OPS:
            for mode in MODES:
                assert_measured(measured[(name, op, mode)])
    for name in ("papo_kernels.fast.torch", "papo_kernels.fast.triton"):  # the interpreter shape is the smallest
        assert_measured(measured[(name, "papo_loss", "full")])
        for op, mode in [(op, mode) for op in OPS for mode in MODES if (op, mode) != ("papo_loss", "full")]:
            row = measured[(name, op, mode)]
            assert row["status"] == "skipped" and row["note"], row
    for row in rows:
        assert row["distribution"] == "spread"
        if row["status"] == "ok" and row["implementation"] != run.MATMUL and row["case"] == "sweep":
            assert "spread logits: mean token entropy" in row["note"], row
    matmul_ns = {row["N"] for row in rows if row["implementation"] == run.MATMUL and row["status"] == "ok"}
    assert matmul_ns == {str(n) for n in sweep.ns}


def assert_measured(row):
    assert row["status"] == "ok", row
    assert 0 < float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert float(row["tflops"]) > 0
    assert float(row["peak_mem_mib"]) >= 0


def test_largest_n_search_has_a_row_per_implementation(quick_run):
    _, rows = quick_run
    searched = [row for row in rows if row["case"] == "max_n"]
    assert {row["implementation"] for row in searched} == {
        row["implementation"] for row in rows if row["case"] == "sweep" and row["implementation"] != run.MATMUL}
    for row in searched:
        assert float(row["budget_mib"]) == run.SWEEPS["quick"].budget_mib
        if row["status"] == "ok":
            assert float(row["peak_mem_mib"]) <= float(row["budget_mib"])


def test_markdown_and_plot_are_written(quick_run):
    csv_path, _ = quick_run
    text = csv_path.with_suffix(".md").read_text()
    assert text.startswith("# papo-kernels benchmarks: CPU")
    assert "| implementation | mode | N |" in text
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--quick"], "one of the arguments --gpu --cpu is required"),
    (["--cpu", "--reps", "0"], "expected a positive integer"),
    (["--cpu", "--implementations", "nope"], "invalid choice"),
    (["--cpu", "--n", "700"], "multiples of 512"),
    (["--cpu", "--pairs", "papo_loss:sideways"], "expected OP:MODE"),
    (["--cpu", "--distributions", "flat"], "invalid choice"),
    (["--cpu", "--time-limit-s", "-1"], "expected a positive number"),
])
def test_bad_command_lines_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_peaked_inputs_have_a_trained_models_entropy_and_sampled_tokens():
    x = make_inputs(Shape(512, 32, 1000), torch.float32, torch.device("cpu"), seed=3, distribution="peaked")
    low, high = distributions.PEAKED_RANGE
    entropy = distributions.mean_entropy(x.hidden.detach(), x.weight.detach())
    assert low <= entropy <= high
    assert f"mean token entropy {entropy:.3g} nats" in x.description
    log_p = torch.log_softmax(x.hidden.detach() @ x.weight.detach().T, dim=-1)
    # tokens drawn from p: E[-log p(y)] is the entropy; uniform tokens would give about log V + the peak's depth
    surprise = float(-log_p.gather(1, x.tokens[:, None]).mean())
    assert abs(surprise - entropy) < 0.25, (surprise, entropy)
    spread = make_inputs(Shape(512, 32, 1000), torch.float32, torch.device("cpu"), seed=3)
    assert distributions.mean_entropy(spread.hidden.detach(), spread.weight.detach()) > 0.9 * math.log(1000)


def test_a_run_past_its_time_limit_records_every_case_as_skipped_and_still_writes_its_files(tmp_path):
    sweep = run.SWEEPS["quick"]
    chosen = [impl for impl in implementations() if impl.name in ("papo_kernels.torch", "naive_torch")]
    csv_path, rows = run.run_sweep(sweep, torch.device("cpu"), chosen, [("papo_loss", "full")], False, tmp_path,
                                   "test", deadline=time.monotonic() - 1.0)
    assert rows and all(row["status"] == "skipped" and row["note"] == run.TIME_LIMIT_NOTE for row in rows)
    assert csv_path.exists() and csv_path.with_suffix(".md").exists()
    assert csv_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
