"""The statistics GEMM (papo_kernels/backends/triton_logit_statistics.py) timed beside the head product it must match.

At one shape and dtype (the headline N = 16384, D = 3584, V = 152064, bf16 on a GPU), each row timed alone:

- ``head product``: ``hidden @ W^T`` in the inputs' dtype, the same-run yardstick (2 N D V);
- ``log-probs forward``: ``linear_logprobs`` on the triton backend without grad: the GEMM with the statistics
  epilogue, the logits never stored, then the finalize (2 N D V);
- ``pair forward``: ``linear_perception_kl`` the same way, both passes sharing each weight tile (4 N D V);
- ``fast-path logits, fused``: per chunk of ``CHUNK_TOKENS`` tokens, ``chunk_statistics`` in store mode (the
  function the fast path's chunk loop is to call: the logits product and the statistics in one kernel, float32
  logits stored for the gradient sweep), over all chunks (4 N D V);
- ``fast-path logits, now``: the same chunks as the chunk loop runs them today, the library product
  (``MatrixProducts.logits``) then the Triton epilogue's statistics sweep (4 N D V).

Each row gives its rate and its share of the head product's rate. The rows go into the summary (the device
tool brings back a bounded number of files).
"""

import math
import time
from typing import Callable, Dict, List, Optional

import torch

import papo_kernels
from papo_kernels.backends import triton_logit_statistics
from papo_kernels.fast_path.chunk_loop import MatrixProducts
from papo_kernels.fast_path.epilogues import resolve_epilogue

from .implementations import Shape, make_inputs
from .run import TIME_LIMIT_NOTE, describe, release
from .stages import Timer

GPU_SHAPE = Shape(16384, 3584, 152064)
TINY_SHAPE = Shape(32, 16, 72)
CHUNK_TOKENS = {"cuda": 1024, "cpu": 8}
TEMPERATURE = 1.0


def _chunked(n: int, chunk: int, run_chunk: Callable[[slice], None]) -> Callable[[], None]:
    def run() -> None:
        for start in range(0, n, chunk):
            run_chunk(slice(start, min(start + chunk, n)))
    return run


def stage_runs(hidden, hidden_masked, weight, tokens, chunk: int) -> Dict[str, tuple]:
    """name -> (run, FLOPs per N D V) of every row."""
    n = hidden.shape[0]
    vocab_size = weight.shape[0]
    products = MatrixProducts(weight)
    epilogue = resolve_epilogue("triton", hidden.device, hidden.dtype)
    logits = torch.empty(2 * chunk, vocab_size, dtype=torch.float32, device=hidden.device)
    rows = torch.cat([hidden[:chunk], hidden_masked[:chunk]])

    def fused(part: slice) -> None:
        count = part.stop - part.start
        rows[:count], rows[count:2 * count] = hidden[part], hidden_masked[part]
        triton_logit_statistics.chunk_statistics(rows[:2 * count], weight, None, tokens[part], TEMPERATURE, True,
                                                 logits[:2 * count])

    def library(part: slice) -> None:
        count = part.stop - part.start
        rows[:count], rows[count:2 * count] = hidden[part], hidden_masked[part]
        products.logits(rows[:2 * count], out=logits[:2 * count])
        epilogue.statistics(logits[:2 * count], tokens[part], None, TEMPERATURE, True)

    return {
        "head product": (lambda: hidden @ weight.T, 2),
        "log-probs forward": (lambda: papo_kernels.linear_logprobs(hidden, weight, tokens, backend="triton"), 2),
        "pair forward": (lambda: papo_kernels.linear_perception_kl(hidden, hidden_masked, weight, tokens,
                                                                   backend="triton"), 4),
        "fast-path logits, fused": (_chunked(n, chunk, fused), 4),
        "fast-path logits, now": (_chunked(n, chunk, library), 4),
    }


def run_rows(device: torch.device, tiny: bool, timer: Timer, deadline: Optional[float] = None,
             log=print) -> List[Dict[str, object]]:
    """Times every row; a row that fails or comes after the deadline is reported with its reason."""
    shape = TINY_SHAPE if tiny else GPU_SHAPE
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = make_inputs(shape, dtype, device)
    hidden, hidden_masked, weight = (t.detach() for t in x.leaves())
    chunk = CHUNK_TOKENS[device.type]
    rows: List[Dict[str, object]] = []
    with torch.no_grad():
        for name, (run, flops_per_ndv) in stage_runs(hidden, hidden_masked, weight, x.tokens, chunk).items():
            row = dict(row=name, N=shape.n, D=shape.d, V=shape.v, dtype=str(dtype).removeprefix("torch."),
                       chunk_tokens=chunk if name.startswith("fast-path") else None, median_ms=None, tflops=None,
                       of_head_product=None, status="ok")
            if deadline is not None and time.monotonic() > deadline:
                row["status"] = TIME_LIMIT_NOTE
            else:
                try:
                    median, _, _ = timer(run)
                    row["median_ms"] = median
                    row["tflops"] = flops_per_ndv * shape.n * shape.d * shape.v / (median * 1e9)
                except Exception as error:  # a row that breaks (out of memory, a compile error) leaves the rest
                    row["status"] = f"error: {describe(error)}"
                    release(device)
            rows.append(row)
            log(f"  {name:<26} {row['median_ms'] or float('nan'):10.3f} ms {row['tflops'] or float('nan'):8.1f} "
                f"TFLOP/s {row['status']}")
    head = rows[0]["tflops"]
    for row in rows:
        if row["tflops"] and head:
            row["of_head_product"] = row["tflops"] / head
    return rows


def section(rows: List[Dict[str, object]]) -> List[str]:
    """The rows as the summary's markdown table."""
    if not rows:
        return []
    first = rows[0]
    lines = [f"## Statistics GEMM (N = {first['N']}, D = {first['D']}, V = {first['V']}, {first['dtype']})", "",
             "| row | chunk tokens | median ms | TFLOP/s | of head product | status |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        def number(value, digits):
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, digits)
        lines.append(f"| {row['row']} | {row['chunk_tokens'] or '-'} | {number(row['median_ms'], '.3f')} | "
                     f"{number(row['tflops'], '.1f')} | {number(row['of_head_product'], '.3f')} | {row['status']} |")
    return lines + [""]
