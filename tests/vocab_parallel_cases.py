"""The cases of test_vocab_parallel.py and the worker that runs them in each process of a gloo group.

``run_group(world, sizes, out_dir)`` spawns ``world`` processes once; each runs every case with its
block of the head's rows (``sizes``: rows per rank, V not divisible by the world size), then the bad
inputs, and saves what it got to ``out_dir/rank<r>.pt``. The test module runs the same cases in one
process with the whole head and compares.
"""

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from papo_kernels import PAPOLoss, linear_logprobs, linear_perception_kl, papo_loss
from papo_kernels.backends import head_chunks
from papo_kernels.vocab_parallel import check_linear_call, hidden_inputs

from test_fast_path import B, D, T, V
from test_fast_path import make_batch as fast_path_batch

# Rows per rank: 2 ranks with blocks of different sizes, 4 ranks as an even split leaves them (V = 23 divides by
# neither). Every first and last id of a block is a response token (EDGE_IDS).
SIZES = {2: (9, 14), 4: (6, 6, 6, 5)}
TINY_WORKSPACE = 3000  # a few tokens per chunk at these sizes in float64, a different number on each rank's block
GROUP_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 300


def edge_ids() -> list:
    ids = set()
    for sizes in SIZES.values():
        start = 0
        for size in sizes:
            ids |= {start, start + size - 1}
            start += size
    return sorted(ids)


@dataclass(frozen=True)
class Case:
    """One papo_loss call: path and backend, the settings that vary, the dtype."""

    name: str
    path: str
    backend: str
    loss_type: str = "dapo"
    perception_kl: str = "k3"
    entropy: str = "exact"
    bias: bool = True
    temperature: float = 1.0
    masked_input: Optional[str] = "hidden_masked"  # or "masked_logprobs", or None (one pass)
    old_and_ref: bool = False
    dtype: torch.dtype = torch.float64
    hidden_grad: str = "all_reduce"
    workspace_bytes: Optional[int] = field(default=None)

    def options(self) -> Dict[str, object]:
        options = dict(loss_type=self.loss_type, perception_kl=self.perception_kl, entropy=self.entropy,
                       temperature=self.temperature, gamma=0.3, eta_clean=0.2, eta_masked=0.25,
                       max_completion_length=9, path=self.path, backend=self.backend)
        if self.masked_input is None:
            options.update(gamma=0.0, eta_masked=0.0)
        if self.workspace_bytes is not None:
            options["workspace_bytes"] = self.workspace_bytes
        return options


FLOAT64_CASES = [
    Case("fast-torch-dapo-k3-exact-bias", "fast", "torch", temperature=0.7, old_and_ref=True,
         workspace_bytes=TINY_WORKSPACE),
    Case("fast-torch-grpo-exactkl-sampled", "fast", "torch", loss_type="grpo", perception_kl="exact",
         entropy="sampled", bias=False, workspace_bytes=TINY_WORKSPACE),
    Case("fast-torch-bnpo-masked_logprobs", "fast", "torch", loss_type="bnpo", masked_input="masked_logprobs",
         temperature=1.3),
    Case("fast-torch-dr_grpo-one-pass", "fast", "torch", loss_type="dr_grpo", masked_input=None, old_and_ref=True),
    Case("fast-native-bnpo-exactkl-exact-bias", "fast", "native", loss_type="bnpo", perception_kl="exact",
         temperature=1.3, workspace_bytes=TINY_WORKSPACE),
    Case("fast-native-dr_grpo-k3-sampled", "fast", "native", loss_type="dr_grpo", entropy="sampled", bias=False,
         temperature=0.7, old_and_ref=True),
    Case("per_token-reference-dapo-exactkl-bias", "per_token", "reference", perception_kl="exact", temperature=0.7),
    Case("per_token-reference-grpo-one-pass", "per_token", "reference", loss_type="grpo", entropy="sampled",
         masked_input=None, bias=False),
    Case("per_token-torch-bnpo-exactkl-exact", "per_token", "torch", loss_type="bnpo", perception_kl="exact"),
    Case("per_token-torch-dr_grpo-k3-sampled-bias", "per_token", "torch", loss_type="dr_grpo", entropy="sampled",
         temperature=1.3, old_and_ref=True),
]
# The hidden gradients left partial: each rank holds its block's part, their sum is the gradient.
PARTIAL_CASE = Case("fast-torch-partial-hidden-grad", "fast", "torch", perception_kl="exact", hidden_grad="partial")
FULL_FLOAT32 = dict(perception_kl="exact", temperature=0.7, old_and_ref=True, dtype=torch.float32)
FLOAT32_CASES = [
    Case("fast-torch-float32", "fast", "torch", workspace_bytes=1500, **FULL_FLOAT32),
    Case("fast-native-float32", "fast", "native", **FULL_FLOAT32),
    Case("fast-triton-float32", "fast", "triton", **FULL_FLOAT32),
    Case("per_token-torch-float32", "per_token", "torch", **FULL_FLOAT32),
]
LOSS_CASES = FLOAT64_CASES + [PARTIAL_CASE] + FLOAT32_CASES
# The LM-head ops: (name, op, backend, bias, temperature). "head_chunks": head_chunks.py with the torch head (what
# the torch backend runs on CUDA) called directly on the CPU tensors, at TINY_WORKSPACE.
OP_CASES = [("perception_kl-reference", "perception_kl", "reference", True, 0.7),
            ("perception_kl-torch", "perception_kl", "torch", True, 1.3),
            ("logprobs-torch", "logprobs", "torch", False, 1.0),
            ("logprobs-reference", "logprobs", "reference", True, 0.7),
            ("perception_kl-head_chunks", "perception_kl", "head_chunks", True, 0.7),
            ("logprobs-head_chunks", "logprobs", "head_chunks", True, 1.3)]
# The same in float32: the triton backend under the interpreter, in the 2-process group only (CI's time).
FLOAT32_OP_CASES = [("perception_kl-triton-float32", "perception_kl", "triton", True, 0.7),
                    ("logprobs-triton-float32", "logprobs", "triton", True, 1.3)]
FLOAT32_OP_WORLD = 2


def make_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    """test_fast_path's float64 inputs with the whole head, every block edge id a response token, and fixed
    upstream gradients for the LM-head ops."""
    batch = fast_path_batch(seed=seed)
    on = batch["completion_mask"].reshape(-1).nonzero().squeeze(1)
    edges = torch.tensor(edge_ids())
    batch["completion_ids"].view(-1)[on[:len(edges)]] = edges
    batch["upstream"] = torch.randn(5, B, T, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return batch


def block(sizes: Sequence[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run_case(batch, case: Case, rows: slice = slice(None), way: str = "papo_loss", **call_options):
    """papo_loss on ``case`` with the head's rows ``rows``, called directly, through ``PAPOLoss`` holding the settings
    and ``call_options`` (``way="module"``) or under ``torch.compile`` (``way="compiled"``): (loss, metrics,
    gradients of the leaves)."""
    leaves = {"hidden": batch["hidden"], "weight": batch["weight"][rows]}
    options = case.options()
    if case.bias:
        leaves["bias"] = batch["bias"][rows]
    if case.masked_input == "hidden_masked":
        leaves["hidden_masked"] = batch["hidden_masked"]
    if case.masked_input == "masked_logprobs":
        options["masked_logprobs"] = batch["masked_logprobs"].to(case.dtype)
    if case.old_and_ref:
        options.update(old_logprobs=batch["old_logprobs"].to(case.dtype),
                       ref_logprobs=batch["ref_logprobs"].to(case.dtype), beta=0.05)
    leaves = {name: value.to(case.dtype).clone().requires_grad_() for name, value in leaves.items()}
    if way == "module":
        loss_function = PAPOLoss(**options, **call_options)
    else:
        def loss_function(*tensors, **more):
            return papo_loss(*tensors, **options, **call_options, **more)
        if way == "compiled":
            loss_function = torch.compile(loss_function, backend="eager")
    loss, metrics = loss_function(leaves["hidden"], leaves["weight"], batch["completion_ids"],
                                  batch["completion_mask"], batch["advantages"].to(case.dtype),
                                  hidden_masked=leaves.get("hidden_masked"), bias=leaves.get("bias"))
    loss.backward()
    return loss.detach(), metrics, {name: leaf.grad for name, leaf in leaves.items()}


def run_op(batch, op: str, backend: str, bias: bool, temperature: float, rows: slice = slice(None),
           dtype: torch.dtype = torch.float64, **call_options):
    """An LM-head op on every response position (ids in range) in ``dtype``, back-propagating fixed upstream
    gradients."""
    tokens = batch["completion_ids"].clamp(min=0)
    leaves = {"hidden": batch["hidden"], "weight": batch["weight"][rows]}
    if bias:
        leaves["bias"] = batch["bias"][rows]
    if op == "perception_kl":
        leaves["hidden_masked"] = batch["hidden_masked"]
    leaves = {name: value.to(dtype).clone().requires_grad_() for name, value in leaves.items()}
    if backend == "head_chunks":
        outputs = _head_chunks_op(op, leaves, tokens, temperature, **call_options)
    elif op == "perception_kl":
        outputs = linear_perception_kl(leaves["hidden"], leaves["hidden_masked"], leaves["weight"], tokens,
                                       bias=leaves.get("bias"), temperature=temperature, backend=backend,
                                       **call_options)
    else:
        outputs = linear_logprobs(leaves["hidden"], leaves["weight"], tokens, bias=leaves.get("bias"),
                                  temperature=temperature, backend=backend, **call_options)
    total = sum((output * upstream.to(dtype)).sum() for output, upstream in zip(outputs, batch["upstream"]))
    total.backward()
    return [output.detach() for output in outputs], {name: leaf.grad for name, leaf in leaves.items()}


def _head_chunks_op(op: str, leaves, tokens, temperature: float, vocab_parallel_group=None):
    """The op by ``head_chunks`` with the torch head at TINY_WORKSPACE (a few tokens a chunk, a different number on
    each rank's block), called as the LM-head ops call a backend: the shard from their checks, the hidden states
    through ``hidden_inputs`` (their gradients summed over the group), ids local to the rank's block."""
    hidden, hidden_masked, weight, bias = (leaves.get(name) for name in ("hidden", "hidden_masked", "weight", "bias"))
    temperature, shard = check_linear_call(vocab_parallel_group, "all_reduce", hidden, weight, tokens, bias,
                                           temperature, "torch", hidden_masked=hidden_masked)
    flat_hidden, flat_hidden_masked = hidden_inputs(
        shard, *(None if h is None else h.reshape(-1, h.shape[-1]) for h in (hidden, hidden_masked)))
    ids = tokens.reshape(-1) if shard is None else shard.local_ids(tokens.reshape(-1))
    options = head_chunks.head_options(head_chunks.TORCH_HEAD, temperature, TINY_WORKSPACE)
    if op == "perception_kl":
        outputs = head_chunks.linear_perception_kl(flat_hidden, flat_hidden_masked, weight, ids, bias, options, shard)
    else:
        outputs = head_chunks.linear_logprobs(flat_hidden, weight, ids, bias, options, shard)
    return [output.reshape(tokens.shape) for output in outputs]


# Bad inputs: each is a call every rank makes, with one rank's inputs (or every rank's) wrong. -> (what the
# call changes on the ranks it changes, which ranks).
def _bad_calls(batch, rank: int, world: int):
    sizes = SIZES[world]
    rows = block(sizes, rank)
    last = rank == world - 1

    def call(hidden=None, weight=None, ids=None, mask=None, **options):
        hidden = batch["hidden"] if hidden is None else hidden
        return papo_loss(hidden, batch["weight"][rows] if weight is None else weight,
                         batch["completion_ids"] if ids is None else ids,
                         batch["completion_mask"] if mask is None else mask, batch["advantages"],
                         vocab_parallel_group=dist.group.WORLD, **options)

    wider = torch.randn(B, T, D + 1, dtype=torch.float64)
    out_of_range = batch["completion_ids"].clone()
    out_of_range[1, 0] = V
    inf_bias = batch["bias"][rows].clone()
    inf_bias[-1] = float("inf")
    other_ids = batch["completion_ids"].clone()
    other_ids[1, 1] = (other_ids[1, 1] + 1) % V
    return {
        "tokens differ": lambda: call(hidden=batch["hidden"][:, :-1] if last else None,
                                      ids=batch["completion_ids"][:, :-1] if last else None,
                                      mask=batch["completion_mask"][:, :-1] if last else None),
        "D differs": lambda: call(hidden=wider if last else None,
                                  weight=torch.randn(sizes[rank], D + 1, dtype=torch.float64) if last else None),
        "weight block of the wrong width": lambda: call(
            weight=torch.randn(sizes[rank], D - 1, dtype=torch.float64) if last else None),
        "id outside the global vocabulary": lambda: call(ids=out_of_range),
        "one rank refuses a setting": lambda: call(temperature=-1.0 if last else 1.0),
        "settings differ": lambda: call(temperature=0.5 if last else 1.0),
        "ids differ": lambda: call(ids=other_ids if last else None),
        "one rank's bias block is not finite": lambda: call(bias=inf_bias if last else batch["bias"][rows]),
        "op id outside the global vocabulary": lambda: _linear_logprobs(batch, rows, out_of_range.clamp(min=0)),
    }


def _linear_logprobs(batch, rows, tokens):
    return linear_logprobs(batch["hidden"], batch["weight"][rows], tokens, backend="torch",
                           vocab_parallel_group=dist.group.WORLD)


def _recorded(run):
    """What ``run`` returns, or the error it raised as a string (for the test to report; every rank raises at the
    same point of the same case, so the group stays in step for the next one)."""
    try:
        return run()
    except Exception as error:  # reported by the test that reads the case
        return f"{type(error).__name__}: {error}"


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    torch.set_num_threads(1)
    batch = make_batch()
    rows = block(SIZES[world], rank)
    group = dist.group.WORLD
    results = {"rows": rows, "losses": {}, "ops": {}, "bad": {}}
    for case in LOSS_CASES:
        results["losses"][case.name] = _recorded(lambda: run_case(batch, case, rows, vocab_parallel_group=group,
                                                                  vocab_parallel_hidden_grad=case.hidden_grad))
    float32_cases = FLOAT32_OP_CASES if world == FLOAT32_OP_WORLD else []
    for cases, dtype in ((OP_CASES, torch.float64), (float32_cases, torch.float32)):
        for name, op, backend, bias, temperature in cases:
            results["ops"][name] = _recorded(lambda: run_op(batch, op, backend, bias, temperature, rows, dtype,
                                                            vocab_parallel_group=group))
    for way in ("module", "compiled"):
        results[way] = _recorded(lambda: run_case(batch, FLOAT64_CASES[0], rows, way, vocab_parallel_group=group))
    for name, bad_call in _bad_calls(batch, rank, world).items():
        started = time.monotonic()
        try:
            bad_call()
            results["bad"][name] = ("no error", "", time.monotonic() - started)
        except Exception as error:  # recorded for the test to judge: every rank must raise, none may hang
            results["bad"][name] = (type(error).__name__, str(error), time.monotonic() - started)
    # the group still works after the refused calls: the first case once more
    results["after_bad"] = run_case(batch, FLOAT64_CASES[0], rows, vocab_parallel_group=group)[0]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_group(world: int, out_dir: Path):
    """Spawns ``world`` processes running ``worker`` once and returns their results, rank by rank."""
    init_file = out_dir / "init"
    context = mp.start_processes(worker, args=(world, str(init_file), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {world} processes did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]

