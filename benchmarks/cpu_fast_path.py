"""The fast path's CPU bar (issue 15): the full PAPO loss forward+backward against the matrix-product rate.

In one process, on the same inputs (``implementations.make_inputs``, PAPO-D with exact KL and
entropies, gradient through both passes and the head), for each thread count:

- ``matmul``: the chunk loop's three products at full size, ``logits = H2 W^T``, ``dH2 = dZ W``
  and ``dW = dZ^T H2`` with H2 the (2N, D) stacked hidden states: 12 N D V, the yardstick;
- ``fast/native``, ``fast/torch``: ``papo_loss(path="fast")`` with each epilogue;
- ``per_token/torch``: ``papo_loss(path="per_token", backend="torch")``.

Runs go round-robin (one of each per repetition) so drift hits all alike; the table gives
medians, the rate on 12 N D V, its share of the same-run matmul rate, and the speed-up over the
per-token path. Time it on a quiet machine: the load average is printed before and after.

    python -m benchmarks.cpu_fast_path                      # N = 1024, D = 1024, V = 32768, 1 and 2 threads
    python -m benchmarks.cpu_fast_path --n 256 --d 128 --v 1000 --reps 2   # a smoke run
"""

import argparse
import os
import statistics
import subprocess
import time
from datetime import date
from typing import Callable, Dict, List

import torch

import papo_kernels
from benchmarks.implementations import PAPO_LOSS_CONFIG, TEMPERATURE, Inputs, Shape, make_inputs

IMPLEMENTATIONS = ("matmul", "fast/native", "fast/torch", "per_token/torch")


def matmul_yardstick(x: Inputs) -> Callable[[], None]:
    """The three products of the chunk loop at full size, into buffers made once."""
    rows = torch.cat([x.hidden, x.hidden_masked]).detach()
    weight = x.weight.detach()
    logits = torch.empty(rows.shape[0], weight.shape[0])
    grad_rows = torch.empty_like(rows)
    grad_weight = torch.zeros_like(weight)

    def run() -> None:
        torch.mm(rows, weight.T, out=logits)
        torch.mm(logits, weight, out=grad_rows)
        torch.addmm(grad_weight, logits.T, rows, out=grad_weight)

    return run


def papo_step(x: Inputs, path: str, backend: str) -> Callable[[], None]:
    def run() -> None:
        x.zero_grad()
        loss, _ = papo_kernels.papo_loss(
            x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
            hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path=path, backend=backend,
            **PAPO_LOSS_CONFIG)
        loss.backward()

    return run


def time_round_robin(runs: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, float]:
    """Median seconds of each run over ``reps`` rounds, after ``warmup`` rounds."""
    seconds: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(warmup + reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def git_revision() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "papo_kernels", "csrc", "benchmarks"]).returncode
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    shape = Shape(args.n, args.d, args.v)
    x = make_inputs(shape, torch.float32, torch.device("cpu"))
    runs = {"matmul": matmul_yardstick(x), "fast/native": papo_step(x, "fast", "native"),
            "fast/torch": papo_step(x, "fast", "torch"), "per_token/torch": papo_step(x, "per_token", "torch")}
    flops = 12 * shape.n * shape.d * shape.v
    print(f"# CPU fast path, {date.today()}, git {git_revision()}, torch {torch.__version__}, "
          f"N={shape.n} D={shape.d} V={shape.v} float32, median of {args.reps} after {args.warmup} warm-up")
    print(f"# load average before: {os.getloadavg()}")
    print("| threads | implementation | median s | GFLOP/s on 12NDV | % of matmul rate | x per_token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        medians = time_round_robin(runs, args.reps, args.warmup)
        for name in IMPLEMENTATIONS:
            seconds = medians[name]
            print(f"| {threads} | {name} | {seconds:.3f} | {flops / seconds / 1e9:.1f} | "
                  f"{100 * medians['matmul'] / seconds:.1f} | {medians['per_token/torch'] / seconds:.2f} |")
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
