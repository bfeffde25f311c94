"""The GPU script (benchmarks/gpu_check.py) runs end to end in its CPU mode, so it is known to work before
device time is spent on it; its correctness rule fails wrong paths and keeps going after one."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import correctness, gpu_check, stages, vocab_parallel
from benchmarks.correctness import CheckedPath, Checker, CheckCase
from papo_kernels.fast_path import resolve_epilogue
from papo_kernels.fast_path.chunk_loop import bytes_per_token, tokens_per_chunk
from papo_kernels.fast_path.workspace import resolve_workspace_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 16 * 2**20


def read_csv(path: Path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``python -m benchmarks.gpu_check --cpu --tiny`` in its own process, as a GPU session runs it."""
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--tiny", "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return out, finished.stdout


def test_files_fit_what_the_device_tool_brings_back(tiny_run):
    out, _ = tiny_run
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= gpu_check.FILE_LIMIT - 1, files  # one left for the teed log
    assert {"summary.md", "correctness.csv", "stages.csv"} <= set(files)
    assert {Path(name).suffix for name in files} == {".md", ".csv", ".png"}
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
        assert 0 < (out / name).stat().st_size < MAX_FILE_BYTES


def test_every_path_and_dtype_is_checked_and_passes(tiny_run):
    out, _ = tiny_run
    rows = read_csv(out / "correctness.csv")
    for case in correctness.TINY_CASES:
        for dtype in ("bfloat16", "float16", "float32"):
            for path in correctness.PATHS:
                mine = [row for row in rows if (row["case"], row["dtype"], row["path"]) == (case.label, dtype,
                                                                                           path.name)]
                assert mine, (case.label, dtype, path.name)
                if path.triton_dot and dtype == "bfloat16":  # the interpreter cannot; the GPU run does
                    assert [row["status"] for row in mine] == ["SKIP"] and mine[0]["note"]
                    continue
                assert all(row["status"] == "PASS" for row in mine), mine
                expected = set(correctness.OUTPUTS[path.op]) | {"grad hidden"}
                if path.op != "logprobs":
                    expected.add("grad hidden_masked")
                if case.rows == "all":
                    expected.add("grad weight")
                assert {row["quantity"] for row in mine} == expected
                for row in mine:
                    assert float(row["kernel_error"]) <= float(row["bound"])


def test_stages_follow_the_chunk_loop(tiny_run):
    out, _ = tiny_run
    rows = read_csv(out / "stages.csv")
    assert {row["stage"] for row in rows if row["epilogue"] == "-" and not row["stage"].startswith(("dW product",
            "logits error"))} == {"matmul N x V", "three GEMMs, whole N"}
    shape = stages.TINY_SHAPE
    for budget in stages.TINY_PLAN:
        module = resolve_epilogue(budget.epilogue, torch.device("cpu"), torch.float32)
        per_token = bytes_per_token(shape.v, shape.d, True, 4, False,
                                    module.workspace_bytes_per_token(shape.v, True, 4))
        workspace = resolve_workspace_bytes(budget.workspace_bytes, torch.device("cpu"), budget.grad_weight, per_token)
        mine = {row["stage"]: row for row in rows if (row["epilogue"], row["dw"]) == (budget.epilogue,
                budget.grad_weight) and row["workspace_mib"] and float(row["workspace_mib"]) * stages.MiB == workspace}
        assert set(mine) == set(stages.STAGE_FLOPS_PER_NDV) | {"other"}, (budget, mine)
        chunk = tokens_per_chunk(shape.n, per_token, workspace)
        for stage, row in mine.items():
            assert int(row["chunk_tokens"]) == chunk and int(row["chunks"]) == -(-shape.n // chunk)
            if stage != "other":
                assert float(row["median_ms"]) > 0 and float(row["byte_floor_ms"]) > 0


def test_the_kernel_probes_measure_both_dw_kernels_and_both_statistics_schedules(tiny_run):
    out, _ = tiny_run
    rows = read_csv(out / "stages.csv")
    probes = stages.TINY_PROBES
    for k in probes.k_rows:
        products = {row["stage"]: row for row in rows if row["stage"].startswith("dW product")
                    and row["note"].startswith(f"K = {k} rows")}
        assert set(products) == {"dW product, addmm", "dW product, reduce-add"}, products
        for row in products.values():
            assert float(row["median_ms"]) > 0 and float(row["tflops"]) > 0
        difference = float(re.search(r"max \|reduce-add - addmm\| / max \|addmm\| = ([0-9.e+-]+)",
                                     products["dW product, reduce-add"]["note"]).group(1))
        assert difference < 1e-5  # float32 sums of the same products in another order
    for tokens in probes.token_counts:
        sweeps = {row["stage"] for row in rows if row["stage"].startswith("statistics sweep")
                  and int(row["chunk_tokens"]) == tokens and float(row["median_ms"]) > 0}
        assert sweeps == {"statistics sweep, one split", "statistics sweep, split V"}
    errors = [row["note"] for row in rows if row["stage"].startswith("logits error")]
    assert len(errors) == 2 and all("mean error of |z|" in note for note in errors)
    (in_the_loss,) = [row["note"] for row in rows if row["stage"] == "dW kernel in the loss"]
    difference = re.search(r"max \|reduce-add - addmm\| / max \|addmm\| = ([0-9.e+-]+) \(one rounding of float32",
                           in_the_loss)
    assert float(difference.group(1)) < 1e-5


def test_sweep_has_both_distributions_and_the_fast_path(tiny_run):
    out, stdout = tiny_run
    (sweep_csv,) = [path for path in out.glob("*.csv") if path.name.startswith("cpu-")]
    rows = read_csv(sweep_csv)
    assert {row["distribution"] for row in rows} == {"spread", "peaked"}
    assert {(row["op"], row["mode"]) for row in rows if row["implementation"] != "torch.matmul"} == set(
        gpu_check.PAIRS)
    for distribution in ("spread", "peaked"):
        for name in ("papo_kernels.fast.torch", "papo_kernels.fast.triton", "papo_kernels.fast.triton.256MiB",
                     "papo_kernels.fast.triton.reduce_add", "papo_kernels.triton", "naive_torch",
                     "trl_chunked_logprob"):
            (row,) = [row for row in rows if (row["implementation"], row["op"], row["distribution"])
                      == (name, "papo_loss", distribution)]
            assert row["status"] == "ok", row
    entropies = [float(m) for m in re.findall(r"peaked logits: mean token entropy ([0-9.]+) nats",
                                              " ".join(row["note"] for row in rows))]
    assert entropies and all(0.5 <= entropy <= 2.0 for entropy in entropies)
    # the summary is printed last: the device tool's reply carries the end of the output
    assert stdout.rstrip().endswith((out / "summary.md").read_text().rstrip())
    assert "All " in (out / "summary.md").read_text()


def test_the_vocabulary_parallel_part_agrees_with_one_process_and_sends_o_of_n_floats(tiny_run):
    out, _ = tiny_run
    section = (out / "summary.md").read_text().split("## Vocabulary-parallel head")[1].split("\n## ")[0]
    assert re.search(r"PASS: the largest relative difference from the single-rank call is [0-9.e+-]+", section)
    (row,) = [line for line in section.splitlines() if line.startswith("| 2 |")]
    gathers, reduces = re.search(r"\| (\d+, \d+) \| (\d+, \d+) \|", row).groups()
    setup = vocab_parallel.TINY_SETUP
    # one all-gather of 15 int64 (the inputs' description); all-reduces in one chunk: the chunk size (int64), the
    # two passes' maxima and 7 sums per token, then the two hidden gradients in backward (float64)
    assert gathers == "1, 120"
    assert reduces == f"4, {8 + 9 * setup.tokens * 8 + 2 * setup.tokens * setup.dim * 8}"


def test_each_part_gets_its_share_of_the_time_left():
    parts = gpu_check.PARTS["all"]
    assert parts.index("sweep") < parts.index("stages")  # the headline sweep is not left to what stages leave
    total = sum(gpu_check.PART_SHARES[part] for part in parts)
    first = gpu_check.part_deadline(100.0, 100.0 + total, parts)
    assert first == pytest.approx(100.0 + gpu_check.PART_SHARES[parts[0]])
    # a part that finishes early hands its unused time to the parts after it
    early = gpu_check.part_deadline(101.0, 100.0 + total, parts[1:])
    rest = sum(gpu_check.PART_SHARES[part] for part in parts[1:])
    assert early == pytest.approx(101.0 + (total - 1.0) * gpu_check.PART_SHARES[parts[1]] / rest)
    assert gpu_check.part_deadline(200.0, 100.0 + total, parts[-1:]) == 200.0  # past the limit: no new work


def test_summary_has_the_statistics_gemm_rows(tiny_run):
    out, _ = tiny_run
    summary = (out / "summary.md").read_text()
    assert "## Statistics GEMM" in summary
    table = summary.split("## Statistics GEMM", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| row", "| ---"))]
    assert {line.split(" | ")[0].removeprefix("| ") for line in rows} == set(
        ("head product", "log-probs forward", "pair forward", "fast-path logits, fused", "fast-path logits, now"))
    assert all(line.rstrip().endswith("| ok |") for line in rows), rows


def test_cpu_mode_needs_tiny(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--cpu", "--out", "unused"])
    assert exit_info.value.code == 2
    assert "--cpu runs the tiny shapes only" in capsys.readouterr().err


# The rule itself: a wrong path fails, a broken one errors, and the run goes on.

def _scaled_fast_path(factor: float):
    """papo_loss's fast path with its loss and hidden gradients scaled by ``factor``: slightly wrong."""
    run = correctness._loss_path("fast", "torch")

    def wrong(c):
        values, grads = run(c)
        return {"loss": values["loss"] * factor}, {**grads, "hidden": grads["hidden"] * factor}
    return wrong


def _broken(c):
    raise RuntimeError("kernel launch failed")


def test_the_rule_fails_a_slightly_wrong_path_and_every_path_still_runs():
    case = CheckCase("tiny", 16, 72, 16, "spread", "all")
    paths = [CheckedPath("wrong", "papo_loss", _scaled_fast_path(1 + 1e-3), False),
             CheckedPath("broken", "papo_loss", _broken, False),
             next(path for path in correctness.PATHS if path.name == "papo_loss/fast/torch")]
    rows = Checker([case], [torch.float32], torch.device("cpu"), paths=paths, log=lambda text: None).run()
    status = {(row["path"], row["quantity"]): row["status"] for row in rows}
    assert status[("wrong", "loss")] == "FAIL" and status[("wrong", "grad hidden")] == "FAIL"
    assert status[("wrong", "grad weight")] == "PASS"  # left right on purpose
    assert status[("broken", "*")] == "ERROR"
    assert {value for (path, _), value in status.items() if path == "papo_loss/fast/torch"} == {"PASS"}


def test_the_rule_fails_nan_and_a_missing_gradient():
    truth = torch.tensor([1.0, 2.0], dtype=torch.float64)
    same = truth + 1e-7
    assert correctness.budget(truth + 1e-7, same, truth, 1e-6)["status"] == "PASS"
    assert correctness.budget(torch.tensor([1.0, float("nan")]), same, truth, 1e-6)["status"] == "FAIL"
    assert correctness.budget(None, same, truth, 1e-6)["status"] == "FAIL"
    assert correctness.budget(None, None, None, 1e-6)["status"] == "PASS"

