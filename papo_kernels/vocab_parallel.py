"""A vocabulary-parallel LM head (Megatron-style tensor parallelism): the collectives and their checks.

Each rank of a process group holds a contiguous block of the head's rows, in rank order (rank 0 the
first ids), blocks of any sizes (V need not divide by the group's size). Every per-token input is
the same on every rank: ``hidden`` (and ``hidden_masked``), the global token ids, the advantages,
the settings.

What each rank computes and receives (``papo_loss``, the LM-head ops, with ``vocab_parallel_group``):

- its logits over its own columns only, and per token the partial statistics of those columns
  (``partials.py``); the ranks all-reduce the maxima, then the rescaled sums
  (``all_reduce_partials``), and every rank finalizes the same exact statistics: lse, the
  entropies, the KL, and the sampled token's log-prob, whose logit comes from the rank that holds it;
- so the same loss, metrics and per-token outputs on every rank;
- the gradient of its own block of the weight and bias, complete (the hidden states are whole on
  every rank, and dZ on the rank's columns needs only the all-reduced statistics);
- the hidden states' gradients: each rank's columns give a partial dZ W; with
  ``vocab_parallel_hidden_grad="all_reduce"`` (the default) they are summed over the group in
  backward (``hidden_inputs``, Megatron's copy to the tensor-parallel region), so that
  ``hidden.grad`` is complete on every rank; ``"partial"`` leaves each rank its own part, for
  frameworks whose region reduces it already (``copy_to_tensor_model_parallel_region``, or sequence
  parallelism's all-gather, whose backward is a reduce-scatter).

Communication per call, none of it of size V:

- one all-gather of a few integers per rank before any heavy work (``agree_on_inputs``): the shapes,
  the ids' range and sum, the settings' fingerprint, and whether each rank's own checks passed; any
  disagreement or refusal is an error on every rank rather than a rank left waiting in a collective;
- on the fast path and the LM-head ops' chunks of library products (``backends/head_chunks.py``: the
  triton backend, the torch backend on CUDA), one all-reduce of the chunk size per pass (min: ranks
  whose memory or blocks differ agree on it);
- per row chunk (fast path; head_chunks, forward and again in backward) or per call (the torch
  backend's online-softmax chunks on the CPU): an all-reduce (max) of one float per token and pass,
  then an all-reduce (sum) of 3 floats per token for one pass, 7 for a clean/masked pair;
- in backward, one all-reduce (sum) of the hidden gradients, n x D per pass, unless ``"partial"``.

The LM-head ops' reference backend, written for clarity, sums each statistic over the group by itself
and all-reduces the logsumexp's gradient in backward (``replicated``); O(N) floats all the same.
"""

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import FLOAT_DTYPES, check_choice, check_linear_inputs
from .partials import NOT_HERE, joined, max_fields, rescaled_sums

HIDDEN_GRAD_MODES = ("all_reduce", "partial")
Result = TypeVar("Result")


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of the vocabulary: ids [start, start + size) of vocab_size, and the group's settings."""

    group: object  # a torch.distributed ProcessGroup
    start: int
    size: int
    vocab_size: int
    hidden_grad: str  # one of HIDDEN_GRAD_MODES

    def local_ids(self, tokens: Tensor) -> Tensor:
        """Global ids as ids of this block's rows, ``NOT_HERE`` (-1) for a token another rank holds."""
        here = (tokens >= self.start) & (tokens < self.start + self.size)
        return torch.where(here, tokens - self.start, NOT_HERE)


def check_group(group, hidden_grad: str) -> None:
    """A process group this process belongs to, and a hidden-gradient mode (checked before any collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group needs torch.distributed initialised (init_process_group), "
                         "which it is not in this process")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed ProcessGroup (the tensor-parallel "
                        f"group whose ranks hold the head's blocks of rows), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("vocab_parallel_group must be a group this process belongs to; it is not a member")
    check_choice("vocab_parallel_hidden_grad", hidden_grad, HIDDEN_GRAD_MODES)


def check_without_group(hidden_grad: str) -> None:
    """``vocab_parallel_hidden_grad`` when no group is given: a valid mode, and the default (it changes nothing)."""
    check_choice("vocab_parallel_hidden_grad", hidden_grad, HIDDEN_GRAD_MODES)
    if hidden_grad != "all_reduce":
        raise ValueError(f"vocab_parallel_hidden_grad={hidden_grad!r} applies to a vocabulary-parallel head, but "
                         "vocab_parallel_group is None; leave it 'all_reduce'")


# The integers each rank describes its inputs by (-1: not readable), in this order.
DESCRIPTION = ("refused", "tokens", "dim", "weight_rows", "weight_cols", "paired", "bias", "dtype", "requires_grad",
               "hidden_grad", "settings", "ids_count", "ids_low", "ids_high", "ids_sum")
# What every rank's call must agree on beyond the shapes, and how a message names it.
SAME_CALL = (("paired", "whether hidden_masked is given"), ("bias", "whether bias is given"),
             ("dtype", "hidden's dtype"), ("requires_grad", "which inputs require grad (and grad mode)"),
             ("hidden_grad", "vocab_parallel_hidden_grad"), ("settings", "the settings"))
NO_ID = 2**63 - 1


def _ids_summary(tokens, mask) -> List[int]:
    """(count, lowest, highest, sum) of the ids where ``mask`` is on (all ids without one), in one host transfer;
    -1s where the tensors cannot be read (a rank that refused them)."""
    try:
        ids = tokens.reshape(-1).long()
        on = torch.ones_like(ids, dtype=torch.bool) if mask is None else (mask != 0).reshape(-1)
        if ids.numel() == 0:
            return [0, NO_ID, -1, 0]
        return torch.stack([on.sum(), ids.where(on, NO_ID).min(), ids.where(on, -1).max(),
                            ids.where(on, 0).sum()]).tolist()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return [-1, -1, -1, -1]


def _describe(refused: bool, hidden, hidden_masked, weight, bias, tokens, mask, hidden_grad: str,
              settings: Optional[Dict[str, object]]) -> List[int]:
    tokens_count = dim = weight_rows = weight_cols = -1
    if isinstance(hidden, Tensor) and hidden.dim() >= 1:
        dim, tokens_count = hidden.shape[-1], math.prod(hidden.shape[:-1])
    if isinstance(weight, Tensor) and weight.dim() == 2:
        weight_rows, weight_cols = weight.shape
    dtype = FLOAT_DTYPES.index(hidden.dtype) if isinstance(hidden, Tensor) and hidden.dtype in FLOAT_DTYPES else -1
    requires_grad = sum(1 << i for i, value in enumerate((hidden, hidden_masked, weight, bias))
                        if isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled())
    mode = HIDDEN_GRAD_MODES.index(hidden_grad) if hidden_grad in HIDDEN_GRAD_MODES else -1
    fingerprint = -1 if settings is None else zlib.crc32(repr(sorted(settings.items())).encode())
    return [int(refused), tokens_count, dim, weight_rows, weight_cols, int(hidden_masked is not None),
            int(bias is not None), dtype, requires_grad, mode, fingerprint, *_ids_summary(tokens, mask)]


def _by_rank(table: Sequence[Dict[str, int]], describe: Callable[[Dict[str, int]], str]) -> str:
    return ", ".join(f"rank {rank}: {describe(row)}" for rank, row in enumerate(table))


def _shape_problem(table: Sequence[Dict[str, int]]) -> Optional[str]:
    """What is wrong with the shapes the ranks hold (readable whether or not a rank's own check passed), or None."""
    if len({(row["tokens"], row["dim"]) for row in table}) > 1:
        return ("hidden must have the same shape on every rank of vocab_parallel_group (the same tokens, and the "
                "whole hidden size D); got tokens x D = " + _by_rank(table, lambda r: f"{r['tokens']} x {r['dim']}"))
    dim = table[0]["dim"]
    if any(row["weight_cols"] != dim or row["weight_rows"] < 1 for row in table):
        return (f"weight must be this rank's block of rows of the head, shape (V_rank, D) with V_rank >= 1 and "
                f"D = {dim} (hidden's last dimension) on every rank of vocab_parallel_group; got " +
                _by_rank(table, lambda r: f"({r['weight_rows']}, {r['weight_cols']})"))
    return None


def _call_problem(table: Sequence[Dict[str, int]], ids_name: str) -> Optional[str]:
    """What the ranks' calls disagree on, or which ids fall outside the global vocabulary, or None."""
    for field, what in SAME_CALL:
        if len({row[field] for row in table}) > 1:
            return (f"every rank of vocab_parallel_group must make the same call: the ranks disagree on {what} "
                    f"({_by_rank(table, lambda r: str(r[field]))})")
    ids_fields = DESCRIPTION[-4:]
    if len({tuple(row[field] for field in ids_fields) for row in table}) > 1:
        return (f"{ids_name} must be the same global ids on every rank of vocab_parallel_group; got (count, lowest, "
                "highest, sum) = " + _by_rank(table, lambda r: str(tuple(r[field] for field in ids_fields))))
    vocab_size = sum(row["weight_rows"] for row in table)
    count, low, high = table[0]["ids_count"], table[0]["ids_low"], table[0]["ids_high"]
    if count > 0 and (low < 0 or high >= vocab_size):
        return (f"{ids_name} must hold ids in [0, {vocab_size}) (the global vocabulary: the rows of the weight blocks "
                f"of vocab_parallel_group, summed), got id {low if low < 0 else high}")
    return None


def agree_on_inputs(group, hidden_grad: str, check: Callable[[], Result], *, hidden, hidden_masked, weight, bias,
                    tokens, mask=None, ids_name: str = "tokens",
                    settings: Callable[[Result], Dict[str, object]] = lambda result: {}
                    ) -> Tuple[Result, VocabShard]:
    """Runs this rank's own ``check`` of its inputs, then one all-gather of a few integers per rank
    (``DESCRIPTION``). Every rank raises a ValueError where the ranks disagree on the shapes (tokens, D) or a
    weight block has the wrong width or no rows (the same message everywhere); where any rank's check refused
    its inputs (that rank raises its own error, the others say which rank); where the optional inputs, dtype,
    grad flags or settings differ; or where the ids (where ``mask`` is on) differ between ranks or fall outside
    the global vocabulary. Returns the check's result and this rank's ``VocabShard``."""
    check_group(group, hidden_grad)
    error, result = None, None
    try:
        result = check()
    except (TypeError, ValueError) as caught:
        error = caught
    description = _describe(error is not None, hidden, hidden_masked, weight, bias, tokens, mask, hidden_grad,
                            None if error is not None else settings(result))
    device = hidden.device if isinstance(hidden, Tensor) and hidden.device.type != "meta" else torch.device("cpu")
    local = torch.tensor(description, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = [dict(zip(DESCRIPTION, row.tolist())) for row in gathered]
    problem = _shape_problem(table)
    refused = [rank for rank, row in enumerate(table) if row["refused"]]
    if problem is None and refused:
        if error is not None:
            raise error
        problem = (f"rank(s) {refused} of vocab_parallel_group refused their inputs and raise that error there; "
                   "every rank of the group raises, so that none is left waiting in a collective")
    problem = problem or _call_problem(table, ids_name)
    if problem is not None:
        raise ValueError(f"vocab_parallel_group: {problem}") from error
    rank = dist.get_rank(group)
    return result, VocabShard(group, sum(row["weight_rows"] for row in table[:rank]), table[rank]["weight_rows"],
                              sum(row["weight_rows"] for row in table), hidden_grad)


def all_reduce_partials(partials: Tensor, shard: VocabShard) -> Tensor:
    """The (fields, C) partials of this rank's columns merged with every rank's: the maxima by an all-reduce
    (max), then the sums rescaled to them by an all-reduce (sum) (``partials.py``)."""
    maxima = partials[max_fields(partials.shape[0] > 4)]  # a copy (advanced indexing)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=shard.group)
    sums = rescaled_sums(partials, maxima)
    dist.all_reduce(sums, group=shard.group)
    return joined(maxima, sums)


def agreed_chunk(chunk: int, shard: VocabShard, device: torch.device) -> int:
    """The smallest of the ranks' chunk sizes, so that every rank sweeps the same row chunks."""
    value = torch.tensor([chunk], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=shard.group)
    return int(value)


def all_reduce_max(values: Tensor, shard: VocabShard) -> Tensor:
    """The elementwise maximum over the group (no gradient)."""
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=shard.group)
    return values


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the group of each rank's partial value. Backward: the identity, since every rank
    computes the same loss from the sum (Megatron's reduce from the tensor-parallel region)."""

    @staticmethod
    def forward(ctx, group, values):
        total = values.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def sum_over_group(values: Tensor, shard: VocabShard) -> Tensor:
    return _SumOverGroup.apply(shard.group, values)


class _AllReduceGradients(torch.autograd.Function):
    """Forward: the identity. Backward: each gradient summed over the group, all of them in one all-reduce
    (Megatron's copy to the tensor-parallel region)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.set_materialize_grads(False)
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [grad for grad in grads if grad is not None]
        if not present:
            return (None, *grads)
        flat = torch.cat([grad.reshape(-1) for grad in present])
        dist.all_reduce(flat, group=ctx.group)
        parts = iter(flat.split([grad.numel() for grad in present]))
        return (None, *(None if grad is None else next(parts).view_as(grad) for grad in grads))


def replicated(values: Tensor, shard: VocabShard) -> Tensor:
    """A value every rank holds (the hidden states, an all-reduced statistic) as one rank's partial computation uses
    it: the identity, whose backward sums over the group the gradients that each rank's part sends it."""
    (values,) = _AllReduceGradients.apply(shard.group, values)
    return values


def hidden_inputs(shard: Optional[VocabShard], *hidden: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The hidden states as the head's computation takes them: as given without a group or with
    ``hidden_grad="partial"``, else through ``_AllReduceGradients`` (their gradients summed over the group)."""
    present = [tensor for tensor in hidden if tensor is not None]
    if shard is None or shard.hidden_grad == "partial" or not any(tensor.requires_grad for tensor in present):
        return hidden
    reduced = iter(_AllReduceGradients.apply(shard.group, *present))
    return tuple(None if tensor is None else next(reduced) for tensor in hidden)


def check_linear_call(group, hidden_grad: str, hidden, weight, tokens, bias, temperature, backend: str,
                      hidden_masked=None) -> Tuple[float, Optional[VocabShard]]:
    """The LM-head ops' checks (``check_linear_inputs``): over a vocabulary-parallel head the ranks' own checks and
    the ids against the global vocabulary, agreed on by every rank (``agree_on_inputs``). Returns the temperature
    and this rank's shard (None without a group)."""
    if group is None:
        check_without_group(hidden_grad)
        return check_linear_inputs(hidden, weight, tokens, bias, temperature, hidden_masked=hidden_masked), None

    def check() -> float:
        return check_linear_inputs(hidden, weight, tokens, bias, temperature, hidden_masked=hidden_masked,
                                   check_ids=False)

    return agree_on_inputs(group, hidden_grad, check, hidden=hidden, hidden_masked=hidden_masked, weight=weight,
                           bias=bias, tokens=tokens,
                           settings=lambda checked: {"temperature": checked, "backend": backend})
