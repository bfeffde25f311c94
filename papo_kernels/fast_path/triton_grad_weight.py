"""dW (+)= alpha dZ^T R in one persistent Triton GEMM that adds its tiles into the float32 accumulator by TMA reduce-add.

The chunk loop's weight-gradient product: dZ (K, V) and the chunk's stacked rows R = [h; h~]
(K, D) in the inputs' half dtype, K = 2C rows, into the float32 (V, D) accumulator. ``addmm``
reads and writes the accumulator (4 V D bytes each way) in a read-modify-write that is not
hidden behind its arithmetic; here each output tile, once its K loop is done, is sent to the
accumulator with one TMA reduce-add (``tensor_descriptor.atomic_add``, PTX
``cp.reduce.async.bulk.tensor ... .add.f32``), which the copy engine carries out while the
program goes on with its next tile.

- Persistent: one program per SM loops over the output tiles (grouped order, so that GROUP_M
  tiles of V share the rows' column tiles in L2), the nested loops flattened so that the next
  tile's loads are issued while the current one finishes.
- Deterministic: each output tile is computed by one program and added once per launch, and the
  launches of successive chunks are ordered on the stream, so the float32 sums happen in the
  same order on every run.
- ``accumulate=False`` stores instead of adding (the first chunk that has a gradient: the
  accumulator needs no zero fill).
- ``alpha`` scales the tile before it is added (the inverse of the chunk loop's float16 dZ scale).

Two variants, chosen by the config's ``tma`` flag: TMA descriptors for the operands and the
reduce-add (sm_90), and a plain-pointer fallback that loads, adds and stores the accumulator
tile in the same program. The fallback runs under ``TRITON_INTERPRET=1`` (Triton's interpreter
has no descriptor reduce) and compiles for sm_80, where it saves nothing over ``addmm``, so the
chunk loop never picks it on a GPU (``grad_weight.py``).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backends._triton_utils import KernelConfigs, launch_config, multiprocessors


@dataclass(frozen=True)
class GradWeightConfig:
    block_m: int  # rows of the accumulator (vocabulary) per tile
    block_n: int  # columns of the accumulator (hidden size) per tile
    block_k: int  # chunk rows per step
    group_m: int  # tiles of V that sweep the same columns of D together
    num_warps: int
    num_stages: int
    tma: bool  # TMA loads and reduce-add (sm_90), else the pointer fallback
    programs: int  # programs of the persistent grid at most (0: _triton_utils.multiprocessors)


# sm_90: 128 x 128 x 64 tiles, 4 stages of 32 KiB of operands + 64 KiB for the float32 tile the
# reduce-add sends: 192 KiB of the 227 KiB. Two warpgroups, 64 accumulator registers a thread.
# sm_80 (no TMA): the pointer fallback, 3 stages of 16 KiB. Neither measured on hardware yet.
SM90_CONFIG = GradWeightConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4,
                               tma=True, programs=0)
SM80_CONFIG = GradWeightConfig(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3,
                               tma=False, programs=0)
# The interpreter runs programs one by one: tiny tiles (tl.dot needs >= 16), and fewer programs than
# tiles at test shapes so that the persistent loop runs several tiles per program.
INTERPRETER_CONFIG = GradWeightConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1,
                                      tma=False, programs=3)


# Compute capability 9 and later take the TMA config (the chunk loop launches the kernel only there, grad_weight.py).
CONFIGS = KernelConfigs({8: SM80_CONFIG}, fallback=SM90_CONFIG, interpreter=INTERPRETER_CONFIG)


@triton.jit
def _tile_start(tile, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(first row, first column) of output tile ``tile``, tiles numbered down groups of GROUP_M tile rows."""
    tiles_per_group = GROUP_M * num_n_tiles
    first_m = tile // tiles_per_group * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
    tile_m = first_m + tile % tiles_per_group % group_rows
    tile_n = tile % tiles_per_group // group_rows
    return tile_m * BLOCK_M, tile_n * BLOCK_N


@triton.jit
def _grad_weight_kernel(
    # operands: dZ (K, V) and the rows (K, D), then the float32 (V, D) accumulator: TMA descriptors when TMA,
    # else pointers
    dz, rows, grad_weight,
    # sizes: V, D, K
    vocab_size, dim, k_rows,
    # strides of the pointer fallback (a row of each)
    stride_dz, stride_rows, stride_grad_weight,
    # runtime scalars
    alpha,
    # constexpr flags
    TMA: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m_tiles = tl.cdiv(vocab_size, BLOCK_M)
    num_n_tiles = tl.cdiv(dim, BLOCK_N)
    k_steps = tl.cdiv(k_rows, BLOCK_K)
    programs = tl.num_programs(0)
    # The epilogue counts its own tiles (as Triton's persistent tutorial does): with the loops flattened, a value
    # used both where a tile starts and where it ends would tie the software pipeline's stages together.
    epilogue_tile = tl.program_id(0) - programs
    for tile in tl.range(tl.program_id(0), num_m_tiles * num_n_tiles, programs, flatten=True):
        m_start, n_start = _tile_start(tile, num_m_tiles, num_n_tiles, GROUP_M, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(k_steps):
            k_start = k_step * BLOCK_K
            if TMA:  # rows beyond K, V or D come as zeros
                dz_tile = dz.load([k_start, m_start])
                rows_tile = rows.load([k_start, n_start])
            else:
                ks = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
                ms = m_start + tl.arange(0, BLOCK_M)
                ns = n_start + tl.arange(0, BLOCK_N)
                dz_tile = tl.load(dz + ks[:, None] * stride_dz + ms[None, :],
                                  mask=(ks < k_rows)[:, None] & (ms < vocab_size)[None, :], other=0.0)
                rows_tile = tl.load(rows + ks[:, None] * stride_rows + ns[None, :],
                                    mask=(ks < k_rows)[:, None] & (ns < dim)[None, :], other=0.0)
            # the (BLOCK_K, BLOCK_M) tile of dZ is the (BLOCK_M, BLOCK_K) tile of dZ^T
            acc = tl.dot(tl.trans(dz_tile), rows_tile, acc, input_precision=DOT_PRECISION)
        acc = acc * alpha
        epilogue_tile += programs
        m_start, n_start = _tile_start(epilogue_tile, num_m_tiles, num_n_tiles, GROUP_M, BLOCK_M, BLOCK_N)
        if TMA:  # out-of-range parts of edge tiles are dropped by the TMA unit
            if ACCUMULATE:
                grad_weight.atomic_add([m_start, n_start], acc)
            else:
                grad_weight.store([m_start, n_start], acc)
        else:
            ms = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
            ns = n_start + tl.arange(0, BLOCK_N)
            out = grad_weight + ms[:, None] * stride_grad_weight + ns[None, :]
            out_ok = (ms < vocab_size)[:, None] & (ns < dim)[None, :]
            if ACCUMULATE:
                acc += tl.load(out, mask=out_ok, other=0.0)
            tl.store(out, acc, mask=out_ok)


def accumulate_grad_weight(grad_weight: Tensor, dz: Tensor, rows: Tensor, alpha: float = 1.0,
                           accumulate: bool = True) -> None:
    """``grad_weight (+)= alpha * dz^T @ rows``: dz (K, V) and rows (K, D) of one dtype, grad_weight (V, D) float32;
    ``accumulate=False`` overwrites grad_weight."""
    k_rows, vocab_size = dz.shape
    dim = rows.shape[1]
    assert k_rows > 0 and rows.shape[0] == k_rows and grad_weight.shape == (vocab_size, dim)
    assert dz.dtype == rows.dtype and grad_weight.dtype == torch.float32
    assert dz.stride(1) == 1 and rows.stride(1) == 1 and grad_weight.stride(1) == 1
    config = launch_config(CONFIGS, grad_weight.device)
    if config.tma:
        operands = (TensorDescriptor.from_tensor(dz, [config.block_k, config.block_m]),
                    TensorDescriptor.from_tensor(rows, [config.block_k, config.block_n]),
                    TensorDescriptor.from_tensor(grad_weight, [config.block_m, config.block_n]))
    else:
        operands = (dz, rows, grad_weight)
    tiles = triton.cdiv(vocab_size, config.block_m) * triton.cdiv(dim, config.block_n)
    programs = config.programs or multiprocessors(grad_weight.device)
    _grad_weight_kernel[(min(programs, tiles),)](
        *operands,
        vocab_size, dim, k_rows,
        dz.stride(0), rows.stride(0), grad_weight.stride(0),
        alpha,
        TMA=config.tma, ACCUMULATE=accumulate, DOT_PRECISION="ieee" if dz.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
