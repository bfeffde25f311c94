"""The chunk loop of the fast path: the loss and its gradient in one sweep over the tokens.

Per chunk of C tokens (shared STYLE.md, "a path built from library products and an epilogue"):

1. one matrix product by the device's library, ``logits = [h; h~] @ W^T`` (2C x V, float32
   results; the clean and masked rows of the chunk stacked);
2. the epilogue's first sweep: per-token statistics (l, H, l~, H~, KL); over a vocabulary-parallel
   head, the partial statistics of the rank's columns, all-reduced over the ranks and finalized
   (``statistics``, ``papo_kernels/vocab_parallel.py``);
3. the per-token upstream gradients, by autograd on the chunk's small per-token graph of
   ``objective.token_losses`` over the detached statistics: the objective is written once;
4. the epilogue's second sweep: dZ, the gradient with respect to the raw logits, in place;
5. ``d[h; h~] = dZ @ W`` (one product for both passes) copied into the chunk's rows of the hidden gradients, and
   ``dW += dZ^T @ [h; h~]`` into one float32 (V, D) accumulator (the gradient itself when
   W is float32), ``db += sum_rows dZ``.

Matrix work: 2 x 2CDV per chunk forward, 2 x 2 x 2CDV backward, so 12 N D V for N tokens,
nothing recomputed. Memory besides the gradients: the workspace (R x V float32 logits, R = 2C,
the epilogue's temporaries, a half-precision dZ buffer for half inputs on CUDA, the chunk's
stacked rows and their gradient rows: ``bytes_per_token``), sized by ``workspace_bytes`` or, when
that is None, by the policy of ``workspace.py``; and the float32 dW accumulator.

Numerics:

- the loss is the sum of the chunks' totals in float64 (each total a float32 sum of its tokens),
  so its rounding does not grow with the number of chunks;
- dZ goes to a half-precision buffer on CUDA, and a float16 dZ is made from upstream gradients
  scaled per chunk by a power of two, which the products' alpha undoes (``half_dz.py``, shared
  with the per-token ops' chunked backward).

The dW product is ``addmm`` by default, or the reduce-add kernel (``grad_weight.py``).

Over a vocabulary-parallel head each rank runs this loop on its block of W's rows with the same
tokens: V is the block's size (12 N D V / P of matrix work per rank for P equal blocks), the token
ids are local to the block (``NOT_HERE`` where another rank holds the token), the ranks agree on the
chunk size (one all-reduce), and dZ W gives each rank its part of the hidden gradients, which the
caller sums over the ranks in backward (``vocab_parallel.hidden_inputs``).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import partials, vocab_parallel
from ..backends.reference import compute_dtype
from ..objective import Objective, Statistics, TokenBatch, Terms, token_losses
from .epilogues.contract import RowStatistics, UpstreamGradients
from .grad_weight import HALF_DTYPES, resolve_grad_weight_kernel
from .half_dz import chunk_scale, dz_dtype, scaled
from .workspace import resolve_workspace_bytes


@dataclass(frozen=True)
class FastPathOptions:
    temperature: float
    workspace_bytes: Optional[int] = None  # None: the policy of workspace.py
    # The dtype of the dZ buffer; None: the rule of half_dz.dz_dtype (a half buffer on CUDA for half inputs, else dZ
    # overwrites the float32 logits). Tests set it to run the half-dZ code on CPU.
    dz_dtype: Optional[torch.dtype] = None


class FastPathResult(NamedTuple):
    loss: Tensor  # 0-dim, sum_t a_t L_t
    terms: Terms  # per token, for the metrics
    grad_hidden: Optional[Tensor]
    grad_hidden_masked: Optional[Tensor]
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]


def _native_half_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the library multiplies half inputs into float32 results directly (CUDA, torch >= 2.8)."""
    return device.type == "cuda" and dtype in HALF_DTYPES and hasattr(torch.ops.aten.mm, "dtype_out")


class MatrixProducts:
    """The three products of the chunk loop, by the device's library, with float32 (or float64) results.

    Half inputs on CUDA multiply as they are into float32 results (``out_dtype``). Elsewhere
    (CPU; CUDA with torch < 2.8) half inputs are multiplied in float32, from one float32 copy
    of the weight made per call. ``alpha`` scales a product before it is written or added.
    The weight gradient is accumulated by ``addmm`` or by the reduce-add kernel
    (``grad_weight_kernel``, see ``grad_weight.py``).
    """

    def __init__(self, weight: Tensor, grad_weight_kernel: str = "addmm"):
        self.result_dtype = compute_dtype(weight.dtype)
        self.native_half = _native_half_products(weight.device, weight.dtype)
        self.input_dtype = weight.dtype if self.native_half else self.result_dtype
        self.weight = weight.to(self.input_dtype)
        self.grad_weight_kernel = grad_weight_kernel

    def logits(self, rows: Tensor, out: Tensor) -> Tensor:
        """out = rows @ W^T."""
        if self.native_half:
            return torch.mm(rows, self.weight.T, out_dtype=self.result_dtype, out=out)
        return torch.mm(rows.to(self.input_dtype), self.weight.T, out=out)

    def grad_rows(self, dz: Tensor, out: Tensor, alpha: float = 1.0) -> None:
        """out = alpha dz @ W, in out's dtype (beta = 0: out's old values are never read)."""
        dz = dz.to(self.input_dtype)
        if out.dtype == self.input_dtype:
            torch.addmm(out, dz, self.weight, beta=0.0, alpha=alpha, out=out)
        else:
            out.copy_(torch.mm(dz, self.weight).mul_(alpha))

    def accumulate_grad_weight(self, accumulator: Tensor, dz: Tensor, rows: Tensor, alpha: float = 1.0,
                               accumulate: bool = True) -> None:
        """accumulator += alpha dz^T @ rows in float32 (``accumulate=False``: accumulator = alpha dz^T @ rows). By
        ``addmm`` with ``out=`` rather than ``addmm_``, which torch's FLOP counter does not see, or by the reduce-add
        kernel."""
        dz, rows = dz.to(self.input_dtype), rows.to(self.input_dtype)
        if self.grad_weight_kernel == "reduce_add":
            from . import triton_grad_weight

            triton_grad_weight.accumulate_grad_weight(accumulator, dz, rows, alpha, accumulate)
        elif self.native_half:
            torch.addmm(accumulator, dz.T, rows, out_dtype=self.result_dtype, beta=float(accumulate), alpha=alpha,
                        out=accumulator)
        else:
            torch.addmm(accumulator, dz.T, rows, beta=float(accumulate), alpha=alpha, out=accumulator)


def bytes_per_token(vocab_size: int, dim: int, paired: bool, itemsize: int, half_dz: bool,
                    epilogue_bytes_per_token: int) -> int:
    """Workspace bytes per token: the logits, the epilogue's temporaries, the chunk's hidden rows and their
    gradient rows, and a half-precision dZ when there is one."""
    passes = 2 if paired else 1
    per_token = passes * vocab_size * itemsize + epilogue_bytes_per_token + 2 * passes * dim * itemsize
    return per_token + (passes * vocab_size * 2 if half_dz else 0)


def tokens_per_chunk(n: int, per_token: int, workspace_bytes: int) -> int:
    """Tokens per chunk for ``per_token`` bytes of workspace each: the fewest chunks that fit ``workspace_bytes``,
    split evenly (at least 1)."""
    most = max(1, min(n, workspace_bytes // per_token))
    chunks = -(-n // most)
    return -(-n // chunks) if n else most


def statistics(epilogue, logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float, paired: bool,
               shard: Optional["vocab_parallel.VocabShard"]) -> RowStatistics:
    """The epilogue's statistics of a chunk; over a vocabulary-parallel head, its partials over the rank's columns
    all-reduced over the ranks, then finalized."""
    if shard is None:
        return epilogue.statistics(logits, tokens, bias, temperature, paired)
    local = epilogue.row_partials(logits, tokens, bias, temperature, paired)
    return RowStatistics(*partials.finalize(vocab_parallel.all_reduce_partials(local, shard), paired))


def _detached_statistics(row_stats: RowStatistics, wants_grad: bool) -> Statistics:
    def leaf(value: Optional[Tensor]) -> Optional[Tensor]:
        return None if value is None else value.detach().requires_grad_(wants_grad)

    return Statistics(leaf(row_stats.logprobs), leaf(row_stats.entropy), leaf(row_stats.logprobs_masked),
                      leaf(row_stats.entropy_masked), leaf(row_stats.kl))


def chunk_objective(row_stats: RowStatistics, batch: TokenBatch, objective: Objective,
                    wants_grad: bool) -> Tuple[Tensor, Terms, Optional[UpstreamGradients]]:
    """The chunk's share of the loss, its terms, and d loss / d statistics per token (autograd on the
    per-token graph of ``token_losses``; None for a statistic the loss does not use)."""
    stats = _detached_statistics(row_stats, wants_grad)
    with torch.enable_grad() if wants_grad else torch.no_grad():
        losses, terms = token_losses(stats, batch, objective)
        total = (batch.aggregation_weights * losses).sum()
    terms = Terms(*(None if term is None else term.detach() for term in terms))
    if not (wants_grad and total.requires_grad):
        return total.detach(), terms, None
    leaves = [s for s in stats if s is not None]
    grads = iter(torch.autograd.grad(total, leaves, allow_unused=True))
    upstream = UpstreamGradients(*(None if s is None else next(grads) for s in stats))
    return total.detach(), terms, upstream


def run_chunks(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
               tokens: Tensor, batch: TokenBatch, objective: Objective, options: FastPathOptions, epilogue,
               needs_grad: Tuple[bool, bool, bool, bool],
               shard: Optional["vocab_parallel.VocabShard"] = None) -> FastPathResult:
    """The loss over the tokens and, where ``needs_grad`` (hidden, hidden_masked, weight, bias) asks, its
    gradients; hidden and hidden_masked are (n, D), tokens (n,) global ids, batch holds the n tokens' inputs.
    With ``shard``, weight and bias are this rank's block of a vocabulary-parallel head, and the hidden
    gradients are this rank's parts."""
    n, dim = hidden.shape
    vocab_size = weight.shape[0]
    paired = hidden_masked is not None
    needs_hidden, needs_hidden_masked, needs_weight, needs_bias = needs_grad
    wants_grad = any(needs_grad)
    device = hidden.device
    grad_weight_kernel = resolve_grad_weight_kernel(device, weight.dtype, vocab_size, dim) if needs_weight \
        else "addmm"
    products = MatrixProducts(weight, grad_weight_kernel)
    result_dtype = products.result_dtype
    itemsize = torch.finfo(result_dtype).bits // 8
    dz_buffer_dtype = dz_dtype(options.dz_dtype, products.native_half, products.input_dtype)
    half_dz = wants_grad and dz_buffer_dtype is not None
    per_token = bytes_per_token(vocab_size, dim, paired, itemsize, half_dz,
                                epilogue.workspace_bytes_per_token(vocab_size, paired, itemsize))
    chunk = tokens_per_chunk(n, per_token, resolve_workspace_bytes(options.workspace_bytes, device,
                                                                   grad_weight_kernel, per_token))
    if shard is not None:
        chunk = vocab_parallel.agreed_chunk(chunk, shard, device)
        tokens = shard.local_ids(tokens)
    passes = 2 if paired else 1
    logits_buffer = torch.empty(passes * chunk, vocab_size, dtype=result_dtype, device=device)
    dz_buffer = torch.empty(passes * chunk, vocab_size, dtype=dz_buffer_dtype, device=device) if half_dz else None
    grad_rows_buffer = torch.empty(passes * chunk, dim, dtype=hidden.dtype, device=device)

    # The hidden gradients are made at the first chunk that sends gradient to their pass: a pass whose
    # statistics the loss does not use gets None, as autograd would give it. The first chunk with a weight
    # gradient writes the accumulator, the later ones add to it.
    grad_hidden = grad_hidden_masked = None
    weight_is_result = weight.dtype == result_dtype
    grad_weight = torch.empty(weight.shape, dtype=result_dtype, device=device) if needs_weight else None
    grad_weight_written = False
    grad_bias = torch.zeros(vocab_size, dtype=result_dtype, device=device) if needs_bias else None

    loss = torch.zeros((), dtype=torch.float64, device=device)
    chunk_terms = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        count = rows.stop - rows.start
        chunk_rows = torch.cat([hidden[rows], hidden_masked[rows]]) if paired else hidden[rows]
        logits = products.logits(chunk_rows, out=logits_buffer[:passes * count])
        row_stats = statistics(epilogue, logits, tokens[rows], bias, options.temperature, paired, shard)
        total, terms, upstream = chunk_objective(row_stats, batch.rows(rows), objective, wants_grad)
        loss += total
        chunk_terms.append(terms)
        if upstream is None or not (upstream.clean or upstream.masked):
            continue
        # dz is linear in the upstream gradients: a float16 dz is made from scaled ones, the products unscale
        dz = logits if dz_buffer is None else dz_buffer[:passes * count]
        scale = chunk_scale(upstream, dz.dtype)
        epilogue.logit_gradient(logits, tokens[rows], bias, options.temperature, row_stats, scaled(upstream, scale),
                                dz)
        # Rows of a pass without gradient are skipped: [clean rows | masked rows] of dz and chunk_rows.
        first = 0 if upstream.clean else count
        last = passes * count if paired and upstream.masked else count
        # d[h; h~] = dZ W in one product over the rows of both passes (W is read once a chunk), then split.
        grad_first = 0 if needs_hidden and upstream.clean else count
        grad_last = passes * count if needs_hidden_masked and upstream.masked else count
        if grad_first < grad_last:
            grad_rows = grad_rows_buffer[:grad_last - grad_first]
            products.grad_rows(dz[grad_first:grad_last], out=grad_rows, alpha=1.0 / scale)
            if grad_first == 0:
                grad_hidden = torch.zeros_like(hidden) if grad_hidden is None else grad_hidden
                grad_hidden[rows] = grad_rows[:count]
            if grad_last > count:
                grad_hidden_masked = torch.zeros_like(hidden_masked) if grad_hidden_masked is None \
                    else grad_hidden_masked
                grad_hidden_masked[rows] = grad_rows[-count:]
        if needs_weight:
            products.accumulate_grad_weight(grad_weight, dz[first:last], chunk_rows[first:last], alpha=1.0 / scale,
                                            accumulate=grad_weight_written)
            grad_weight_written = True
        if needs_bias:
            grad_bias.add_(dz[first:last].sum(0, dtype=result_dtype), alpha=1.0 / scale)

    if not chunk_terms:  # no tokens: the (empty) terms of an empty chunk, and zero gradients as autograd gives
        empty = hidden.new_empty(0, dtype=result_dtype)
        _, terms, upstream = chunk_objective(RowStatistics(*[empty] * (7 if paired else 3)), batch, objective,
                                             wants_grad)
        chunk_terms.append(terms)
        if upstream is not None and needs_hidden and upstream.clean:
            grad_hidden = torch.zeros_like(hidden)
        if upstream is not None and needs_hidden_masked and upstream.masked:
            grad_hidden_masked = torch.zeros_like(hidden_masked)
    terms = Terms(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunk_terms)))
    if grad_weight is not None and not grad_weight_written:
        grad_weight.zero_()
    if grad_weight is not None and not weight_is_result:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return FastPathResult(loss.to(result_dtype), terms, grad_hidden, grad_hidden_masked, grad_weight, grad_bias)
