"""Sweep shapes and implementations; write one long-format CSV, a markdown table and a plot.

    python -m benchmarks.run --gpu            # bf16, Qwen2.5-VL heads, N = 2048 .. 16384
    python -m benchmarks.run --cpu            # small fp32 shapes: shows the harness works, not GPU speed
    python -m benchmarks.run --cpu --quick    # tiny shapes, what CI runs
    python -m benchmarks.run --gpu --pairs papo_loss:full logprobs:forward --distributions spread peaked

Every implementation runs in this process on the same inputs (``make_inputs``),
case after case, so each ratio in the results was measured side by side in one
run. Per case and mode: median and 20/80% quantiles of the wall time, the
achieved TFLOP/s of the analytic FLOP floor, and the peak memory above the
inputs. A plain matrix product of the same size gives the rate the device
reaches on this work. Each shape runs with each logit distribution asked for
(``spread``, ``peaked``: benchmarks/distributions.py). Last, the largest N whose
papo_loss (full mode) fits a fixed memory budget, per implementation.

Results go to ``<out>/<device-slug>.csv`` (one row per measurement), ``.md`` and ``.png``.
"""

import argparse
import csv
import ctypes
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import papo_kernels

from . import flops
from .distributions import DISTRIBUTIONS
from .implementations import MODES, OPS, Implementation, Inputs, Shape, backward, implementations, make_inputs

COLUMNS = ("implementation", "op", "mode", "N", "D", "V", "dtype", "distribution", "median_ms", "p20_ms", "p80_ms", "peak_mem_mib",
           "tflops", "device", "date", "version", "git_sha", "reps", "case", "budget_mib", "status", "note")
MIN_REPS = 3
MATMUL = "torch.matmul"
NAIVE = "naive_torch"
MAX_N_OP = "papo_loss"
CPU_THREADS = 1  # CPU runs share their machine with other jobs; one thread is disturbed least
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


INTERPRETER_HEAD = "interpreter-tiny"
TIME_LIMIT_NOTE = "not run: the time limit was reached"


@dataclass(frozen=True)
class Case:
    """One shape of a head with one logit distribution."""

    head: str
    shape: Shape
    distribution: str = "spread"


@dataclass(frozen=True)
class Sweep:
    """Shapes and settings of one kind of run: every head x N x distribution, or the ``explicit`` cases."""

    dtype: torch.dtype
    heads: Dict[str, Tuple[int, int]]  # name -> (D, V)
    ns: Tuple[int, ...]
    reps: int
    warmup: int
    budget_mib: float  # memory budget of the largest-N search
    n_step: int  # the largest-N search works in multiples of this
    n_limit: int  # and stops here
    case_seconds: float  # a case stops timing after this long, once it has MIN_REPS timed runs
    interpreter_shape: Optional[Shape] = None  # on CPU, Triton implementations run here only, interpreted
    distributions: Tuple[str, ...] = ("spread",)
    explicit: Tuple[Case, ...] = ()  # when given, these cases instead of heads x ns x distributions

    def all_heads(self) -> Dict[str, Tuple[int, int]]:
        heads = dict(self.heads)
        shape = self.interpreter_shape
        if shape is not None and (shape.d, shape.v) not in heads.values():
            heads = {INTERPRETER_HEAD: (shape.d, shape.v), **heads}
        return heads

    def cases(self) -> List[Case]:
        if self.explicit:
            cases = list(self.explicit)
        else:
            cases = [Case(head, Shape(n, d, v), distribution) for head, (d, v) in self.heads.items()
                     for n in self.ns for distribution in self.distributions]
        if self.interpreter_shape is not None and self.interpreter_shape not in [case.shape for case in cases]:
            distributions = dict.fromkeys(case.distribution for case in cases)
            cases[:0] = [Case(INTERPRETER_HEAD, self.interpreter_shape, distribution) for distribution in distributions]
        return cases


SWEEPS = {
    "gpu": Sweep(dtype=torch.bfloat16, heads={"Qwen2.5-VL-3B": (2048, 151936), "Qwen2.5-VL-7B": (3584, 152064)},
                 ns=(2048, 4096, 8192, 16384), reps=20, warmup=3, budget_mib=40 * 1024, n_step=1024,
                 n_limit=262144, case_seconds=15),
    "cpu": Sweep(dtype=torch.float32, heads={"cpu-small": (256, 4096)}, ns=(128, 256, 512, 1024), reps=5, warmup=1,
                 budget_mib=128, n_step=512, n_limit=4096, case_seconds=5, interpreter_shape=Shape(16, 32, 256)),
    "quick": Sweep(dtype=torch.float32, heads={"cpu-tiny": (16, 128)}, ns=(8, 32), reps=2, warmup=0,
                   budget_mib=2, n_step=512, n_limit=2048, case_seconds=1, interpreter_shape=Shape(8, 16, 128)),
}


class PeakMemory:
    """Peak memory above a baseline: the CUDA allocator's counters, or the process's RSS on CPU.

    On CPU the kernel's high-water mark of resident memory (VmHWM) is reset through
    /proc/self/clear_refs, and glibc is told to serve every allocation of 64 KiB or
    more with its own mapping, so that freed tensors leave the resident set and each
    measurement sees only the memory its own case touches.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.unavailable = None
        if device.type == "cpu":
            self.unavailable = self._prepare_cpu()

    @staticmethod
    def _prepare_cpu() -> Optional[str]:
        if platform.system() != "Linux" or not os.access("/proc/self/clear_refs", os.W_OK):
            return "peak memory not measured: needs Linux's /proc/self/clear_refs"
        libc = ctypes.CDLL(None)
        mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD in malloc.h
        if not (hasattr(libc, "mallopt") and libc.mallopt(mmap_threshold, 1 << 16)
                and libc.mallopt(trim_threshold, 1 << 16)):
            return "peak memory not measured: needs glibc's mallopt"
        return None

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status_kib("VmRSS:") / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status_kib("VmHWM:") / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last shape left behind (gc.collect takes a fraction of a second: once per shape)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(forward, op: str, inputs: Inputs, mode: str):
    """One run of ``mode``; the forward of the backward mode runs before the clock starts."""
    if mode == "forward":
        return forward()
    backward(op, inputs, forward())
    return None


def time_mode(forward, op: str, inputs: Inputs, mode: str, sweep: Sweep, device: torch.device):
    """Wall times in ms of up to ``sweep.reps`` runs after ``sweep.warmup`` runs; only the backward is timed in
    backward mode. Slow cases stop early, after at least MIN_REPS timed runs, once ``sweep.case_seconds`` are spent."""
    times = []
    deadline = time.perf_counter() + sweep.case_seconds
    for rep in range(sweep.warmup + sweep.reps):
        if len(times) >= MIN_REPS and time.perf_counter() > deadline:
            break
        inputs.zero_grad()
        outputs = forward() if mode == "backward" else None
        synchronize(device)
        start = time.perf_counter()
        if mode == "backward":
            backward(op, inputs, outputs)
        else:
            outputs = run_mode(forward, op, inputs, mode)
        synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        del outputs
        if rep >= sweep.warmup:
            times.append(elapsed)
    inputs.zero_grad()
    return times


def peak_memory_mib(forward, op: str, inputs: Inputs, mode: str, meter: PeakMemory) -> float:
    """Peak memory of one run of ``mode`` above what was resident before its forward (inputs, head)."""
    if meter.unavailable:
        return math.nan
    inputs.zero_grad()
    synchronize(meter.device)
    meter.reset()
    baseline = meter.current_mib()
    if mode == "backward":
        outputs = forward()
        synchronize(meter.device)
        meter.reset()
        backward(op, inputs, outputs)
    else:
        outputs = run_mode(forward, op, inputs, mode)
    synchronize(meter.device)
    peak = meter.peak_mib() - baseline
    del outputs
    inputs.zero_grad()
    return max(peak, 0.0)  # RSS counters are cached per thread: a peak of ~0 can read a few KiB below


def describe(error: Exception) -> str:
    """The error's type and the first line of its message, for a results row."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def quantiles(times: Sequence[float]) -> Dict[str, float]:
    p20, median, p80 = np.quantile(np.asarray(times), [0.2, 0.5, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


class CsvFile:
    """The results file, written row by row so that an interrupted run keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = path.open("w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=COLUMNS)
        self.writer.writeheader()

    @staticmethod
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return f"{value:.6g}" if isinstance(value, float) else value

    def write(self, row: Dict[str, object]) -> None:
        self.writer.writerow({column: self.cell(row[column]) for column in COLUMNS})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class Runner:
    """Runs the cases of one sweep and collects the rows."""

    def __init__(self, sweep: Sweep, device: torch.device, chosen: List[Implementation],
                 pairs: Sequence[Tuple[str, str]], max_n: bool, context: Dict[str, str], csv_file: CsvFile,
                 deadline: Optional[float] = None):
        self.sweep, self.device, self.chosen, self.pairs = sweep, device, chosen, list(pairs)
        self.max_n = max_n
        self.deadline = deadline  # time.monotonic() after which no case starts
        self.context = context
        self.csv_file = csv_file
        self.meter = PeakMemory(device)
        self.rows: List[Dict[str, object]] = []
        self.inputs: Dict[tuple, str] = {}  # (N, D, V, distribution) -> the inputs' description

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def row(self, implementation: str, op: str, mode: str, shape: Optional[Shape], **values) -> Dict[str, object]:
        row = {column: None for column in COLUMNS}
        row.update(implementation=implementation, op=op, mode=mode, dtype=str(self.sweep.dtype).removeprefix("torch."),
                   distribution="spread", case="sweep", status="ok", **self.context)
        if shape is not None:
            row.update(N=shape.n, D=shape.d, V=shape.v)
        row.update(values)
        self.rows.append(row)
        self.csv_file.write(row)
        return row

    def log(self, row: Dict[str, object]) -> None:
        median = row["median_ms"]
        timing = f"{median:9.3f} ms" if median is not None else f"{row['status']:>12}"
        print(f"  {row['implementation']:<28} {row['op']:<14} {row['mode']:<9} N={row['N'] or '-'!s:<6} "
              f"{row['distribution']:<7} {timing}  "
              f"{row['note'] or ''}", file=sys.stderr, flush=True)

    def measure(self, implementation: str, op: str, mode: str, shape: Shape, forward, inputs: Inputs,
                flop_count: int, note: Optional[str]) -> None:
        where = dict(distribution=inputs.distribution)
        try:
            times = time_mode(forward, op, inputs, mode, self.sweep, self.device)
            peak = peak_memory_mib(forward, op, inputs, mode, self.meter)
        except torch.cuda.OutOfMemoryError:
            row = self.row(implementation, op, mode, shape, **where, status="oom", note="out of device memory")
            release(self.device)  # an OOM's partial allocations must not burden the next case
        except Exception as error:  # a peer failing on this device is a result to record, not a crash
            row = self.row(implementation, op, mode, shape, **where, status="error", note=describe(error))
            release(self.device)
        else:
            stats = quantiles(times)
            notes = [text for text in (note, self.meter.unavailable, inputs.description) if text]
            row = self.row(implementation, op, mode, shape, **where, **stats, reps=len(times), peak_mem_mib=peak,
                           tflops=flops.tflops(flop_count, stats["median_ms"]), note="; ".join(notes))
        inputs.zero_grad()
        self.log(row)

    def matmul(self, shape: Shape, inputs: Inputs) -> None:
        """The rate of a plain matrix product of the logits' size, the yardstick of this device."""
        hidden, weight = inputs.hidden.detach(), inputs.weight.detach()
        self.measure(MATMUL, "matmul", "forward", shape, lambda: (hidden @ weight.T,), inputs,
                     flops.matmul_flops(shape.n, shape.d, shape.v), "hidden @ weight.T alone, no autograd")

    def skip(self, impl: str, op: str, mode: str, shape: Shape, distribution: str, reason: str) -> None:
        self.log(self.row(impl, op, mode, shape, distribution=distribution, status="skipped", note=reason))

    def sweep_cases(self) -> None:
        interpreter_shape = self.sweep.interpreter_shape
        for case in self.sweep.cases():
            shape = case.shape
            print(f"{case.head}: N={shape.n} D={shape.d} V={shape.v} {case.distribution}", file=sys.stderr, flush=True)
            if self.out_of_time():
                for impl in self.chosen:
                    for op, mode in self.pairs:
                        self.skip(impl.name, op, mode, shape, case.distribution, TIME_LIMIT_NOTE)
                continue
            inputs = make_inputs(shape, self.sweep.dtype, self.device, distribution=case.distribution)
            print(f"  inputs: {inputs.description}", file=sys.stderr, flush=True)
            self.inputs[(shape.n, shape.d, shape.v, case.distribution)] = inputs.description
            self.matmul(shape, inputs)
            for impl in self.chosen:
                forwards = {}
                for op, mode in self.pairs:
                    reason = (TIME_LIMIT_NOTE if self.out_of_time() else
                              impl.skip_reason(op, mode, self.device, self.sweep.dtype, shape == interpreter_shape))
                    if reason:
                        self.skip(impl.name, op, mode, shape, case.distribution, reason)
                        continue
                    try:
                        forward = forwards[op] = forwards.get(op) or impl.build(op, inputs)
                    except Exception as error:  # a peer that cannot even build its call is recorded
                        self.log(self.row(impl.name, op, mode, shape, distribution=case.distribution,
                                          status="error", note=describe(error)))
                        continue
                    note = ("TRITON_INTERPRET=1: Triton's interpreter on CPU, not a speed figure"
                            if impl.interpreted(op, self.device) else None)
                    self.measure(impl.name, op, mode, shape, forward, inputs,
                                 flops.lm_head_flops(op, mode, shape.n, shape.d, shape.v), note)
            del inputs
            release(self.device)

    def fits(self, impl: Implementation, shape: Shape) -> Tuple[bool, float]:
        """Whether one papo_loss full step at ``shape`` stays within the budget, and its peak (MiB)."""
        inputs = make_inputs(shape, self.sweep.dtype, self.device)
        try:
            forward = impl.build(MAX_N_OP, inputs)
            run_mode(forward, MAX_N_OP, inputs, "full")
            peak = peak_memory_mib(forward, MAX_N_OP, inputs, "full", self.meter)
        except torch.cuda.OutOfMemoryError:
            return False, math.nan
        finally:
            del inputs
            release(self.device)
        return peak <= self.sweep.budget_mib, peak

    def largest_n(self, impl: Implementation) -> None:
        """Doubling, then bisection, over multiples of n_step up to n_limit."""
        head, (d, v) = list(self.sweep.heads.items())[-1]
        step, limit, budget = self.sweep.n_step, self.sweep.n_limit, self.sweep.budget_mib
        best, best_peak, first_peak, low, high = None, math.nan, math.nan, 0, None
        n = step
        try:
            while n <= limit:
                ok, peak = self.fits(impl, Shape(n, d, v))
                first_peak = peak if n == step else first_peak
                if not ok:
                    high = n
                    break
                best, best_peak, low = n, peak, n
                n *= 2
            while high is not None and high - low > step:
                middle = (low + high) // 2 // step * step
                ok, peak = self.fits(impl, Shape(middle, d, v))
                if ok:
                    best, best_peak, low = middle, peak, middle
                else:
                    high = middle
        except Exception as error:  # as in measure: a peer's failure is recorded
            row = self.row(impl.name, MAX_N_OP, "full", Shape(n, d, v), case="max_n", budget_mib=budget,
                           status="error", note=describe(error))
            self.log(row)
            return
        if best is None:
            row = self.row(impl.name, MAX_N_OP, "full", Shape(step, d, v), case="max_n", budget_mib=budget,
                           peak_mem_mib=first_peak, status="over_budget",
                           note=f"{head}: N = {step} already exceeds the budget")
        else:
            limit_note = f"; search stopped at its limit N = {limit}" if high is None else ""
            row = self.row(impl.name, MAX_N_OP, "full", Shape(best, d, v), case="max_n", budget_mib=budget,
                           peak_mem_mib=best_peak,
                           note=f"{head}: largest multiple of {step} within the budget{limit_note}")
        self.log(row)

    def largest_n_cases(self) -> None:
        if self.meter.unavailable:
            print(f"largest-N search skipped: {self.meter.unavailable}", file=sys.stderr)
            return
        print(f"largest N within {self.sweep.budget_mib:g} MiB ({MAX_N_OP}, full)", file=sys.stderr, flush=True)
        for impl in self.chosen:
            reason = (TIME_LIMIT_NOTE if self.out_of_time() else
                      impl.skip_reason(MAX_N_OP, "full", self.device, self.sweep.dtype, interpreter_shape=False))
            if reason:
                head, (d, v) = list(self.sweep.heads.items())[-1]
                self.log(self.row(impl.name, MAX_N_OP, "full", None, D=d, V=v, case="max_n",
                                  budget_mib=self.sweep.budget_mib, status="skipped", note=reason))
                continue
            self.largest_n(impl)

    def run(self) -> List[Dict[str, object]]:
        self.sweep_cases()
        if self.max_n:
            self.largest_n_cases()
        return self.rows


# Device, provenance and file names.

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"CPU {model} ({threads} thread{'s' if threads > 1 else ''})"


def device_slug(device: torch.device, name: str) -> str:
    words = re.sub(r"\(.*?\)|\bCPU\b", " ", name) if device.type == "cpu" else name
    slug = re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")
    return f"cpu-{slug}" if device.type == "cpu" else slug


def git_sha() -> str:
    """HEAD's SHA, with ``-dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# Output files.

def _number(value, digits: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, digits)


def section(head: str, d: int, v: int, distribution: str, sweep_rows: List[Dict[str, object]],
            matmul_rate: Dict[tuple, float], naive_time: Dict[tuple, float], inputs: Dict[tuple, str]) -> List[str]:
    """The tables of one head and one logit distribution, one per op; ``inputs`` describes each case's inputs."""
    mine = [row for row in sweep_rows if (row["D"], row["V"], row["distribution"]) == (d, v, distribution)]
    if not mine:
        return []
    lines = [f"## {head} (D = {d}, V = {v}), {distribution} logits", ""]
    described = sorted((n, text) for (n, dd, vv, dist), text in inputs.items() if (dd, vv, dist) == (d, v, distribution))
    lines += [f"- inputs at N = {n}: {text}" for n, text in described] + ([""] if described else [])
    order = {mode: i for i, mode in enumerate(MODES)}
    for op in ["matmul", *OPS]:
        selected = [row for row in mine if row["op"] == op]
        if not selected:
            continue
        lines += [f"### {op}", "", "| implementation | mode | N | median ms [p20, p80] | TFLOP/s | % mm | "
                  "x naive | peak MiB | status |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for row in sorted(selected, key=lambda r: (order.get(r["mode"], 0), r["N"])):
            key = (row["N"], row["D"], row["V"], row["distribution"])
            ok = row["status"] == "ok"
            rate = matmul_rate.get(key)
            fraction = 100 * row["tflops"] / rate if ok and rate else None
            naive = naive_time.get((row["op"], row["mode"], *key))
            speedup = naive / row["median_ms"] if ok and naive else None
            timing = (f"{row['median_ms']:.3f} [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]" if ok else "-")
            note = (row["note"] or "").removesuffix(inputs.get(key, "\0")).rstrip("; ")  # the inputs are above
            status = row["status"] + (f": {note}" if note else "")
            lines.append(f"| {row['implementation']} | {row['mode']} | {row['N']} | {timing} | "
                         f"{_number(row['tflops'], '.3g')} | {_number(fraction, '.1f')} | "
                         f"{_number(speedup, '.2f')} | {_number(row['peak_mem_mib'], '.1f')} | {status} |")
        lines.append("")
    return lines


def markdown(rows: List[Dict[str, object]], chosen: List[Implementation], sweep: Sweep, device: torch.device,
             command: str, inputs: Dict[tuple, str]) -> str:
    first = rows[0]
    lines = [
        f"# papo-kernels benchmarks: {first['device']}",
        "",
        f"Run of {first['date']}, papo_kernels {first['version']}, git {first['git_sha']}, dtype {first['dtype']}, "
        f"up to {sweep.reps} timed runs per case after {sweep.warmup} warm-up (a case stops after {sweep.case_seconds:g} s "
        f"once it has {min(MIN_REPS, sweep.reps)}; the CSV's reps column has the count). Command: `{command}`.",
        "",
        "Times are wall-clock medians [20%, 80%]; TFLOP/s count only the LM-head matrix products "
        "(2NDV forward, 4NDV backward per pass, see benchmarks/flops.py); '% mm' is that rate over the rate of "
        f"a plain matrix product of the same size (`{MATMUL}`) measured in this run; 'x naive' is the naive "
        "PyTorch time over this time, same case, same run. Peak memory is above the inputs and the LM head "
        "already resident (gradients and everything the op allocates count).",
        "",
    ]
    if device.type == "cpu":
        lines += ["**CPU run.** These figures show that the harness works; they are not GPU figures. Rows marked "
                  "TRITON_INTERPRET=1 time Triton's interpreter, not a kernel. CPU peak memory is the growth of the "
                  "process's resident-set high-water mark (VmHWM), good to about 0.1 MiB.", ""]
    lines += ["## What each implementation computes", "", "| implementation | computes |", "| --- | --- |"]
    lines += [f"| {impl.name} | {impl.computes} |" for impl in chosen]
    lines += [""]

    skipped = [row for row in rows if row["status"] == "skipped"]
    if skipped:
        lines += ["## Not run here", "", "| implementation | reason | ops and modes |", "| --- | --- | --- |"]
        reasons: Dict[Tuple[str, str], Dict[str, None]] = {}
        for row in skipped:
            what = f"{row['op']} {row['mode']}" + (" (largest N)" if row["case"] == "max_n" else "")
            reasons.setdefault((row["implementation"], row["note"]), {})[what] = None
        for (name, reason), cases in reasons.items():
            lines.append(f"| {name} | {reason} | {', '.join(cases)} |")
        lines.append("")

    sweep_rows = [row for row in rows if row["case"] == "sweep" and row["status"] != "skipped"]
    matmul_rate = {(row["N"], row["D"], row["V"], row["distribution"]): row["tflops"] for row in sweep_rows
                   if row["implementation"] == MATMUL and row["status"] == "ok"}
    naive_time = {(row["op"], row["mode"], row["N"], row["D"], row["V"], row["distribution"]): row["median_ms"]
                  for row in sweep_rows if row["implementation"] == NAIVE and row["status"] == "ok"}
    heads = {(d, v): name for name, (d, v) in sweep.all_heads().items()}
    heads.update({(case.shape.d, case.shape.v): case.head for case in sweep.cases() if (case.shape.d, case.shape.v)
                  not in heads})
    for (d, v), head in heads.items():
        for distribution in DISTRIBUTIONS:
            lines += section(head, d, v, distribution, sweep_rows, matmul_rate, naive_time, inputs)

    max_rows = [row for row in rows if row["case"] == "max_n"]
    max_rows = [row for row in max_rows if row["status"] != "skipped"]
    if max_rows:
        lines += [f"## Largest N within {sweep.budget_mib:g} MiB ({MAX_N_OP}, full mode)", "",
                  "| implementation | largest N | peak MiB there | status |", "| --- | ---: | ---: | --- |"]
        for row in max_rows:
            status = row["status"] + (f": {row['note']}" if row["note"] else "")
            largest = row["N"] if row["status"] == "ok" else "-"
            lines.append(f"| {row['implementation']} | {largest} | {_number(row['peak_mem_mib'], '.1f')} | {status} |")
        lines.append("")
    return "\n".join(lines)


PLOTTED = (("papo_loss", "full"), ("perception_kl", "full"), ("logprobs", "full"), ("logprobs", "forward"))
MODE_TITLES = {"full": "forward + backward", "forward": "forward", "backward": "backward"}


def plot(rows: List[Dict[str, object]], sweep: Sweep, device: torch.device, path: Path) -> None:
    """Time and peak memory against N, one line per implementation, a row of panels per head, distribution and
    (op, mode) of PLOTTED that has results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["case"] == "sweep" and row["status"] == "ok"]
    heads = dict.fromkeys((case.head, case.shape.d, case.shape.v) for case in sweep.cases())
    panels = [(head, d, v, distribution, op, mode) for head, d, v in heads for distribution in DISTRIBUTIONS
              for op, mode in PLOTTED
              if any((r["D"], r["V"], r["distribution"], r["op"], r["mode"]) == (d, v, distribution, op, mode)
                     for r in ok)]
    figure, axes = plt.subplots(max(1, len(panels)), 2, figsize=(11, 3.2 * max(1, len(panels))), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no measurement succeeded", ha="center")
    label = "CPU" if device.type == "cpu" else "GPU"
    names = list(dict.fromkeys(row["implementation"] for row in rows))
    styles = {name: dict(color=plt.cm.tab20(i % 20), marker="osD^vx*+<>ph"[i % 11]) for i, name in enumerate(names)}
    for (head, d, v, distribution, op, mode), (time_axis, memory_axis) in zip(panels, axes):
        selected = [row for row in ok if (row["D"], row["V"], row["distribution"], row["op"], row["mode"])
                    == (d, v, distribution, op, mode)]
        for name in dict.fromkeys(row["implementation"] for row in selected):
            points = sorted((row["N"], row["median_ms"], row["peak_mem_mib"]) for row in selected
                            if row["implementation"] == name)
            ns = [p[0] for p in points]
            time_axis.plot(ns, [p[1] for p in points], label=name, **styles[name])
            memory_axis.plot(ns, [p[2] for p in points], label=name, **styles[name])
        time_axis.set_yscale("log")
        memory_axis.set_yscale("symlog", linthresh=1.0)  # a peak of 0 MiB stays on the plot
        for axis, what in ((time_axis, "median time (ms)"), (memory_axis, "peak memory above inputs (MiB)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("N (tokens per pass)")
            axis.set_ylabel(what)
            axis.set_title(f"{label} {head}, {distribution}: {op}, {MODE_TITLES[mode]}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
        time_axis.legend(fontsize=6)
    first = rows[0]
    figure.suptitle(f"{first['device']}, {first['date']}, git {first['git_sha'][:12]}, {first['dtype']}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.12 / max(1, len(panels))))  # room for the title
    figure.savefig(path, dpi=90)
    plt.close(figure)


# Command line.

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def op_mode(text: str) -> Tuple[str, str]:
    op, _, mode = text.partition(":")
    if op not in OPS or mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected OP:MODE with OP in {list(OPS)} and MODE in {list(MODES)}, "
                                         f"got {text!r}")
    return op, mode


def parse_args(argv: Optional[Sequence[str]], names: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--gpu", action="store_true", help="bf16 sweep of the Qwen2.5-VL heads on CUDA device 0")
    target.add_argument("--cpu", action="store_true", help="small fp32 shapes on the CPU")
    parser.add_argument("--quick", action="store_true", help="with --cpu: tiny shapes and few runs (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--implementations", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"subset to run, among {', '.join(names)} (default all)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default all)")
    parser.add_argument("--pairs", nargs="+", type=op_mode, metavar="OP:MODE",
                        help="these (op, mode) pairs instead of every op x mode, e.g. papo_loss:full logprobs:forward")
    parser.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS, help="logit distributions of the "
                        "inputs (default spread; benchmarks/distributions.py)")
    parser.add_argument("--n", nargs="+", type=positive_int, metavar="N", help="tokens per pass, instead of the "
                        "sweep's (multiples of 512 above 512)")
    parser.add_argument("--reps", type=positive_int, help="timed runs per case (default: the sweep's)")
    parser.add_argument("--warmup", type=nonnegative_int, help="untimed runs first (default: the sweep's)")
    parser.add_argument("--budget-mib", type=positive_float, help="memory budget of the largest-N search")
    parser.add_argument("--no-max-n", action="store_true", help="skip the largest-N search")
    parser.add_argument("--time-limit-s", type=positive_float, help="start no case after this many seconds; the "
                        "cases left are recorded as skipped and the files still written")
    args = parser.parse_args(argv)
    if args.quick and not args.cpu:
        parser.error("--quick goes with --cpu only")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device, and torch.cuda.is_available() is False here; use --cpu")
    for n in args.n or ():
        if n > 512 and n % 512:
            parser.error(f"--n: values above 512 must be multiples of 512 (papo_loss sees (N / 512, 512) "
                         f"responses), got {n}")
    return args


def run_sweep(sweep: Sweep, device: torch.device, chosen: List[Implementation], pairs: Sequence[Tuple[str, str]],
              max_n: bool, out: Path, command: str, deadline: Optional[float] = None) -> Tuple[Path, List[dict]]:
    """Runs ``sweep`` and writes ``<out>/<device-slug>.csv``, ``.md`` and ``.png``; returns the CSV's path and
    the rows."""
    name = device_name(device)
    context = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "version": papo_kernels.__version__, "git_sha": git_sha()}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / device_slug(device, name)
    csv_file = CsvFile(stem.with_suffix(".csv"))
    runner = Runner(sweep, device, chosen, pairs, max_n, context, csv_file, deadline)
    try:
        rows = runner.run()
    finally:
        csv_file.close()
    stem.with_suffix(".md").write_text(markdown(rows, chosen, sweep, device, command, runner.inputs))
    plot(rows, sweep, device, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, .md and .png", file=sys.stderr)
    return stem.with_suffix(".csv"), rows


def main(argv: Optional[Sequence[str]] = None) -> Path:
    started = time.monotonic()
    chosen_all = implementations()
    args = parse_args(argv, [impl.name for impl in chosen_all])
    sweep = SWEEPS["gpu" if args.gpu else "quick" if args.quick else "cpu"]
    overrides = {key: value for key, value in (("ns", tuple(sorted(set(args.n or ()))) or None), ("reps", args.reps),
                                               ("warmup", args.warmup), ("budget_mib", args.budget_mib),
                                               ("distributions", tuple(args.distributions or ()) or None))
                 if value is not None}
    sweep = dataclasses.replace(sweep, **overrides)
    device = torch.device("cuda" if args.gpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    chosen = [impl for impl in chosen_all if impl.name in args.implementations]
    pairs = args.pairs or [(op, mode) for op in args.ops for mode in args.modes]
    deadline = None if args.time_limit_s is None else started + args.time_limit_s
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    csv_path, _ = run_sweep(sweep, device, chosen, pairs, not args.no_max_n, args.out, command, deadline)
    return csv_path


if __name__ == "__main__":
    main()
