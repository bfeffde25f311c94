"""papo_loss over a vocabulary-parallel head in gloo processes on the CPU, against the single-rank call: agreement,
what the collectives carry, and time (benchmarks/NOTES.md, "Vocabulary-parallel head").

    python -m benchmarks.vocab_parallel                                 # 1, 2 and 4 processes, the note's shape
    python -m benchmarks.vocab_parallel --ranks 1 2 --tokens 64 --dim 16 --vocab 203 --dtype float64

Each run spawns P processes (P = 1 is the plain call with the whole head, no group) with ``--threads`` torch
threads each, the head split into P blocks of rows as an even split leaves them (V need not divide by P). Every
rank times papo_loss forward + backward (the fast path, with the CPU's default epilogue) on the same inputs, and
counts what its collectives carry in one call after a first one: the calls, the bytes of this rank's contribution
(an all-gather's own row of integers, an all-reduce's tensor) and the seconds spent in them, waits for the other
ranks included. The loss and the gradients (the
weight's blocks put together) are compared with the single-rank call of the same run.
"""

import argparse
import functools
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from papo_kernels import papo_loss

from .run import git_sha, positive_int
from .stages import Timer

DTYPES = {"float32": torch.float32, "float64": torch.float64}
COLLECTIVES = ("all_gather", "all_reduce")
JOIN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Setup:
    tokens: int
    dim: int
    vocab: int
    dtype: str = "float32"
    reps: int = 5
    warmup: int = 1
    threads: int = 1


NOTE_SETUP = Setup(tokens=512, dim=512, vocab=32003)
TINY_SETUP = Setup(tokens=48, dim=16, vocab=203, dtype="float64", reps=1, warmup=0)


def block_rows(vocab: int, ranks: int, rank: int) -> slice:
    """Rank ``rank``'s rows of an even split of ``vocab`` rows into ``ranks`` blocks (the first ones one longer)."""
    sizes = [vocab // ranks + (index < vocab % ranks) for index in range(ranks)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_inputs(setup: Setup) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[setup.dtype]
    hidden = torch.randn(1, setup.tokens, setup.dim, generator=g)
    return dict(hidden=hidden.to(dtype),
                hidden_masked=(hidden + 0.5 * torch.randn(hidden.shape, generator=g)).to(dtype),
                weight=(torch.randn(setup.vocab, setup.dim, generator=g) * (2 / setup.dim**0.5)).to(dtype),
                completion_ids=torch.randint(0, setup.vocab, (1, setup.tokens), generator=g),
                completion_mask=torch.ones(1, setup.tokens, dtype=torch.bool),
                advantages=torch.ones(1, dtype=dtype))


class CollectiveMeter:
    """Counts the collectives papo_loss calls (wrapping ``torch.distributed``'s functions while on): calls, bytes of
    this rank's contribution, seconds."""

    def __init__(self):
        self.calls, self.bytes, self.seconds = Counter(), Counter(), Counter()
        self.originals = {}

    def _wrapped(self, name: str, original):
        @functools.wraps(original)
        def collective(*args, **kwargs):
            sent = args[1] if name == "all_gather" else args[0]  # all_gather(outputs, tensor), all_reduce(tensor)
            begin = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - begin
            self.calls[name] += 1
            self.bytes[name] += sent.numel() * sent.element_size()
            return result
        return collective

    def __enter__(self):
        for name in COLLECTIVES:
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrapped(name, self.originals[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def worker(rank: int, world: int, init_file: str, setup: Setup, out_dir: str) -> None:
    torch.set_num_threads(setup.threads)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        group = dist.group.WORLD
    inputs = make_inputs(setup)
    rows = block_rows(setup.vocab, world, rank)
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("hidden", "hidden_masked")}
    leaves["weight"] = inputs["weight"][rows].clone().requires_grad_()

    def call():
        for leaf in leaves.values():
            leaf.grad = None
        loss, _ = papo_loss(leaves["hidden"], leaves["weight"], inputs["completion_ids"], inputs["completion_mask"],
                            inputs["advantages"], hidden_masked=leaves["hidden_masked"], perception_kl="exact",
                            path="fast", vocab_parallel_group=group)
        loss.backward()
        return loss.detach()

    call()  # first use: the native epilogue's library loads
    with CollectiveMeter() as meter:
        loss = call()
    cpu_started = time.process_time()
    median, p20, p80 = Timer(torch.device("cpu"), setup.reps, setup.warmup)(call)
    cpu_ms = 1e3 * (time.process_time() - cpu_started) / (setup.reps + setup.warmup)
    torch.save(dict(loss=loss, grads={name: leaf.grad for name, leaf in leaves.items()}, median_ms=median,
                    p20_ms=p20, p80_ms=p80, cpu_ms=cpu_ms, calls=dict(meter.calls), bytes=dict(meter.bytes),
                    collective_ms=1e3 * sum(meter.seconds.values())), Path(out_dir) / f"rank{rank}.pt")
    if group is not None:
        dist.destroy_process_group()


def spawn(world: int, setup: Setup) -> List[Dict[str, object]]:
    """Every rank's results of one run in ``world`` fresh processes."""
    with TemporaryDirectory() as folder:
        context = mp.start_processes(worker, args=(world, str(Path(folder) / "init"), setup, folder), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} processes did not finish within {JOIN_TIMEOUT_S} s")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def relative_error(value: torch.Tensor, want: torch.Tensor) -> float:
    return float((value.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-300))


def run(setup: Setup, worlds: Sequence[int]) -> List[Dict[str, object]]:
    """One row per group size: rank 0's time and collectives, and the largest relative differences from the
    single-rank call (worlds must start with 1)."""
    assert worlds[0] == 1, "the single-rank call comes first: every other run is compared with it"
    rows, single = [], None
    for world in worlds:
        ranks = spawn(world, setup)
        first = ranks[0]
        if single is None:
            single = first
        weight = torch.cat([rank["grads"]["weight"] for rank in ranks])
        rows.append(dict(
            ranks=world, median_ms=first["median_ms"], p20_ms=first["p20_ms"], p80_ms=first["p80_ms"],
            time_ratio=first["median_ms"] / single["median_ms"], cpu_ms=first["cpu_ms"],
            cpu_ratio=first["cpu_ms"] / single["cpu_ms"], collective_ms=first["collective_ms"],
            **{f"{name}_calls": first["calls"].get(name, 0) for name in COLLECTIVES},
            **{f"{name}_bytes": first["bytes"].get(name, 0) for name in COLLECTIVES},
            loss_error=relative_error(first["loss"], single["loss"]),
            hidden_grad_error=max(relative_error(rank["grads"]["hidden"], single["grads"]["hidden"]) for rank in ranks),
            weight_grad_error=relative_error(weight, single["grads"]["weight"])))
    return rows


def markdown(setup: Setup, rows: Sequence[Dict[str, object]], load: Sequence[float]) -> List[str]:
    """The rows as a table, under a line that gives the setup and the load averages (1, 5, 15 min) before the run."""
    s = setup
    lines = [f"N = {s.tokens} tokens (two passes), D = {s.dim}, V = {s.vocab}, {s.dtype}, {s.threads} thread(s) per "
             f"process, median of {s.reps} after {s.warmup} warm-up; git {git_sha()}; load average before the run "
             f"{', '.join(f'{value:.2f}' for value in load)} on {os.cpu_count()} cores", "",
             "| ranks | median ms (p20-p80) | / 1 rank | rank 0's CPU ms per call | / 1 rank | in collectives ms (waits "
             "included) | all-gather calls, bytes | all-reduce calls, bytes | max rel. diff: loss, dH, dW |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['ranks']} | {row['median_ms']:.1f} ({row['p20_ms']:.1f}-{row['p80_ms']:.1f}) | "
                     f"{row['time_ratio']:.2f} | {row['cpu_ms']:.1f} | {row['cpu_ratio']:.2f} | "
                     f"{row['collective_ms']:.1f} | {row['all_gather_calls']}, "
                     f"{row['all_gather_bytes']} | {row['all_reduce_calls']}, {row['all_reduce_bytes']} | "
                     f"{row['loss_error']:.1e}, {row['hidden_grad_error']:.1e}, {row['weight_grad_error']:.1e} |")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vocab_parallel", description=__doc__.split("\n\n")[0])
    defaults = asdict(NOTE_SETUP)
    for name in ("tokens", "dim", "vocab", "reps", "threads"):
        parser.add_argument(f"--{name}", type=positive_int, default=defaults[name])
    parser.add_argument("--warmup", type=int, default=defaults["warmup"])
    parser.add_argument("--dtype", choices=list(DTYPES), default=defaults["dtype"])
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4],
                        help="group sizes after the single-rank call (1 is always run first)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    setup = Setup(args.tokens, args.dim, args.vocab, args.dtype, args.reps, args.warmup, args.threads)
    load = os.getloadavg()
    rows = run(setup, [1] + [world for world in args.ranks if world != 1])
    print("\n".join(markdown(setup, rows, load)))
    return rows


if __name__ == "__main__":
    main()
