"""Where the fast path's time goes: its stages timed alone, at the chunk size each workspace budget gives.

For one shape and epilogue, per workspace budget, the chunk loop's pieces run over all the
chunks exactly as ``papo_kernels.fast_path.chunk_loop.run_chunks`` calls them, from the same
public pieces (``MatrixProducts``, ``bytes_per_token`` and ``tokens_per_chunk``, the epilogue module), each alone:

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
whole N`` (each product once over all 2N rows: what the library reaches without chunks), then the
kernel probes of ``fast_path_probes.py`` (the dW product by ``addmm`` and by the reduce-add kernel
at K = 1024 to 4096 rows, the statistics sweep with one vocabulary split and split over V, the
logits' error against float64).

A budget of the plan is an epilogue, a workspace (None: the default policy of
``papo_kernels/fast_path/workspace.py``, 4 GiB on an H200) and the dW kernel (``addmm``, or
``reduce_add``: the ``PAPO_KERNELS_GRAD_WEIGHT`` flag); the ``dw`` column says which.

Beside each time: its FLOP count, and two floors from the device's measured ceilings (the
matrix-product rate and the copy bandwidth): FLOPs over the rate, and over the bandwidth the
bytes the stage must move (every operand read once per product, every result written once;
the dW accumulator is read and written once per chunk).
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import papo_kernels
from papo_kernels.fast_path import resolve_epilogue
from papo_kernels.fast_path.chunk_loop import MatrixProducts, bytes_per_token, tokens_per_chunk
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients
from papo_kernels.fast_path.grad_weight import resolve_grad_weight_kernel
from papo_kernels.fast_path.workspace import resolve_workspace_bytes

from . import fast_path_probes
from .implementations import PAPO_LOSS_CONFIG, TEMPERATURE, Inputs, Shape, grad_weight_flag, make_inputs
from .run import TIME_LIMIT_NOTE, describe, release

MiB = 2**20


@dataclass(frozen=True)
class Budget:
    epilogue: str
    workspace_bytes: Optional[int]  # None: the default policy
    grad_weight: str = "addmm"  # or "reduce_add"


@dataclass(frozen=True)
class Probes:
    k_rows: Sequence[int]  # rows of the dW products
    token_counts: Sequence[int]  # tokens a chunk of the statistics sweeps
    logits_rows: int  # rows of the logits error


GPU_SHAPE = Shape(16384, 3584, 152064)  # Qwen2.5-VL-7B's head, the headline shape
# the most wanted first, in case the time limit cuts the part short: the default, the low-memory setting, the flag
GPU_PLAN = (Budget("triton", None), Budget("triton", 256 * MiB), Budget("triton", None, "reduce_add"),
            Budget("triton", 2048 * MiB, "reduce_add"), Budget("triton", 1024 * MiB), Budget("triton", 2048 * MiB))
# 512 tokens: the reduce-add policy at the headline shape; 1093: the 2 GiB chunk of 2026-12-04; 2048: the 4 GiB one
GPU_PROBES = Probes(k_rows=(1024, 2048, 4096), token_counts=(512, 1093, 2048), logits_rows=1024)
TINY_SHAPE = Shape(32, 16, 72)
TINY_PLAN = (Budget("torch", 4 * 1024), Budget("torch", 8 * 1024), Budget("torch", 16 * 1024),
             Budget("torch", 32 * 1024), Budget("triton", 8 * 1024), Budget("triton", None),
             Budget("triton", 8 * 1024, "reduce_add"))
TINY_PROBES = Probes(k_rows=(8, 24), token_counts=(4, 9), logits_rows=16)


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

    def __init__(self, x: Inputs, budget: Budget):
        self.x = x
        hidden, weight = x.hidden.detach(), x.weight.detach()
        self.hidden, self.hidden_masked, self.weight = hidden, x.hidden_masked.detach(), weight
        self.epilogue = resolve_epilogue(budget.epilogue, hidden.device, hidden.dtype)
        n, dim = hidden.shape
        vocab_size = weight.shape[0]
        with grad_weight_flag(budget.grad_weight):
            self.grad_weight = resolve_grad_weight_kernel(hidden.device, weight.dtype, vocab_size, dim)
        self.products = MatrixProducts(weight, self.grad_weight)
        result_dtype = self.products.result_dtype
        itemsize = torch.finfo(result_dtype).bits // 8
        self.half_dz = self.products.native_half  # the loop's rule, with a gradient wanted
        # the same calls as run_chunks makes
        per_token = bytes_per_token(vocab_size, dim, True, itemsize, self.half_dz,
                                    self.epilogue.workspace_bytes_per_token(vocab_size, True, itemsize))
        self.workspace_bytes = resolve_workspace_bytes(budget.workspace_bytes, hidden.device, self.grad_weight,
                                                       per_token)
        self.chunk = tokens_per_chunk(n, per_token, self.workspace_bytes)
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


def full_path(x: Inputs, budget: Budget) -> Callable[[], None]:
    def run() -> None:
        with grad_weight_flag(budget.grad_weight):
            loss, _ = papo_kernels.papo_loss(
                x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
                hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path="fast",
                backend=budget.epilogue, workspace_bytes=budget.workspace_bytes, **PAPO_LOSS_CONFIG)
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
               floors: Tuple[Optional[float], Optional[float]] = (None, None), note: Optional[str] = None,
               dw: str = "-", flop_count: Optional[float] = None) -> None:
        """One row; the FLOPs of its rate are ``flops_per_ndv`` N D V, or ``flop_count`` when given."""
        s = self.shape
        median, p20, p80 = timing if timing else (None, None, None)
        flop_count = flops_per_ndv * s.n * s.d * s.v if flop_count is None else flop_count
        row = dict(stage=stage, epilogue=epilogue, dw=dw, workspace_mib=None if workspace_bytes is None else
                   workspace_bytes / MiB, chunk_tokens=chunk, chunks=chunks, N=s.n, D=s.d, V=s.v,
                   dtype=str(self.dtype).removeprefix("torch."), median_ms=median, p20_ms=p20, p80_ms=p80,
                   tflops=flop_count / (median * 1e9) if median and flop_count else None,
                   flop_floor_ms=floors[0], byte_floor_ms=floors[1], note=note)
        self.rows.append(row)
        shown = f"{median:10.3f} ms" if median is not None else f"{'-':>13}"
        rate = f"{row['tflops']:8.1f} TFLOP/s" if row["tflops"] else ""
        workspace = f"{row['workspace_mib']:.0f}" if row["workspace_mib"] else "-"
        self.log(f"  {stage:<28} {epilogue:<7} {dw:<10} {workspace:>8} MiB {shown} {rate} {note or ''}")

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

    def chunk_stage_times(self, x: Inputs, budget: Budget):
        """Times and records each chunk stage; returns (workspace, chunk, chunks, itemsizes, dW kernel,
        {stage: timing}). The chunk buffers die with this frame."""
        stages = ChunkStages(x, budget)
        chunk, chunks, itemsizes = stages.chunk, len(stages.starts), stages.itemsizes
        stages.prepare()
        timed = {"logits GEMM": stages.logits_products, "dH GEMM": stages.grad_rows_stacked,
                 "dH GEMMs, two": stages.grad_rows_per_pass, "dW accumulate": stages.grad_weight_products,
                 "three GEMMs": stages.three_products, "epilogue statistics": stages.statistics,
                 "epilogue gradient": stages.gradient}
        results = {}
        for stage, run in timed.items():
            results[stage] = self.timer(run)
            self.record(stage, budget.epilogue, stages.workspace_bytes, chunk, chunks, results[stage],
                        STAGE_FLOPS_PER_NDV[stage], self.floors(stage, chunks, itemsizes), dw=stages.grad_weight,
                        note=self.budget_note(budget))
        return stages.workspace_bytes, chunk, chunks, itemsizes, stages.grad_weight, results

    @staticmethod
    def budget_note(budget: Budget) -> Optional[str]:
        return "the default policy" if budget.workspace_bytes is None else None

    def budget_stages(self, x: Inputs, budget: Budget) -> None:
        workspace, chunk, chunks, itemsizes, dw, results = self.chunk_stage_times(x, budget)
        release(self.device)  # the chunk buffers go before the full path allocates its own
        results["full path"] = self.timer(full_path(x, budget), setup=x.zero_grad)
        x.zero_grad()
        self.record("full path", budget.epilogue, workspace, chunk, chunks, results["full path"], 12,
                    self.floors("full path", chunks, itemsizes), dw=dw, note=self.budget_note(budget))
        other = results["full path"][0] - sum(results[stage][0] for stage in
                                              ("three GEMMs", "epilogue statistics", "epilogue gradient"))
        self.record("other", budget.epilogue, workspace, chunk, chunks, (other, math.nan, math.nan), 0, dw=dw,
                    note="full path - three GEMMs - both epilogue sweeps")

    def probes(self, x: Inputs, probes: Probes) -> None:
        """The kernel probes of ``fast_path_probes.py``, each on its own: one that fails leaves the others to run."""
        copy_rate = self.ceilings.copy_gb_per_s
        parts = {
            "dW products": lambda: fast_path_probes.grad_weight_products(
                self.shape, self.dtype, self.device, self.timer, self.record, probes.k_rows, self.ceilings),
            "statistics sweeps": lambda: fast_path_probes.statistics_sweeps(
                self.shape, self.device, self.timer, self.record, probes.token_counts, copy_rate),
            "logits error": lambda: fast_path_probes.logits_error(x.hidden, x.weight, self.record,
                                                                  probes.logits_rows),
            "dW kernel in the loss": lambda: fast_path_probes.grad_weight_flag_in_the_loss(x, self.record),
        }
        for name, run in parts.items():
            if self.out_of_time():
                self.record(name, "-", None, None, None, None, 0, note=TIME_LIMIT_NOTE)
                continue
            try:
                run()
            except Exception as error:  # out of memory, or a kernel that fails to build: recorded, the rest runs
                self.record(name, "-", None, None, None, None, 0, note=describe(error))
            release(self.device)

    def run(self, probes: Optional[Probes] = None,
            progress: Callable[[List[Dict[str, object]]], None] = lambda rows: None) -> List[Dict[str, object]]:
        """The yardsticks, the ``probes`` when given, then every budget of the plan; ``progress`` gets the rows so
        far after each part."""
        x = make_inputs(self.shape, self.dtype, self.device)
        self.log(f"stages at N={self.shape.n} D={self.shape.d} V={self.shape.v} {self.dtype} ({x.description})")
        self.shape_stages(x)
        if probes is not None:
            self.probes(x, probes)
            progress(self.rows)
        for budget in self.plan:
            if self.out_of_time():
                self.record("*", budget.epilogue, budget.workspace_bytes, None, None, None, 0, dw=budget.grad_weight,
                            note=TIME_LIMIT_NOTE)
                continue
            try:
                self.budget_stages(x, budget)
            except Exception as error:  # one budget failing (out of memory) leaves the others to run
                self.record("*", budget.epilogue, budget.workspace_bytes, None, None, None, 0, dw=budget.grad_weight,
                            note=describe(error))
                x.zero_grad()
                release(self.device)
            progress(self.rows)
        return self.rows
