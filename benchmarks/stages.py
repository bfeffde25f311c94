"""Where the fast path's time goes: its stages timed alone, at the chunk size each workspace budget gives.

For one shape and epilogue, per workspace budget, the chunk loop's pieces run over all the
chunks exactly as ``papo_kernels.fast_path.chunk_loop.run_chunks`` calls them, from the same
public pieces (``MatrixProducts``, ``rows_per_chunk``, the epilogue module), each alone:

- ``logits GEMM``: ``[h; h~] @ W^T`` per chunk (the rows stacked with torch.cat, as the loop does);
- ``dH GEMM``: ``dZ @ W`` once per chunk over the rows of both passes, as the loop does (W read
  once); ``dH GEMMs, two`` is the variant of one product per pass (W read twice), kept to
  measure what stacking saves;
- ``dW accumulate``: ``acc += dZ^T [h; h~]`` into the float32 (V, D) accumulator per chunk;
- ``three GEMMs``: the loop's three products (logits, stacked dH, dW) together, per chunk;
- ``epilogue statistics`` and ``epilogue gradient``: the epilogue's two sweeps per chunk;
- ``full path``: ``papo_loss(path="fast")`` forward + backward on the benchmark inputs;
- ``other``: the full path minus the three GEMMs and both sweeps (the per-chunk objective,
  the concatenation, launches), derived.

Once per shape: ``matmul N x V`` (the sweep's yardstick, ``hidden @ W^T``) and ``three GEMMs,
whole N`` (each product once over all 2N rows: what the library reaches without chunks).

Beside each time: its FLOP count, and two floors from the device's measured ceilings (the
matrix-product rate and the copy bandwidth): FLOPs over the rate, and over the bandwidth the
bytes the stage must move (every operand read once per product, every result written once;
the dW accumulator is read and written once per chunk).
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import papo_kernels
from papo_kernels.fast_path import resolve_epilogue
from papo_kernels.fast_path.chunk_loop import MatrixProducts, rows_per_chunk
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients

from .implementations import PAPO_LOSS_CONFIG, TEMPERATURE, Inputs, Shape, make_inputs
from .run import TIME_LIMIT_NOTE, describe, release

MiB = 2**20
GPU_SHAPE = Shape(16384, 3584, 152064)  # Qwen2.5-VL-7B's head, the headline shape
GPU_PLAN = (("triton", (256 * MiB, 512 * MiB, 1024 * MiB, 2048 * MiB)), ("torch", (256 * MiB,)))
TINY_SHAPE = Shape(32, 16, 72)
TINY_PLAN = (("torch", (4 * 1024, 8 * 1024, 16 * 1024, 32 * 1024)), ("triton", (8 * 1024,)))


@dataclass(frozen=True)
class Ceilings:
    """The device's measured matrix-product rate (TFLOP/s) and copy bandwidth (GB/s, read + written)."""

    matmul_tflops: float
    copy_gb_per_s: float


class Timer:
    """Median and 20/80% quantiles (ms) of ``reps`` runs after ``warmup``; device events on CUDA."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, run: Callable[[], None], setup: Callable[[], None] = lambda: None) -> Tuple[float, ...]:
        times = []
        for rep in range(self.warmup + self.reps):
            setup()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize(self.device)
                elapsed = start.elapsed_time(end)
            else:
                begin = time.perf_counter()
                run()
                elapsed = (time.perf_counter() - begin) * 1e3
            if rep >= self.warmup:
                times.append(elapsed)
        p20, median, p80 = np.quantile(np.asarray(times), [0.2, 0.5, 0.8])
        return float(median), float(p20), float(p80)


class ChunkStages:
    """The chunk loop's pieces for one epilogue and one workspace budget, each a callable over all chunks."""

    def __init__(self, x: Inputs, epilogue_name: str, workspace_bytes: int):
        self.x = x
        hidden, weight = x.hidden.detach(), x.weight.detach()
        self.hidden, self.hidden_masked, self.weight = hidden, x.hidden_masked.detach(), weight
        self.epilogue = resolve_epilogue(epilogue_name, hidden.device, hidden.dtype)
        self.products = MatrixProducts(weight)
        n, dim = hidden.shape
        vocab_size = weight.shape[0]
        result_dtype = self.products.result_dtype
        itemsize = torch.finfo(result_dtype).bits // 8
        self.half_dz = self.products.native_half  # the loop's rule, with a gradient wanted
        # the same call as run_chunks makes
        self.chunk = rows_per_chunk(n, vocab_size, dim, True, itemsize, self.half_dz,
                                    self.epilogue.workspace_bytes_per_token(vocab_size, True, itemsize),
                                    workspace_bytes)
        self.starts = list(range(0, n, self.chunk))
        device, c = hidden.device, self.chunk
        self.logits = self.products.logits(torch.cat([hidden[:c], self.hidden_masked[:c]]),
                                           out=torch.empty(2 * c, vocab_size, dtype=result_dtype, device=device))
        dz_dtype = weight.dtype if self.half_dz else result_dtype
        self.dz = torch.randn(2 * c, vocab_size, device=device, dtype=dz_dtype).mul_(1e-4)
        self.rows_buffer = torch.cat([hidden[:c], self.hidden_masked[:c]])
        self.accumulator = torch.randn(vocab_size, dim, device=device).mul_(1e-3)
        self.grad_hidden = torch.empty_like(hidden)
        self.grad_hidden_masked = torch.empty_like(hidden)
        self.stacked = torch.empty(2 * c, dim, dtype=hidden.dtype, device=device)
        self._row_inputs: Dict[int, Tuple] = {}

    @property
    def itemsizes(self) -> Tuple[int, int]:
        """Bytes per element of the product inputs and of dZ."""
        return self.products.weight.element_size(), self.dz.element_size()

    def chunks(self):
        """(rows, count) of every chunk."""
        n = self.hidden.shape[0]
        for start in self.starts:
            count = min(self.chunk, n - start)
            yield slice(start, start + count), count

    def _statistics_and_upstream(self, count: int):
        """Row statistics of a chunk of ``count`` rows and random upstream gradients of every statistic."""
        if count not in self._row_inputs:
            tokens = self.x.tokens[:count]
            logits = self.logits[:2 * count].clone()
            stats = self.epilogue.statistics(logits, tokens, None, TEMPERATURE, True)
            upstream = UpstreamGradients(*(torch.randn(count, device=logits.device) for _ in range(5)))
            self._row_inputs[count] = (stats, upstream)
        return self._row_inputs[count]

    def logits_products(self) -> None:
        for rows, count in self.chunks():
            self.products.logits(torch.cat([self.hidden[rows], self.hidden_masked[rows]]),
                                 out=self.logits[:2 * count])

    def grad_rows_per_pass(self) -> None:
        for rows, count in self.chunks():
            self.products.grad_rows(self.dz[:count], out=self.grad_hidden[rows])
            self.products.grad_rows(self.dz[count:2 * count], out=self.grad_hidden_masked[rows])

    def grad_rows_stacked(self) -> None:
        for rows, count in self.chunks():
            self.products.grad_rows(self.dz[:2 * count], out=self.stacked[:2 * count])
            self.grad_hidden[rows] = self.stacked[:count]
            self.grad_hidden_masked[rows] = self.stacked[count:2 * count]

    def grad_weight_products(self) -> None:
        for _, count in self.chunks():
            self.products.accumulate_grad_weight(self.accumulator, self.dz[:2 * count], self.rows_buffer[:2 * count])

    def three_products(self) -> None:
        self.logits_products()
        self.grad_rows_stacked()
        self.grad_weight_products()

    def statistics(self) -> None:
        for rows, count in self.chunks():
            self.epilogue.statistics(self.logits[:2 * count], self.x.tokens[rows], None, TEMPERATURE, True)

    def gradient(self) -> None:
        out = self.dz if self.half_dz else self.logits
        for rows, count in self.chunks():
            stats, upstream = self._statistics_and_upstream(count)
            self.epilogue.logit_gradient(self.logits[:2 * count], self.x.tokens[rows], None, TEMPERATURE, stats,
                                         upstream, out[:2 * count])

    def prepare(self) -> None:
        """Computes the row statistics of every chunk size before the gradient sweep is timed."""
        for _, count in self.chunks():
            self._statistics_and_upstream(count)


def full_path(x: Inputs, epilogue: str, workspace_bytes: int) -> Callable[[], None]:
    def run() -> None:
        loss, _ = papo_kernels.papo_loss(
            x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
            hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path="fast", backend=epilogue,
            workspace_bytes=workspace_bytes, **PAPO_LOSS_CONFIG)
        loss.backward()
    return run


def stage_bytes(stage: str, n: int, d: int, v: int, chunks: int, itemsize: int, dz_itemsize: int) -> float:
    """The fewest bytes each stage moves over all chunks (2N rows: both passes)."""
    weight, rows = v * d * itemsize, 2 * n * d * itemsize
    logits, dz = 2 * n * v * 4, 2 * n * v * dz_itemsize
    table = {
        "logits GEMM": chunks * weight + rows + logits,
        "dH GEMM": chunks * weight + dz + rows,
        "dH GEMMs, two": 2 * chunks * weight + dz + rows,
        "dW accumulate": chunks * 2 * v * d * 4 + dz + rows,
        "epilogue statistics": logits,
        "epilogue gradient": logits + dz,
    }
    table["three GEMMs"] = table["logits GEMM"] + table["dH GEMM"] + table["dW accumulate"]
    table["full path"] = table["three GEMMs"] + table["epilogue statistics"] + table["epilogue gradient"]
    return table[stage]


STAGE_FLOPS_PER_NDV = {"logits GEMM": 4, "dH GEMM": 4, "dH GEMMs, two": 4, "dW accumulate": 4, "three GEMMs": 12,
                       "epilogue statistics": 0, "epilogue gradient": 0, "full path": 12}


class StageRun:
    """Times the stages of each (epilogue, budgets) of a plan at one shape; one row per stage."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, plan, ceilings: Ceilings,
                 timer: Timer, deadline: Optional[float] = None, log=print):
        self.shape, self.dtype, self.device, self.plan = shape, dtype, device, plan
        self.ceilings, self.timer, self.deadline, self.log = ceilings, timer, deadline, log
        self.rows: List[Dict[str, object]] = []

    def floors(self, stage: str, chunks: int, itemsizes: Tuple[int, int]) -> Tuple[float, float]:
        s = self.shape
        flop_count = STAGE_FLOPS_PER_NDV.get(stage, 0) * s.n * s.d * s.v
        byte_count = stage_bytes(stage, s.n, s.d, s.v, chunks, *itemsizes) if stage in STAGE_FLOPS_PER_NDV else 0
        return flop_count / (self.ceilings.matmul_tflops * 1e9), byte_count / (self.ceilings.copy_gb_per_s * 1e6)

    def record(self, stage: str, epilogue: str, workspace_bytes: Optional[int], chunk: Optional[int],
               chunks: Optional[int], timing: Optional[Tuple[float, float, float]], flops_per_ndv: float,
               floors: Tuple[Optional[float], Optional[float]] = (None, None), note: Optional[str] = None) -> None:
        s = self.shape
        median, p20, p80 = timing if timing else (None, None, None)
        flop_count = flops_per_ndv * s.n * s.d * s.v
        row = dict(stage=stage, epilogue=epilogue, workspace_mib=None if workspace_bytes is None else
                   workspace_bytes / MiB, chunk_tokens=chunk, chunks=chunks, N=s.n, D=s.d, V=s.v,
                   dtype=str(self.dtype).removeprefix("torch."), median_ms=median, p20_ms=p20, p80_ms=p80,
                   tflops=flop_count / (median * 1e9) if median and flop_count else None,
                   flop_floor_ms=floors[0], byte_floor_ms=floors[1], note=note)
        self.rows.append(row)
        shown = f"{median:10.3f} ms" if median is not None else f"{'-':>13}"
        rate = f"{row['tflops']:8.1f} TFLOP/s" if row["tflops"] else ""
        self.log(f"  {stage:<28} {epilogue:<7} {str(row['workspace_mib'] or '-'):>8} MiB {shown} {rate} {note or ''}")

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def shape_stages(self, x: Inputs) -> None:
        """The yardstick and the three products over the whole N at once."""
        s = self.shape
        hidden, weight = x.hidden.detach(), x.weight.detach()
        self.record("matmul N x V", "-", None, None, None, self.timer(lambda: hidden @ weight.T), 2)
        try:
            products = MatrixProducts(weight)
            rows = torch.cat([hidden, x.hidden_masked.detach()])
            logits = torch.empty(2 * s.n, s.v, dtype=products.result_dtype, device=self.device)
            dz = torch.randn(2 * s.n, s.v, device=self.device, dtype=products.input_dtype).mul_(1e-4)
            grad_rows = torch.empty_like(rows)
            accumulator = torch.randn(s.v, s.d, device=self.device).mul_(1e-3)

            def run() -> None:
                products.logits(rows, out=logits)
                products.grad_rows(dz, out=grad_rows)
                products.accumulate_grad_weight(accumulator, dz, rows)

            timing = self.timer(run)
            itemsizes = (products.weight.element_size(), dz.element_size())
            self.record("three GEMMs, whole N", "-", None, s.n, 1, timing, 12, self.floors("three GEMMs", 1, itemsizes))
        except torch.cuda.OutOfMemoryError:
            self.record("three GEMMs, whole N", "-", None, s.n, 1, None, 12, note="out of device memory")
        finally:
            products = rows = logits = dz = grad_rows = accumulator = None
            release(self.device)

    def chunk_stage_times(self, x: Inputs, epilogue: str, workspace_bytes: int):
        """Times and records each chunk stage; returns (chunk, chunks, itemsizes, {stage: timing}). The chunk
        buffers die with this frame."""
        stages = ChunkStages(x, epilogue, workspace_bytes)
        chunk, chunks, itemsizes = stages.chunk, len(stages.starts), stages.itemsizes
        stages.prepare()
        timed = {"logits GEMM": stages.logits_products, "dH GEMM": stages.grad_rows_stacked,
                 "dH GEMMs, two": stages.grad_rows_per_pass, "dW accumulate": stages.grad_weight_products,
                 "three GEMMs": stages.three_products, "epilogue statistics": stages.statistics,
                 "epilogue gradient": stages.gradient}
        results = {}
        for stage, run in timed.items():
            results[stage] = self.timer(run)
            self.record(stage, epilogue, workspace_bytes, chunk, chunks, results[stage], STAGE_FLOPS_PER_NDV[stage],
                        self.floors(stage, chunks, itemsizes))
        return chunk, chunks, itemsizes, results

    def budget_stages(self, x: Inputs, epilogue: str, workspace_bytes: int) -> None:
        chunk, chunks, itemsizes, results = self.chunk_stage_times(x, epilogue, workspace_bytes)
        release(self.device)  # the chunk buffers go before the full path allocates its own
        results["full path"] = self.timer(full_path(x, epilogue, workspace_bytes), setup=x.zero_grad)
        x.zero_grad()
        self.record("full path", epilogue, workspace_bytes, chunk, chunks, results["full path"], 12,
                    self.floors("full path", chunks, itemsizes))
        other = results["full path"][0] - sum(results[stage][0] for stage in
                                              ("three GEMMs", "epilogue statistics", "epilogue gradient"))
        self.record("other", epilogue, workspace_bytes, chunk, chunks, (other, math.nan, math.nan), 0,
                    note="full path - three GEMMs - both epilogue sweeps")

    def run(self, progress: Callable[[List[Dict[str, object]]], None] = lambda rows: None) -> List[Dict[str, object]]:
        """Every stage of the plan; ``progress`` gets the rows so far after each budget."""
        x = make_inputs(self.shape, self.dtype, self.device)
        self.log(f"stages at N={self.shape.n} D={self.shape.d} V={self.shape.v} {self.dtype} ({x.description})")
        self.shape_stages(x)
        for epilogue, budgets in self.plan:
            for workspace_bytes in budgets:
                if self.out_of_time():
                    self.record("*", epilogue, workspace_bytes, None, None, None, 0,
                                note=TIME_LIMIT_NOTE)
                    continue
                try:
                    self.budget_stages(x, epilogue, workspace_bytes)
                except Exception as error:  # one budget failing (out of memory) leaves the others to run
                    self.record("*", epilogue, workspace_bytes, None, None, None, 0, note=describe(error))
                    x.zero_grad()
                    release(self.device)
                progress(self.rows)
        return self.rows
