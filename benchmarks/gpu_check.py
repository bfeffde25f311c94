"""One command for a session with a GPU: correctness of every GPU path, the speed and memory of every path
and peer, and where the fast path's time goes, in one process and one device call.

    python -m benchmarks.gpu_check --out $OUT                  # all parts
    python -m benchmarks.gpu_check --out $OUT --part check     # environment, correctness, stages
    python -m benchmarks.gpu_check --out $OUT --part sweep     # environment, the sweep with the peers
    python -m benchmarks.gpu_check --cpu --tiny --out DIR      # all parts at a tiny size on the CPU (CI)

Parts, in the order they run (benchmarks/NOTES.md, "GPU"):

1. environment: versions, the device, the peers' imports, ``out_dtype`` support, and the two
   ceilings measured here (bf16 matrix-product rate, copy bandwidth);
2. correctness (``correctness.py``): every GPU path in bf16, then fp16, then fp32, at the
   Qwen2.5-VL heads against the float64 reference, the error-budget rule, a PASS/FAIL row per
   quantity;
3. sweep (``run.py``): papo_loss forward + backward and the forward-only log-probs of every
   implementation and peer, both logit distributions at the headline shape first, against the
   same-run matrix-product rate;
4. stages (``stages.py``): the fast path at D = 3584, V = 152064, N = 16384, bf16: first the kernel
   probes (``fast_path_probes.py``: dW by addmm and by the reduce-add kernel at K = 1024 to 4096, the
   statistics sweep with one vocabulary split and split over V, the logits' error against float64),
   then stage by stage for workspace budgets of 256 MiB to 2 GiB and the default policy, with dW by
   addmm and by the reduce-add kernel;
5. logit statistics (``logit_statistics.py``): the statistics GEMM at the same shape, its forward-only log-probs
   and its use as the fast path's logits product, beside the same-run head product (a table in the summary);
6. vocab_parallel (``vocab_parallel.py``): papo_loss over a vocabulary-parallel head in two gloo
   processes on the CPU (one device holds no group of ranks), float64 at a tiny size, against the
   single-rank call (every difference at most 1e-10), with what its collectives carried.

Files under ``--out`` (at most 7: the device tool brings back 8, each under 16 MiB):
``summary.md``, ``correctness.csv``, ``stages.csv``, the sweep's ``<device>.csv``, ``.md``
and ``.png``; a teed log makes the 7th. A time limit (``--time-limit-s``, 540 s by default,
inside the tool's 600 s) stops starting new work a minute before it and still writes every
file; each part may start work only within its share of it (``PART_SHARES``). The summary is
printed last.
"""

import argparse
import csv
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import correctness, environment, logit_statistics, run, stages, vocab_parallel
from .implementations import Shape, implementations

PARTS = {"all": ("correctness", "sweep", "stages", "logit_statistics", "vocab_parallel"),
         "check": ("correctness", "stages", "vocab_parallel"), "sweep": ("sweep",), "correctness": ("correctness",),
         "stages": ("stages",), "logit_statistics": ("logit_statistics",), "vocab_parallel": ("vocab_parallel",)}
# Each part's share of the time limit: a part may start new work until its share of what is left runs out, and
# time a part leaves unused passes to the parts after it. One device call holds every part (a task's device time
# is 15 minutes, a machine's start included), so no part can starve the headline sweep.
PART_SHARES = {"correctness": 3, "sweep": 4, "stages": 2, "logit_statistics": 1, "vocab_parallel": 1}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAIRS = (("papo_loss", "full"), ("logprobs", "forward"))
HEADS = {"Qwen2.5-VL-3B": (2048, 151936), "Qwen2.5-VL-7B": (3584, 152064)}
HEADLINE = ("Qwen2.5-VL-7B", 16384)
GPU_SWEEP = run.Sweep(
    dtype=torch.bfloat16, heads=HEADS, ns=(), reps=5, warmup=1, budget_mib=40 * 1024, n_step=1024, n_limit=262144,
    case_seconds=4, explicit=tuple(run.Case(head, Shape(n, *HEADS[head]), distribution) for head, n, distribution in (
        ("Qwen2.5-VL-7B", 16384, "spread"), ("Qwen2.5-VL-7B", 16384, "peaked"), ("Qwen2.5-VL-7B", 4096, "spread"),
        ("Qwen2.5-VL-7B", 4096, "peaked"), ("Qwen2.5-VL-3B", 16384, "spread"))))
TINY_HEAD = "tiny"
TINY_SHAPE = Shape(16, 16, 72)
TINY_SWEEP = run.Sweep(
    dtype=torch.float32, heads={TINY_HEAD: (TINY_SHAPE.d, TINY_SHAPE.v)}, ns=(), reps=1, warmup=0, budget_mib=2,
    n_step=512, n_limit=512, case_seconds=1, interpreter_shape=TINY_SHAPE,
    explicit=(run.Case(TINY_HEAD, TINY_SHAPE, "spread"), run.Case(TINY_HEAD, TINY_SHAPE, "peaked")))
FILE_LIMIT = 8
RESERVE_S = 60  # no new work in the last minute of the time limit: the case in flight ends, the files are written
STAGE_REPS = {"cuda": (5, 1), "cpu": (1, 0)}  # (timed runs, warm-up runs)


def log(text: str) -> None:
    print(text, flush=True)


def write_csv(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: run.CsvFile.cell(row.get(key)) for key in columns})


def _number(value, digits: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, digits)


def environment_section(device: torch.device, ceiling_lines: List[str]) -> List[str]:
    lines = ["## Environment", ""]
    lines += [f"- {name}: {value}" for name, value in environment.versions().items()]
    lines += [f"- {name}: {value}" for name, value in environment.device_facts(device).items()]
    lines += [f"- peer {name}: {status}" for name, status in environment.peer_imports().items()]
    lines += [f"- ceiling: {line}" for line in ceiling_lines]
    return lines + [""]


def correctness_section(rows: Sequence[Dict[str, object]]) -> List[str]:
    """Per path and dtype: quantities passed out of compared, the worst kernel/torch error ratio; then every
    row that did not pass."""
    lines = ["## Correctness (error budget: kernel error <= 4 x same-dtype reference error + atol x max |truth|)", "",
             "| path | dtype | passed | failed | errors | skipped | worst error / same-dtype error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["path"], row["dtype"]), []).append(row)
    for (path, dtype), group in groups.items():
        counts = {status: sum(row["status"] == status for row in group) for status in correctness.STATUSES}
        ratios = [row["kernel_error"] / row["torch_error"] for row in group
                  if row["kernel_error"] is not None and row["torch_error"]]
        lines.append(f"| {path} | {dtype} | {counts['PASS']} | {counts['FAIL']} | {counts['ERROR']} | "
                     f"{counts['SKIP']} | {_number(max(ratios, default=None), '.3g')} |")
    bad = [row for row in rows if row["status"] in ("FAIL", "ERROR")]
    lines += ["", f"Not passed: {len(bad)} of {len(rows)} rows." if bad else f"All {len(rows)} compared rows passed "
              "or were skipped with a reason.", ""]
    for row in bad:
        lines.append(f"- {row['status']} {row['path']} {row['dtype']} {row['case']} {row['quantity']}: error "
                     f"{_number(row['kernel_error'], '.3g')} > bound {_number(row['bound'], '.3g')} "
                     f"(same dtype {_number(row['torch_error'], '.3g')}) {row['note'] or ''}")
    return lines + [""]


def stages_section(rows: Sequence[Dict[str, object]]) -> List[str]:
    if not rows:
        return []
    first = rows[0]
    lines = [f"## Fast path stages (N = {first['N']}, D = {first['D']}, V = {first['V']}, {first['dtype']})", "",
             "| stage | epilogue | dW | workspace MiB | chunk tokens | chunks | median ms | TFLOP/s | flop floor ms | "
             "byte floor ms | note |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['epilogue']} | {row['dw']} | {_number(row['workspace_mib'], '.4g')} | "
                     f"{row['chunk_tokens'] or '-'} | {row['chunks'] or '-'} | {_number(row['median_ms'], '.3f')} | "
                     f"{_number(row['tflops'], '.1f')} | {_number(row['flop_floor_ms'], '.3f')} | "
                     f"{_number(row['byte_floor_ms'], '.3f')} | {row['note'] or ''} |")
    return lines + [""]


def sweep_section(rows: Sequence[Dict[str, object]], headline_n: int, headline_dv: tuple) -> List[str]:
    """The sweep's rows at the headline shape: time, rate, share of the same-run matrix-product rate."""
    at = [row for row in rows if row["case"] == "sweep" and (row["N"], row["D"], row["V"]) == (headline_n,
                                                                                               *headline_dv)]
    if not at:
        return []
    rate = {row["distribution"]: row["tflops"] for row in at if row["implementation"] == run.MATMUL
            and row["status"] == "ok"}
    lines = [f"## Sweep at the headline shape (N = {headline_n}, D, V = {headline_dv})", "",
             "| implementation | op | mode | distribution | median ms | TFLOP/s | % mm | peak MiB | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in at:
        if row["status"] == "skipped" and row["implementation"] != run.MATMUL:
            continue
        fraction = (100 * row["tflops"] / rate[row["distribution"]] if row["status"] == "ok" and
                    rate.get(row["distribution"]) else None)
        note = row["status"] if row["status"] == "ok" else f"{row['status']}: {(row['note'] or '')[:80]}"
        lines.append(f"| {row['implementation']} | {row['op']} | {row['mode']} | {row['distribution']} | "
                     f"{_number(row['median_ms'], '.2f')} | {_number(row['tflops'], '.1f')} | "
                     f"{_number(fraction, '.1f')} | {_number(row['peak_mem_mib'], '.0f')} | {note} |")
    return lines + [""]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder ($OUT on the device machine)")
    parser.add_argument("--part", choices=list(PARTS), default="all", help="what to run after the environment")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny only)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: shows that the script works (CI)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes of the correctness part (default all)")
    parser.add_argument("--time-limit-s", type=run.positive_float, default=540.0,
                        help="start no new work after this many seconds less a minute (default 540)")
    args = parser.parse_args(argv)
    if args.cpu and not args.tiny:
        parser.error("--cpu runs the tiny shapes only: add --tiny (the Qwen2.5-VL heads need a GPU)")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False); use --cpu --tiny")
    return args


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    deadline: float
    ceilings: stages.Ceilings


def correctness_part(context: Context) -> List[str]:
    args, path = context.args, context.args.out / "correctness.csv"
    cases = correctness.TINY_CASES if args.tiny else correctness.GPU_CASES
    checker = correctness.Checker(cases, [DTYPES[name] for name in args.dtypes], context.device,
                                  deadline=context.deadline, log=log)
    rows = checker.run(progress=lambda rows: write_csv(path, rows))  # rewritten after each case and dtype
    return correctness_section(rows)


def stages_part(context: Context) -> List[str]:
    args, device = context.args, context.device
    shape, plan, probes = ((stages.TINY_SHAPE, stages.TINY_PLAN, stages.TINY_PROBES) if args.tiny
                           else (stages.GPU_SHAPE, stages.GPU_PLAN, stages.GPU_PROBES))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    timer = stages.Timer(device, *STAGE_REPS[device.type])
    path = args.out / "stages.csv"
    rows = stages.StageRun(shape, dtype, device, plan, context.ceilings, timer, context.deadline, log).run(
        probes, progress=lambda rows: write_csv(path, rows))
    return stages_section(rows)


def sweep_part(context: Context) -> List[str]:
    args = context.args
    sweep = TINY_SWEEP if args.tiny else GPU_SWEEP
    command = f"python -m benchmarks.gpu_check {' '.join(args.argv)} (sweep part)"
    _, rows = run.run_sweep(sweep, context.device, implementations(), PAIRS, False, args.out, command,
                            context.deadline)
    head, n = (TINY_HEAD, sweep.explicit[0].shape.n) if args.tiny else HEADLINE
    return sweep_section(rows, n, sweep.heads[head])


def logit_statistics_part(context: Context) -> List[str]:
    timer = stages.Timer(context.device, *STAGE_REPS[context.device.type])
    rows = logit_statistics.run_rows(context.device, context.args.tiny, timer, context.deadline, log)
    return logit_statistics.section(rows)


VOCAB_PARALLEL_TOLERANCE = 1e-10  # float64: the group's loss and gradients against the single-rank call's


def vocab_parallel_part(context: Context) -> List[str]:
    lines = ["## Vocabulary-parallel head (2 gloo processes on the CPU against the single-rank call)", ""]
    if time.monotonic() > context.deadline:
        return lines + [run.TIME_LIMIT_NOTE, ""]
    load = os.getloadavg()
    rows = vocab_parallel.run(vocab_parallel.TINY_SETUP, (1, 2))
    worst = max(max(row["loss_error"], row["hidden_grad_error"], row["weight_grad_error"]) for row in rows)
    verdict = "PASS" if worst <= VOCAB_PARALLEL_TOLERANCE else "FAIL"
    return lines + vocab_parallel.markdown(vocab_parallel.TINY_SETUP, rows, load) + [
        "", f"{verdict}: the largest relative difference from the single-rank call is {worst:.1e} "
        f"(at most {VOCAB_PARALLEL_TOLERANCE:g} passes).", ""]


PART_RUNS = {"correctness": correctness_part, "stages": stages_part, "sweep": sweep_part,
             "logit_statistics": logit_statistics_part, "vocab_parallel": vocab_parallel_part}


def part_deadline(now: float, deadline: float, remaining_parts: Sequence[str]) -> float:
    """When the first of ``remaining_parts`` must stop starting new work: its share of the time left."""
    shares = [PART_SHARES[part] for part in remaining_parts]
    return now + max(deadline - now, 0.0) * shares[0] / sum(shares)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    started = time.monotonic()
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(run.CPU_THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = PARTS[args.part]

    log(f"# gpu_check: parts {', '.join(parts)} on {device}, git {run.git_sha()}")
    try:
        ceilings, ceiling_lines = environment.measure_ceilings(device, stages.Timer(device, 10, 3))
    except Exception as error:  # the stage floors are then left empty, everything else runs
        ceilings, ceiling_lines = stages.Ceilings(math.nan, math.nan), [f"not measured: {run.describe(error)}"]
    summary = [f"# papo-kernels GPU check: {run.device_name(device)}", "",
               f"Command: `python -m benchmarks.gpu_check {' '.join(args.argv)}`, git {run.git_sha()}.", ""]
    summary += environment_section(device, ceiling_lines)
    log("\n".join(summary))

    deadline = started + max(args.time_limit_s - RESERVE_S, 0.0)
    for index, part in enumerate(parts):
        context = Context(args, device, part_deadline(time.monotonic(), deadline, parts[index:]), ceilings)
        try:
            summary += PART_RUNS[part](context)
        except Exception as error:  # a part that breaks is reported; the others still run and the files are written
            traceback.print_exc()
            summary += [f"## {part}: FAILED", "", run.describe(error), ""]
            run.release(device)

    summary += [f"Total {time.monotonic() - started:.0f} s."]
    path = args.out / "summary.md"
    path.write_text("\n".join(summary) + "\n")
    files = sorted(p for p in args.out.iterdir() if p.is_file())
    if len(files) > FILE_LIMIT - 1:
        log(f"WARNING: {len(files)} files under {args.out}; the device tool brings back {FILE_LIMIT}")
    log("\n".join(summary))  # last: the reply of the device tool carries the end of the output
    return path


if __name__ == "__main__":
    main()
