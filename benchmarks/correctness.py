"""Correctness of every GPU path against a float64 reference at real shapes, on sampled rows, never stopping early.

Paths (``PATHS``): the per-token ops ``linear_logprobs`` and ``linear_perception_kl`` on the
triton and torch backends, and ``papo_loss`` on the fast path (triton and torch epilogues)
and on the per-token path (triton and torch backends). Each runs on all N rows of a case, as
in training; what is compared:

- the per-token ops: their outputs and the hidden-state gradients (random cotangents on every
  output) at the sampled rows; every row's are independent, so the float64 truth needs only
  those rows;
- papo_loss: the loss over all N rows (the float64 truth summed over row chunks) and the
  hidden-state gradients at the sampled rows. PAPO-D with exact KL and entropies, dual clip,
  beta > 0 with reference log-probs, old log-probs off the current ones (so ratios clip), and
  ``num_items_in_batch = N``, so each row's gradient is its own and a subset gives it exactly;
- in the cases whose ``rows`` is ``"all"`` (a moderate N): every row, and the weight gradient.

The rule is the error budget of tests/backend_cases.py: the largest error against the float64
truth (the reference backend in float64 on the inputs as rounded to the dtype) is at most
``BUDGET_FACTOR`` times the error of the same reference run at the dtype (float32 arithmetic
on the rounded inputs, results in the dtype) plus ``ATOL[dtype]`` times the largest truth.
The atol is relative to the largest truth rather than to max(1, it): papo_loss's gradients
are O(1 / N), and an atol of 1.6e-2 absolute would pass anything there. NaN never passes.
"""

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import papo_kernels
from papo_kernels.backends import reference

from .implementations import PAPO_LOSS_CONFIG, Inputs, Shape, make_inputs
from .run import TIME_LIMIT_NOTE, describe, release

BUDGET_FACTOR = 4.0
ATOL = {torch.float32: 4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # tests/test_numerics.py's table
VALUE_ATOL = ATOL[torch.float32]  # every output is float32
# papo_loss as checked: PAPO-D with every branch of the objective in play.
LOSS_CONFIG = dict(PAPO_LOSS_CONFIG, dual_clip=3.0, beta=0.01)
OLD_LOGPROB_NOISE = 0.3  # old and reference log-probs are the current ones plus this much noise
TRUTH_CHUNK_BYTES = 512 * 2**20  # float64 logits per pass of one chunk of the float64 truth
SAME_DTYPE_CHUNK_BYTES = 1024 * 2**20  # float32 logits per pass of one chunk of the same-dtype loss
OUTPUTS = {"logprobs": ("logprobs", "entropy"),
           "perception_kl": ("logprobs", "logprobs_masked", "entropy", "entropy_masked", "kl"),
           "papo_loss": ("loss",)}
STATUSES = ("PASS", "FAIL", "ERROR", "SKIP")


@dataclass(frozen=True)
class CheckCase:
    head: str
    d: int
    v: int
    n: int
    distribution: str
    rows: str  # "sampled": values and hidden gradients at SAMPLED_ROWS rows; "all": every row and the weight gradient

    @property
    def label(self) -> str:
        return f"{self.head} N={self.n} {self.distribution} ({self.rows} rows)"


GPU_CASES = (  # the cheap case with the weight gradient first, in case the time limit cuts the run short
    CheckCase("Qwen2.5-VL-7B", 3584, 152064, 1024, "spread", "all"),
    CheckCase("Qwen2.5-VL-7B", 3584, 152064, 16384, "peaked", "sampled"),
    CheckCase("Qwen2.5-VL-3B", 2048, 151936, 16384, "spread", "sampled"),
)
TINY_CASES = (  # Triton's CPU interpreter runs program after program: a few tiles, a vocabulary tail
    CheckCase("tiny", 16, 72, 32, "peaked", "sampled"),
    CheckCase("tiny", 16, 72, 16, "spread", "all"),
)
SAMPLED_ROWS = {"cuda": 32, "cpu": 6}


@dataclass
class CheckInputs:
    """One case's tensors: the benchmark setup (``make_inputs``) plus old and reference log-probs."""

    x: Inputs
    old_logprobs: Tensor  # (n,) float32
    ref_logprobs: Tensor
    token_advantages: Tensor  # (n,) the per-sequence advantages spread over their tokens
    rows: Tensor  # the rows under check, sorted

    @property
    def n(self) -> int:
        return self.x.tokens.shape[0]


Result = Tuple[Dict[str, Tensor], Dict[str, Optional[Tensor]]]  # (outputs, gradients of hidden, hidden_masked, weight)


@dataclass(frozen=True)
class CheckedPath:
    name: str
    op: str  # "logprobs", "perception_kl" or "papo_loss"
    run: Callable[[CheckInputs], Result]  # on the leaves of x, all rows; returns the outputs and .grad of the leaves
    triton_dot: bool  # multiplies with Triton's tl.dot (the CPU interpreter cannot in bf16)


def _leaves_grads(x: Inputs, paired: bool) -> Dict[str, Optional[Tensor]]:
    grads = {"hidden": x.hidden.grad, "weight": x.weight.grad}
    if paired:
        grads["hidden_masked"] = x.hidden_masked.grad
    return grads


def _op_path(op: str, backend: str) -> Callable[[CheckInputs], Result]:
    def run(c: CheckInputs) -> Result:
        x = c.x
        if op == "logprobs":
            outputs = papo_kernels.linear_logprobs(x.hidden, x.weight, x.tokens, backend=backend)
        else:
            outputs = papo_kernels.linear_perception_kl(x.hidden, x.hidden_masked, x.weight, x.tokens, backend=backend)
        torch.autograd.backward(outputs, x.cotangents[op])
        return dict(zip(OUTPUTS[op], (t.detach() for t in outputs))), _leaves_grads(x, op == "perception_kl")
    return run


def _loss_path(path: str, backend: str) -> Callable[[CheckInputs], Result]:
    def run(c: CheckInputs) -> Result:
        x = c.x
        loss, _ = papo_kernels.papo_loss(
            x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
            hidden_masked=x.batched(x.hidden_masked), old_logprobs=x.batched(c.old_logprobs),
            ref_logprobs=x.batched(c.ref_logprobs), num_items_in_batch=float(c.n), path=path, backend=backend,
            **LOSS_CONFIG)
        loss.backward()
        return {"loss": loss.detach()}, _leaves_grads(x, True)
    return run


PATHS = (
    CheckedPath("linear_logprobs/triton", "logprobs", _op_path("logprobs", "triton"), True),
    CheckedPath("linear_perception_kl/triton", "perception_kl", _op_path("perception_kl", "triton"), True),
    CheckedPath("linear_logprobs/torch", "logprobs", _op_path("logprobs", "torch"), False),
    CheckedPath("linear_perception_kl/torch", "perception_kl", _op_path("perception_kl", "torch"), False),
    CheckedPath("papo_loss/fast/triton", "papo_loss", _loss_path("fast", "triton"), False),
    CheckedPath("papo_loss/fast/torch", "papo_loss", _loss_path("fast", "torch"), False),
    CheckedPath("papo_loss/per_token/triton", "papo_loss", _loss_path("per_token", "triton"), True),
    CheckedPath("papo_loss/per_token/torch", "papo_loss", _loss_path("per_token", "torch"), False),
)


# The references: the reference backend in float64 (the truth) and at the case's dtype.

def _rounded(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh leaf that wants a gradient: ``t`` cast to ``dtype`` (from the inputs as rounded to their dtype)."""
    return t.detach().to(dtype).requires_grad_()


def _chunks(rows: Tensor, vocab_size: int, itemsize: int, budget: int) -> List[Tensor]:
    per_chunk = max(1, budget // (itemsize * vocab_size))
    return list(rows.split(per_chunk))


def reference_op(c: CheckInputs, op: str, rows: Tensor, dtype: torch.dtype, with_weight: bool) -> Result:
    """The reference backend at ``dtype`` on ``rows``: outputs and hidden gradients at those rows, and the weight
    gradient when ``with_weight``. float64 runs in row chunks (the weight gradient summed over them in float64);
    another dtype in one call, so its rounding is that of one reference call."""
    x = c.x
    weight = _rounded(x.weight, dtype) if with_weight else x.weight.detach().to(dtype)
    itemsize = 8 if dtype == torch.float64 else 4
    outputs: Dict[str, List[Tensor]] = {name: [] for name in OUTPUTS[op]}
    grads: Dict[str, List[Tensor]] = {"hidden": [], "hidden_masked": []}
    budget = TRUTH_CHUNK_BYTES if dtype == torch.float64 else SAME_DTYPE_CHUNK_BYTES
    chunks = _chunks(rows, x.weight.shape[0], itemsize, budget) if dtype == torch.float64 else [rows]
    for chunk in chunks:
        hidden, hidden_masked = _rounded(x.hidden[chunk], dtype), _rounded(x.hidden_masked[chunk], dtype)
        if op == "logprobs":
            values = reference.linear_logprobs(hidden, weight, x.tokens[chunk], None, 1.0)
        else:
            values = reference.linear_perception_kl(hidden, hidden_masked, weight, x.tokens[chunk], None, 1.0)
        cotangents = [t[chunk].to(values[0].dtype) for t in x.cotangents[op]]
        torch.autograd.backward(values, cotangents)
        for name, value in zip(OUTPUTS[op], values):
            outputs[name].append(value.detach())
        grads["hidden"].append(hidden.grad)
        if op == "perception_kl":
            grads["hidden_masked"].append(hidden_masked.grad)
    result_grads = {name: torch.cat(parts) for name, parts in grads.items() if parts}
    if with_weight:
        result_grads["weight"] = weight.grad
    return {name: torch.cat(parts) for name, parts in outputs.items()}, result_grads


def _loss_call(c: CheckInputs, rows: Tensor, hidden: Tensor, hidden_masked: Tensor, weight: Tensor) -> Tensor:
    """papo_loss on the per-token path, reference backend, over ``rows`` as one (1, len(rows)) response."""
    x = c.x
    ones = torch.ones(1, rows.numel(), device=rows.device)

    def at_rows(t: Tensor) -> Tensor:  # float32 as the path under check gets them (float64 for the truth)
        return t[rows][None].to(reference.compute_dtype(hidden.dtype))

    loss, _ = papo_kernels.papo_loss(
        hidden[None], weight, x.tokens[rows][None], ones, at_rows(c.token_advantages), hidden_masked=hidden_masked[None],
        old_logprobs=at_rows(c.old_logprobs), ref_logprobs=at_rows(c.ref_logprobs), num_items_in_batch=float(c.n),
        path="per_token", backend="reference", **LOSS_CONFIG)
    return loss


def reference_loss(c: CheckInputs, rows: Tensor, dtype: torch.dtype, with_grad: bool,
                   with_weight: bool = False) -> Result:
    """The reference papo_loss at ``dtype`` over ``rows``, with the hidden gradients at ``rows`` when
    ``with_grad`` and the weight gradient too when ``with_weight``. float64 runs in row chunks of
    TRUTH_CHUNK_BYTES; another dtype in one call with gradient, or without in chunks of SAME_DTYPE_CHUNK_BYTES
    summed in float32 (as the fast path sums its chunks)."""
    x = c.x
    vocab_size = x.weight.shape[0]
    if dtype == torch.float64:
        chunks = _chunks(rows, vocab_size, 8, TRUTH_CHUNK_BYTES)
    else:
        chunks = [rows] if with_grad else _chunks(rows, vocab_size, 4, SAME_DTYPE_CHUNK_BYTES)
    weight = _rounded(x.weight, dtype) if with_weight else x.weight.detach().to(dtype)
    total = torch.zeros((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=rows.device)
    hidden_grads, masked_grads = [], []
    for chunk in chunks:
        hidden, hidden_masked = (_rounded(t[chunk], dtype).requires_grad_(with_grad)
                                 for t in (x.hidden, x.hidden_masked))
        with torch.set_grad_enabled(with_grad):
            loss = _loss_call(c, chunk, hidden, hidden_masked, weight)
        if with_grad:
            loss.backward()
            hidden_grads.append(hidden.grad)
            masked_grads.append(hidden_masked.grad)
        total += loss.detach()
    grads = {}
    if with_grad:
        grads = {"hidden": torch.cat(hidden_grads), "hidden_masked": torch.cat(masked_grads)}
    if with_weight:
        grads["weight"] = weight.grad
    return {"loss": total}, grads


# The rule.

def budget(kernel: Optional[Tensor], same_dtype: Optional[Tensor], truth: Optional[Tensor], atol: float) -> Dict:
    """The error-budget rule on device tensors, in float64: the worst error, the same-dtype error, the bound."""
    if kernel is None or truth is None or same_dtype is None:
        present = (kernel is not None, same_dtype is not None, truth is not None)
        ok = len(set(present)) == 1
        return dict(kernel_error=None, torch_error=None, bound=None, status="PASS" if ok else "FAIL",
                    note=None if ok else f"gradient presence (kernel, same dtype, truth) = {present}")
    if kernel.shape != truth.shape:
        return dict(kernel_error=None, torch_error=None, bound=None, status="FAIL",
                    note=f"shape {tuple(kernel.shape)} != {tuple(truth.shape)}")
    truth = truth.double()
    kernel_error = float(torch.nan_to_num((kernel.double() - truth).abs(), nan=float("inf")).max()) \
        if truth.numel() else 0.0
    torch_error = float((same_dtype.double() - truth).abs().max()) if truth.numel() else 0.0
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    bound = BUDGET_FACTOR * torch_error + atol * scale
    status = "PASS" if kernel_error <= bound else "FAIL"  # NaN or inf errors fail
    return dict(kernel_error=kernel_error, torch_error=torch_error, bound=bound, status=status, note=None)


# The run.

def make_check_inputs(case: CheckCase, dtype: torch.dtype, device: torch.device, seed: int) -> CheckInputs:
    x = make_inputs(Shape(case.n, case.d, case.v), dtype, device, seed=seed, distribution=case.distribution)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        current, _ = papo_kernels.linear_logprobs(x.hidden, x.weight, x.tokens, backend="torch")

    def noisy() -> Tensor:
        return current.float() + OLD_LOGPROB_NOISE * torch.randn(case.n, generator=generator, device=device)

    old, ref = noisy(), noisy()
    token_advantages = x.advantages[:, None].expand(x.batch_shape).reshape(-1)
    if case.rows == "all":
        rows = torch.arange(case.n, device=device)
    else:
        count = SAMPLED_ROWS[device.type]
        drawn = torch.randperm(case.n, generator=generator, device=device)[:count]
        rows = torch.unique(torch.cat([drawn, torch.tensor([0, case.n - 1], device=device)]))
    return CheckInputs(x, old, ref, token_advantages, rows)


class Checker:
    """Runs every path of ``paths`` on each case and dtype; one row per compared quantity."""

    def __init__(self, cases: Sequence[CheckCase], dtypes: Sequence[torch.dtype], device: torch.device,
                 paths: Sequence[CheckedPath] = PATHS, deadline: Optional[float] = None, log=print):
        self.cases, self.dtypes, self.device, self.paths = list(cases), list(dtypes), device, list(paths)
        self.deadline = deadline
        self.log = log
        self.rows: List[Dict[str, object]] = []

    def record(self, case: CheckCase, dtype: torch.dtype, path: str, quantity: str, **values) -> None:
        row = dict(case=case.label, head=case.head, N=case.n, D=case.d, V=case.v, distribution=case.distribution,
                   rows=case.rows, dtype=str(dtype).removeprefix("torch."), path=path, quantity=quantity,
                   kernel_error=None, torch_error=None, bound=None, seconds=None, note=None)
        row.update(values)
        self.rows.append(row)
        if row["status"] != "PASS":
            self.log(f"    {row['status']:<5} {path} {quantity}: {row['note'] or ''} "
                     f"(error {row['kernel_error']}, bound {row['bound']})")

    def skip_reason(self, path: CheckedPath, dtype: torch.dtype) -> Optional[str]:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TIME_LIMIT_NOTE
        if self.device.type == "cpu" and path.triton_dot and dtype == torch.bfloat16:
            return "Triton's CPU interpreter cannot multiply bf16 (tl.dot); bf16 is checked on a GPU"
        return None

    def references(self, c: CheckInputs, case: CheckCase, dtype: torch.dtype, ops: Sequence[str]) -> Dict:
        """(truth, same-dtype) results of each op the paths need."""
        refs = {}
        all_rows = torch.arange(case.n, device=self.device)
        with_weight = case.rows == "all"
        for op in ops:
            if op == "papo_loss":
                truth_loss, truth_grads = reference_loss(c, all_rows, torch.float64, with_weight, with_weight)
                same_loss, same_grads = reference_loss(c, all_rows, dtype, with_weight, with_weight)
                if not with_weight:  # the hidden gradients at the sampled rows, from those rows alone
                    _, truth_grads = reference_loss(c, c.rows, torch.float64, with_grad=True)
                    _, same_grads = reference_loss(c, c.rows, dtype, with_grad=True)
                refs[op] = ((truth_loss, truth_grads), (same_loss, same_grads))
            else:
                refs[op] = (reference_op(c, op, c.rows, torch.float64, with_weight),
                            reference_op(c, op, c.rows, dtype, with_weight))
        return refs

    def compare(self, case: CheckCase, dtype: torch.dtype, path: CheckedPath, result: Result, refs,
                c: CheckInputs, seconds: float) -> None:
        (truth_values, truth_grads), (same_values, same_grads) = refs[path.op]
        values, grads = result
        at_rows = path.op != "papo_loss"  # the loss is one scalar over all rows
        for name in OUTPUTS[path.op]:
            kernel = values[name][c.rows] if at_rows else values[name]
            self.record(case, dtype, path.name, name, seconds=seconds,
                        **budget(kernel, same_values[name], truth_values[name], VALUE_ATOL))
        for name in ("hidden", "hidden_masked", "weight"):
            if name not in truth_grads:
                continue
            kernel = grads.get(name)
            if kernel is not None and name != "weight":
                kernel = kernel[c.rows]
            self.record(case, dtype, path.name, f"grad {name}", seconds=seconds,
                        **budget(kernel, same_grads.get(name), truth_grads[name], ATOL[dtype]))

    def run_case(self, case: CheckCase, dtype: torch.dtype, seed: int) -> None:
        runnable = []
        for path in self.paths:
            reason = self.skip_reason(path, dtype)
            if reason:
                self.record(case, dtype, path.name, "*", status="SKIP", note=reason)
            else:
                runnable.append(path)
        if not runnable:
            return
        start = time.perf_counter()
        try:
            c = make_check_inputs(case, dtype, self.device, seed)
            refs = self.references(c, case, dtype, list(dict.fromkeys(path.op for path in runnable)))
        except Exception as error:  # a reference that fails (out of memory) fails every path of the case
            for path in runnable:
                self.record(case, dtype, path.name, "*", status="ERROR", note=f"reference: {describe(error)}")
            release(self.device)
            return
        self.log(f"  references: {time.perf_counter() - start:.1f} s ({c.x.description})")
        for path in runnable:
            reason = self.skip_reason(path, dtype)
            if reason:
                self.record(case, dtype, path.name, "*", status="SKIP", note=reason)
                continue
            c.x.zero_grad()
            try:
                start = time.perf_counter()
                result = path.run(c)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - start
                self.compare(case, dtype, path, result, refs, c, seconds)
            except Exception as error:  # every path is checked, whatever another one did
                self.record(case, dtype, path.name, "*", status="ERROR", note=describe(error))
            finally:
                result = None
                c.x.zero_grad()
                release(self.device)
            passed = [row for row in self.rows if row["path"] == path.name and row["case"] == case.label
                      and row["dtype"] == str(dtype).removeprefix("torch.")]
            verdict = "PASS" if all(row["status"] == "PASS" for row in passed) else "FAIL"
            self.log(f"  {verdict} {path.name:<30} {dtype} ({len(passed)} quantities, "
                     f"{passed[-1]['seconds'] or 0:.2f} s)")
        del c, refs
        release(self.device)

    def run(self, progress: Callable[[List[Dict[str, object]]], None] = lambda rows: None) -> List[Dict[str, object]]:
        """Every case in the first dtype, then in the next (bf16 first: a time limit cuts the others);
        ``progress`` gets the rows so far after each."""
        for dtype_index, dtype in enumerate(self.dtypes):
            for case_index, case in enumerate(self.cases):
                self.log(f"{case.label}, {dtype}")
                self.run_case(case, dtype, seed=100 * case_index + dtype_index)
                progress(self.rows)
        return self.rows
