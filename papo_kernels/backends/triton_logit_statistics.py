"""One Triton GEMM with a statistics epilogue: the per-token softmax statistics of ``[h; h~] W^T`` with the logits
kept on chip (shared PERF_DESIGN.md: design "F", and "GEMM1" of design R).

Two steps, kept apart so that partials of several vocabulary shards can be gathered between them:

1. ``logit_partials``: a persistent GEMM over (token tile, vocabulary tile) pairs. Each pair's tiles
   ``z = (h W^T + b) / tau - c`` and ``z~`` (c: an optional per-row shift; both passes share each weight tile)
   sit in float32 accumulators; the epilogue writes per (token, vocabulary tile) m = max z,
   s = sum exp(z - m), t = sum exp(z - m)(z - m), for pairs the same of z~ and u = sum exp(z - m)(z~ - m~), and
   the program whose tile holds a token's id writes its exact float32 logit. Store mode (``logits`` given) also
   writes z in float32, for a gradient sweep; otherwise the logits never leave the chip.
2. ``finalize_statistics``: folds the partials over the vocabulary tiles into lse = m + log s, l = z_y - lse,
   H = log s - t / s, and KL(p || q) = (t - u) / s - log s + log s~ (PAPO_SPEC.md), and returns each row's m.

Token ids outside [0, V) match no column: their logit stays 0 (a vocabulary shard's partials, with the ids
shifted by the shard's start, add up across shards).

Over a vocabulary-parallel head (``shard``) step 2 is ``sharded_statistics`` instead: the tiles' partials merged
into the rank's partials in ``partials.FIELDS`` layout (``rank_partials``), all-reduced over the group
(``vocab_parallel.all_reduce_partials``) and finalized (``partials.finalize``), in torch ops on (fields, N) tensors.

On sm_90 the operands come in through TMA (host-side tensor descriptors) when their rows are 16-byte aligned;
elsewhere, and under the interpreter, through plain pointer loads.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ..fast_path.chunk_loop import MatrixProducts
from ..fast_path.epilogues import triton_epilogue
from ..fast_path.epilogues.contract import RowStatistics
from ..partials import FIELDS, finalize, max_fields, merge
from ..vocab_parallel import VocabShard, all_reduce_partials
from .head_chunks import ChunkedHead, HeadStatistics
from ._triton_utils import KernelConfigs, LaunchConfig, grown, initial_pair_state, last_dim_contiguous
from ._triton_utils import launch_config, logit_dot_precision, multiprocessors, store_statistics

PARTIAL_FIELDS = {False: 3, True: 7}  # (m, s, t), then (m~, s~, t~, u) for pairs
TOKEN_LOGIT_FIELDS = [FIELDS.index("token_logit"), FIELDS.index("token_logit_masked")]  # in partials.FIELDS

# Not measured on hardware yet (no GPU when they were set). Each compiles for its class within the shared memory
# limit and without register spills (tests/test_triton_compile.py). A CTA's tile is two row groups of BLOCK_N rows
# by BLOCK_V columns: with BLOCK_V = 256 on sm_90 the two float32 accumulators hold 128 registers per thread and
# the statistics epilogue pushes the kernel past 255 registers (8 to 120 bytes spilled, Triton 3.9), so the tile
# is 2 x 64 x 128. Operands whose rows are not 16-byte aligned (or a vocabulary that is not a multiple of 16) load
# and store element by element, which needs more registers: a 2 x 64 x 64 tile then. float32 inputs multiply
# exactly ("ieee": FMA, not tensor cores), through pointer loads (TMA loads into that path spill hundreds of bytes).
_HALF_UNALIGNED = LaunchConfig(dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, GROUP_N=16, USE_TMA=False), 8, 3)
# sm_8x: 73728 bytes of shared memory, within the 99 KiB of sm_86 and sm_89 as well as sm_80's 163 KiB
_HALF_SM80 = LaunchConfig(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, GROUP_N=16, USE_TMA=False), 8, 3)
_FLOAT32 = LaunchConfig(dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=32, GROUP_N=16, USE_TMA=False), 8, 2)
_INTERPRETER = LaunchConfig(dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, GROUP_N=2, USE_TMA=False), 1, 1)
PARTIALS_CONFIGS = {
    "half": KernelConfigs(
        {9: LaunchConfig(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, GROUP_N=16, USE_TMA=True), 8, 4), 8: _HALF_SM80},
        fallback=_HALF_UNALIGNED, interpreter=_INTERPRETER),
    "half_unaligned": KernelConfigs({}, fallback=_HALF_UNALIGNED, interpreter=_INTERPRETER),
    "float32": KernelConfigs({}, fallback=_FLOAT32, interpreter=_INTERPRETER),
}
FINALIZE_CONFIGS = KernelConfigs(
    {}, fallback=LaunchConfig(dict(BLOCK_N=32, BLOCK_T=16), 4, 1),
    interpreter=LaunchConfig(dict(BLOCK_N=8, BLOCK_T=4), 1, 1))


@triton.jit
def _tile_products(
    # the two row operands and the weight: pointers, or tensor descriptors when USE_TMA
    first, second, weight,
    # the first row of each row group and the tile's first column; row and column indices and their masks
    first_start, second_start, col_start, first_rows, second_rows, cols, first_ok, second_ok, col_ok,
    # sizes and strides
    dim, stride_first, stride_second, stride_weight,
    # constexpr flags
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Two (BLOCK_N, BLOCK_V) float32 tiles of rows @ W^T that share each weight tile.

    Out-of-range rows and columns come out 0 (the pointer loads mask them, TMA fills them with zeros)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_second = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        if USE_TMA:
            w = weight.load([col_start, d_start])
            h = first.load([first_start, d_start])
            h_second = second.load([second_start, d_start])
        else:
            ds = d_start + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            w = tl.load(weight + cols[:, None] * stride_weight + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            h = tl.load(first + first_rows[:, None] * stride_first + ds[None, :],
                        mask=first_ok[:, None] & d_ok[None, :], other=0.0)
            h_second = tl.load(second + second_rows[:, None] * stride_second + ds[None, :],
                               mask=second_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        acc_second = tl.dot(h_second, tl.trans(w), acc_second, input_precision=DOT_PRECISION)
    return acc, acc_second


@triton.jit
def _scaled(acc, bias_ptr, cols, col_ok, shift_ptr, slots, slot_ok, temperature):
    """z = (acc + b) / tau - c, with c the rows' shifts (at ``slots`` of the shift array)."""
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature - tl.load(shift_ptr + slots, mask=slot_ok, other=0.0)[:, None]


@triton.jit
def _tile_tokens(tokens_ptr, rows, row_ok, col_start, vocab_size, BLOCK_V: tl.constexpr):
    """Which rows' token ids fall in the tile's columns, and the (BLOCK_N, BLOCK_V) mask of those columns
    (ids outside [0, V) fall in none)."""
    token_col = tl.load(tokens_ptr + rows, mask=row_ok, other=-1) - col_start
    in_tile = row_ok & (token_col >= 0) & (token_col < tl.minimum(BLOCK_V, vocab_size - col_start))
    return in_tile, tl.arange(0, BLOCK_V)[None, :] == tl.where(in_tile, token_col, -1)[:, None]


@triton.jit
def _shifted_exps(z, col_ok):
    """m = max z over the tile's columns, z - m and exp(z - m) (both 0 on columns past V)."""
    running_max = tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1)
    shifted = tl.where(col_ok[None, :], z - running_max[:, None], 0.0)
    return running_max, shifted, tl.where(col_ok[None, :], tl.exp(shifted), 0.0)


@triton.jit
def _tile_partials(z, z_second, is_token, is_token_second, col_ok):
    """Partials of a tile's two row groups: per row of each, z_y (0 where the token is elsewhere), m,
    s = sum exp(z - m) and t = sum exp(z - m)(z - m); and u = sum exp(z - m)(z~ - m~) across the groups (the KL's
    cross term when they are the clean and masked rows of the same tokens)."""
    token_logit = tl.sum(tl.where(is_token, z, 0.0), axis=1)
    token_logit_second = tl.sum(tl.where(is_token_second, z_second, 0.0), axis=1)
    running_max_second, shifted_second, exps_second = _shifted_exps(z_second, col_ok)
    running_max, shifted, exps = _shifted_exps(z, col_ok)
    return (token_logit, running_max, tl.sum(exps, axis=1), tl.sum(exps * shifted, axis=1),
            token_logit_second, running_max_second, tl.sum(exps_second, axis=1),
            tl.sum(exps_second * shifted_second, axis=1), tl.sum(exps * shifted_second, axis=1))


@triton.jit
def _store_pass_partials(out, rows, row_ok, field_stride, running_max, exp_sum, shifted_sum):
    tl.store(out + rows, running_max, mask=row_ok)
    tl.store(out + field_stride + rows, exp_sum, mask=row_ok)
    tl.store(out + 2 * field_stride + rows, shifted_sum, mask=row_ok)


@triton.jit
def _logit_partials_kernel(
    # inputs: row operands of each pass and the weight (pointers, or tensor descriptors when USE_TMA), bias (V,),
    # ids, per-row shifts c (passes, N). A missing bias or shift comes as zeros: a load per tile rather than more
    # variants of the kernel to compile.
    hidden, hidden_masked, weight, bias_ptr, tokens_ptr, shift_ptr,
    # outputs: partials (FIELDS, vocabulary tiles, N), token logits (passes, N), logits z (passes * N, V)
    partials_ptr, token_logits_ptr, logits_ptr,
    # sizes
    n_tokens, vocab_size, dim,
    # strides (field_stride = vocabulary tiles x N: between two fields of the partials)
    stride_hidden, stride_hidden_masked, stride_weight, stride_logits, field_stride,
    # runtime scalars
    temperature,
    # constexpr flags
    PAIRED: tl.constexpr, STORE_LOGITS: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # block sizes and the order of the tiles (GROUP_N token tiles sweep the vocabulary side by side)
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # A tile holds two row groups of BLOCK_N rows that share each weight tile: the clean and the masked rows of
    # BLOCK_N tokens when PAIRED, else 2 BLOCK_N tokens (two accumulators need fewer registers in the epilogue
    # than one of twice the rows).
    TILE_TOKENS: tl.constexpr = BLOCK_N if PAIRED else 2 * BLOCK_N
    token_tiles = tl.cdiv(n_tokens, TILE_TOKENS)
    vocab_tiles = tl.cdiv(vocab_size, BLOCK_V)
    tiles_per_group = GROUP_N * vocab_tiles
    for tile in tl.range(tl.program_id(0), token_tiles * vocab_tiles, tl.num_programs(0), flatten=True):
        # grouped order: programs running at once share GROUP_N token tiles and a few weight tiles in L2
        group_start = (tile // tiles_per_group) * GROUP_N
        group_size = tl.minimum(token_tiles - group_start, GROUP_N)
        token_tile = group_start + (tile % tiles_per_group) % group_size
        vocab_tile = (tile % tiles_per_group) // group_size
        first_start = token_tile * TILE_TOKENS
        second_start = first_start if PAIRED else first_start + BLOCK_N
        col_start = vocab_tile * BLOCK_V
        rows = first_start.to(tl.int64) + tl.arange(0, BLOCK_N)
        second_rows = second_start.to(tl.int64) + tl.arange(0, BLOCK_N)
        cols = col_start + tl.arange(0, BLOCK_V)  # int32: V < 2^31
        row_ok = rows < n_tokens
        second_ok = second_rows < n_tokens
        col_ok = tl.arange(0, BLOCK_V) < vocab_size - col_start

        # when not PAIRED the launcher passes the hidden states as both operands
        acc, acc_second = _tile_products(
            hidden, hidden_masked, weight, first_start, second_start, col_start, rows, second_rows, cols,
            row_ok, second_ok, col_ok, dim, stride_hidden, stride_hidden_masked, stride_weight,
            USE_TMA, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        # where the second group's rows go in the (passes * N) arrays: after the N clean rows when PAIRED
        second_slots = second_rows + n_tokens if PAIRED else second_rows
        z = _scaled(acc, bias_ptr, cols, col_ok, shift_ptr, rows, row_ok, temperature)
        z_second = _scaled(acc_second, bias_ptr, cols, col_ok, shift_ptr, second_slots, second_ok, temperature)
        if STORE_LOGITS:
            tl.store(logits_ptr + rows[:, None] * stride_logits + cols[None, :], z,
                     mask=row_ok[:, None] & col_ok[None, :])
            tl.store(logits_ptr + second_slots[:, None] * stride_logits + cols[None, :], z_second,
                     mask=second_ok[:, None] & col_ok[None, :])

        # per (token, vocabulary tile): partials[field, vocab_tile, row]; the token's logit by the tile that holds it
        out = partials_ptr + vocab_tile.to(tl.int64) * n_tokens
        in_tile, is_token = _tile_tokens(tokens_ptr, rows, row_ok, col_start, vocab_size, BLOCK_V)
        second_in_tile, is_token_second = in_tile, is_token
        if not PAIRED:
            second_in_tile, is_token_second = _tile_tokens(tokens_ptr, second_rows, second_ok, col_start, vocab_size,
                                                           BLOCK_V)
        (token_logit, running_max, exp_sum, shifted_sum, token_logit_second, running_max_second, exp_sum_second,
         shifted_sum_second, cross_sum) = _tile_partials(z, z_second, is_token, is_token_second, col_ok)
        _store_pass_partials(out, rows, row_ok, field_stride, running_max, exp_sum, shifted_sum)
        tl.store(token_logits_ptr + rows, token_logit, mask=in_tile)
        if PAIRED:
            _store_pass_partials(out + 3 * field_stride, rows, row_ok, field_stride, running_max_second,
                                 exp_sum_second, shifted_sum_second)
            tl.store(out + 6 * field_stride + rows, cross_sum, mask=row_ok)
            tl.store(token_logits_ptr + second_slots, token_logit_second, mask=in_tile)
        else:  # the cross sum of two tokens' rows means nothing and is dropped
            _store_pass_partials(out, second_rows, second_ok, field_stride, running_max_second, exp_sum_second,
                                 shifted_sum_second)
            tl.store(token_logits_ptr + second_slots, token_logit_second, mask=second_in_tile)


@triton.jit
def _fold(running_max, exp_sum, shifted_sum, tile_max, tile_sum, tile_shifted, tile_ok):
    """Merges a (BLOCK_N, BLOCK_T) block of one pass's partials into the running state (m, s, t); ``tile_ok``
    (1, BLOCK_T) says which tiles exist.

    With M = max(m, max_k m_k), a = exp(m - M) and b_k = exp(m_k - M):
    s' = a s + sum_k b_k s_k and t' = a (t + (m - M) s) + sum_k b_k (t_k + (m_k - M) s_k).
    Returns the new state, the weights b_k (0 outside the block), a and m - M."""
    new_max = tl.maximum(running_max, tl.max(tl.where(tile_ok, tile_max, float("-inf")), axis=1))
    max_shift = running_max - new_max
    alpha = tl.exp(max_shift)
    tile_shift = tl.where(tile_ok, tile_max - new_max[:, None], 0.0)
    weights = tl.where(tile_ok, tl.exp(tile_shift), 0.0)
    new_shifted_sum = alpha * grown(shifted_sum, max_shift, exp_sum) + tl.sum(
        weights * (tile_shifted + tile_shift * tile_sum), axis=1)
    new_exp_sum = alpha * exp_sum + tl.sum(weights * tile_sum, axis=1)
    return new_max, new_exp_sum, new_shifted_sum, weights, alpha, tile_shift, max_shift


@triton.jit
def _finalize_kernel(
    # inputs: partials (FIELDS, vocabulary tiles, N), token logits (passes, N)
    partials_ptr, token_logits_ptr,
    # outputs, each (N,) float32, and the row maxima m (passes, N)
    logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr, kl_ptr, maxima_ptr,
    # sizes
    n_tokens, vocab_tiles,
    # strides
    field_stride,
    # constexpr flags
    PAIRED: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    (_, running_max, exp_sum, shifted_sum, _, running_max_masked, exp_sum_masked, shifted_sum_masked,
     cross_sum) = initial_pair_state(BLOCK_N)
    for tile_start in range(0, vocab_tiles, BLOCK_T):
        tiles = tile_start + tl.arange(0, BLOCK_T).to(tl.int64)
        tile_ok = (tiles < vocab_tiles)[None, :]
        # rows past N read m = 0, s = 1: finite statistics that are never stored
        load_ok = row_ok[:, None] & tile_ok
        at = partials_ptr + tiles[None, :] * n_tokens + rows[:, None]
        tile_max = tl.load(at, mask=load_ok, other=0.0)
        tile_sum = tl.load(at + field_stride, mask=load_ok, other=1.0)
        tile_shifted = tl.load(at + 2 * field_stride, mask=load_ok, other=0.0)
        exp_sum_before = exp_sum
        running_max, exp_sum, shifted_sum, weights, alpha, _, _ = _fold(
            running_max, exp_sum, shifted_sum, tile_max, tile_sum, tile_shifted, tile_ok)
        if PAIRED:
            tile_max_masked = tl.load(at + 3 * field_stride, mask=load_ok, other=0.0)
            tile_sum_masked = tl.load(at + 4 * field_stride, mask=load_ok, other=1.0)
            tile_shifted_masked = tl.load(at + 5 * field_stride, mask=load_ok, other=0.0)
            tile_cross = tl.load(at + 6 * field_stride, mask=load_ok, other=0.0)
            running_max_masked, exp_sum_masked, shifted_sum_masked, _, _, tile_shift_masked, max_shift_masked = \
                _fold(running_max_masked, exp_sum_masked, shifted_sum_masked, tile_max_masked, tile_sum_masked,
                      tile_shifted_masked, tile_ok)
            # u' = a (u + (m~ - M~) s) + sum_k b_k (u_k + (m~_k - M~) s_k), with the clean pass's weights a, b_k
            cross_sum = alpha * grown(cross_sum, max_shift_masked, exp_sum_before) + tl.sum(
                weights * (tile_cross + tile_shift_masked * tile_sum), axis=1)
    token_logit = tl.load(token_logits_ptr + rows, mask=row_ok, other=0.0)
    tl.store(maxima_ptr + rows, running_max, mask=row_ok)
    token_logit_masked = token_logit
    if PAIRED:
        token_logit_masked = tl.load(token_logits_ptr + n_tokens + rows, mask=row_ok, other=0.0)
        tl.store(maxima_ptr + n_tokens + rows, running_max_masked, mask=row_ok)
    store_statistics(logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr,
                     kl_ptr, rows, row_ok, token_logit, running_max, exp_sum, shifted_sum, token_logit_masked,
                     running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum, PAIRED)


class Partials(NamedTuple):
    """What ``logit_partials`` leaves for ``finalize_statistics``: float32 (FIELDS, vocabulary tiles, N) partials
    and (passes, N) token logits."""

    partials: Tensor
    token_logits: Tensor


def _operand(tensor: Tensor, block_shape, use_tma: bool):
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), block_shape) if use_tma else tensor


def _aligned_rows(*tensors: Optional[Tensor]) -> bool:
    """Whether these (R, C) operands have 16-byte aligned starts and row strides (TMA can load them; pointer
    loads and stores go 16 bytes at a time)."""
    return all(t is None or (t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)
               for t in tensors)


def _partials_configs(dtype: torch.dtype, aligned: bool) -> KernelConfigs:
    if dtype == torch.float32:
        return PARTIALS_CONFIGS["float32"]
    return PARTIALS_CONFIGS["half" if aligned else "half_unaligned"]


def logit_partials(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   tokens: Tensor, temperature: float, logits: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None) -> Partials:
    """Launch the GEMM for z = (h W^T + b) / tau - c. hidden and hidden_masked (None for one pass): (N, D) in the
    weight's dtype; weight (V, D); tokens (N,) int64.

    ``shift``: None (c = 0), or per-row shifts c, float32 (passes, N), the statistics then being those of the
    shifted z (the same l, H and KL; lse - c). ``logits``: None, or a float32 (passes * N, V) buffer with unit
    column stride that gets z (clean rows first) besides the partials."""
    paired = hidden_masked is not None
    passes = 2 if paired else 1
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    hidden_masked = last_dim_contiguous(hidden_masked) if paired else hidden
    (n, dim), vocab_size = hidden.shape, weight.shape[0]
    assert tokens.dtype == torch.int64 and tokens.shape == (n,) and weight.dtype == hidden.dtype
    assert logits is None or (logits.dtype == torch.float32 and logits.stride(1) == 1
                              and logits.shape == (passes * n, vocab_size))
    assert shift is None or (shift.dtype == torch.float32 and shift.shape == (passes, n) and shift.is_contiguous())
    aligned = _aligned_rows(hidden, hidden_masked, weight, logits) and vocab_size % 16 == 0
    config = launch_config(_partials_configs(hidden.dtype, aligned), hidden.device)
    blocks = dict(config.blocks)
    vocab_tiles = triton.cdiv(vocab_size, blocks["BLOCK_V"])
    partials = torch.empty((PARTIAL_FIELDS[paired], vocab_tiles, n), dtype=torch.float32, device=hidden.device)
    token_logits = torch.zeros((passes, n), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return Partials(partials, token_logits)
    row_block, weight_block = [blocks["BLOCK_N"], blocks["BLOCK_D"]], [blocks["BLOCK_V"], blocks["BLOCK_D"]]
    tiles = triton.cdiv(n, blocks["BLOCK_N"] * (1 if paired else 2)) * vocab_tiles
    if shift is None:
        shift = torch.zeros((passes, n), dtype=torch.float32, device=hidden.device)
    if bias is None:
        bias = torch.zeros(vocab_size, dtype=weight.dtype, device=weight.device)
    _logit_partials_kernel[(min(tiles, multiprocessors(hidden.device)),)](
        _operand(hidden, row_block, blocks["USE_TMA"]), _operand(hidden_masked, row_block, blocks["USE_TMA"]),
        _operand(weight, weight_block, blocks["USE_TMA"]), bias, tokens.contiguous(),
        shift,
        partials, token_logits, partials if logits is None else logits,
        n, vocab_size, dim,
        hidden.stride(0), hidden_masked.stride(0), weight.stride(0), 0 if logits is None else logits.stride(0),
        partials.stride(0),
        temperature,
        PAIRED=paired, STORE_LOGITS=logits is not None,
        DOT_PRECISION=logit_dot_precision(hidden.dtype),
        **blocks, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return Partials(partials, token_logits)


def finalize_statistics(partials: Partials, paired: bool) -> HeadStatistics:
    """Per-token (l, H, lse) and, when paired, (l~, H~, lse~, KL) from the partials, with the row maxima."""
    fields, vocab_tiles, n = partials.partials.shape
    assert fields == PARTIAL_FIELDS[paired]
    device = partials.partials.device
    outputs = torch.empty((7 if paired else 3, n), dtype=torch.float32, device=device)
    maxima = torch.empty(((2 if paired else 1), n), dtype=torch.float32, device=device)
    if n > 0:
        config = launch_config(FINALIZE_CONFIGS, device)
        padded = tuple(outputs) if paired else (*outputs, *([outputs[0]] * 4))
        _finalize_kernel[(triton.cdiv(n, config.blocks["BLOCK_N"]),)](
            partials.partials, partials.token_logits, *padded, maxima,
            n, vocab_tiles,
            partials.partials.stride(0),
            PAIRED=paired,
            **config.launch_kwargs(),
        )
    # kernel order (l, H, lse, l~, H~, lse~, KL) is RowStatistics' order
    return HeadStatistics(RowStatistics(*outputs), maxima)


def rank_partials(partials: Partials, paired: bool) -> Tensor:
    """The per-tile partials of ``logit_partials`` merged over the vocabulary tiles into one (fields, N) tensor in
    ``partials.FIELDS`` layout: (m, s, t, z_y) per pass, and for pairs the difference sum
    w = sum e^(z - m)(z - z~) = t - u + (m - m~) s in place of the cross sum u. Of z - c where the GEMM had a shift
    c: the maxima and z_y shifted by it, w by c - c~ times s; the KL that ``finalize`` forms is the same."""
    tiles = partials.partials
    no_token = torch.zeros_like(tiles[0])  # each tile's z_y: the token logits go in after the merge
    if paired:
        running_max, exp_sum, shifted_sum, running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum = tiles
        difference_sum = shifted_sum - cross_sum + (running_max - running_max_masked) * exp_sum
        fields = [running_max, exp_sum, shifted_sum, no_token,
                  running_max_masked, exp_sum_masked, shifted_sum_masked, no_token, difference_sum]
    else:
        fields = [*tiles, no_token]
    merged = merge(torch.stack(fields), dim=1)
    merged[TOKEN_LOGIT_FIELDS[:len(partials.token_logits)]] = partials.token_logits
    return merged


def sharded_statistics(partials: Partials, paired: bool, shard: VocabShard) -> HeadStatistics:
    """``finalize_statistics`` over a vocabulary-parallel head: the rank's partials (``rank_partials``) all-reduced
    over the group and finalized, the same statistics on every rank, with the whole vocabulary's row maxima."""
    merged = all_reduce_partials(rank_partials(partials, paired), shard)
    return HeadStatistics(RowStatistics(*finalize(merged, paired)), merged[max_fields(paired)])


def head_statistics(hidden: Tensor, hidden_masked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                    tokens: Tensor, temperature: float, logits: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None) -> HeadStatistics:
    """Both steps (``logit_partials``'s arguments): the statistics of one pass (``hidden_masked`` None) or a pair."""
    partials = logit_partials(hidden, hidden_masked, weight, bias, tokens, temperature, logits, shift)
    return finalize_statistics(partials, hidden_masked is not None)


def partials_bytes_per_token(vocab_size: int, paired: bool, dtype: torch.dtype) -> int:
    """Bytes of partials and token logits per token, at the narrowest vocabulary tile of the CUDA configs."""
    configs = [_partials_configs(dtype, aligned) for aligned in (True, False)]
    block_v = min(c.blocks["BLOCK_V"] for table in configs for c in (*table.by_capability.values(), table.fallback))
    return 4 * (PARTIAL_FIELDS[paired] * triton.cdiv(vocab_size, block_v) + (2 if paired else 1))


def chunk_statistics(rows: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, temperature: float,
                     paired: bool, out: Optional[Tensor] = None) -> RowStatistics:
    """The fast path's logits product and statistics sweep in one kernel, for one chunk of C tokens.

    rows: the chunk's (passes * C, D) rows in the weight's dtype, clean rows first (``[h; h~]``); tokens (C,) int64;
    out: None (statistics only: the logits stay on chip), or a float32 (passes * C, V) buffer with unit column
    stride. Returns the chunk's ``RowStatistics`` (float32), and leaves in ``out`` z = (rows W^T + b) / tau: the
    bias and the temperature already applied, so the gradient sweep takes it as
    ``logit_gradient(out, tokens, None, 1.0, stats, upstream scaled by 1 / tau, dz)``, which gives the gradient
    with respect to rows W^T."""
    count = tokens.shape[0]
    assert rows.shape[0] == (2 if paired else 1) * count
    return head_statistics(rows[:count], rows[count:] if paired else None, weight, bias, tokens, temperature,
                           out).stats


def _head_chunk_statistics(weight: Tensor, products: MatrixProducts, hidden_rows: Tensor,
                           hidden_masked_rows: Optional[Tensor], tokens: Tensor, bias: Optional[Tensor],
                           temperature: float, logits: Optional[Tensor], shift: Optional[Tensor],
                           shard: Optional[VocabShard]) -> HeadStatistics:
    if shard is None:
        return head_statistics(hidden_rows, hidden_masked_rows, weight, bias, tokens, temperature, logits, shift)
    partials = logit_partials(hidden_rows, hidden_masked_rows, weight, bias, tokens, temperature, logits, shift)
    return sharded_statistics(partials, hidden_masked_rows is not None, shard)


def _forward_bytes_per_token(vocab_size: int, dim: int, paired: bool, dtype: torch.dtype) -> int:
    """The forward's workspace per token: its partials."""
    return partials_bytes_per_token(vocab_size, paired, dtype)


# The per-token ops' head on Triton: the statistics by the GEMM above, dZ by the fast path's Triton epilogue. The
# backward shifts each row by its maximum m from the forward: the stored z - m is exact near the maximum and
# lse - m = log s is small, so that log p = (z - m) - log s keeps float32's precision where p is large (z - lse at
# |z| ~ 10 would lose 4 bits there, in dz and every gradient). Over a vocabulary-parallel head m is the whole
# vocabulary's maximum, the same on every rank.
TRITON_HEAD = ChunkedHead("triton", _head_chunk_statistics, triton_epilogue, _forward_bytes_per_token,
                          forward_needs_logits=False, scaled_logits=True)
