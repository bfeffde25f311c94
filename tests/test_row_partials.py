"""Every epilogue over blocks of a chunk's columns, as the ranks of a vocabulary-parallel head hold them.

Each block gets the tokens' ids local to it, ``NOT_HERE`` (-1) where another block holds the token; its
``row_partials`` merged over the blocks (``partials.merge``, what the ranks' all-reduce computes) and
finalized give the statistics of the whole chunk, and each block's ``logit_gradient`` from those
statistics gives the whole chunk's dz on its columns (the e_y term only in the block that holds the
token). Blocks of different sizes; tokens at the first and last id of every block.
"""

import pytest
import torch

from papo_kernels import partials
from papo_kernels.fast_path.epilogues import resolve_epilogue, torch_epilogue
from papo_kernels.fast_path.epilogues.contract import NOT_HERE, RowStatistics, UpstreamGradients

from backend_cases import assert_close, assert_within_budget, triton_device
from test_epilogues import GRADIENT_SUBSETS, make_chunk, run_epilogue

N, V = 9, 203
BLOCKS = ((0, 70), (70, 134), (134, 203))
# (device, dtype, upstream gradient subsets): the Triton epilogue computes in float32, and under the interpreter
# two subsets keep it quick (the clean e_y term alone, then every term of both passes).
EPILOGUES = {"torch": (lambda: torch.device("cpu"), torch.float64, GRADIENT_SUBSETS),
             "native": (lambda: torch.device("cpu"), torch.float64, GRADIENT_SUBSETS),
             "triton": (triton_device, torch.float32, [("logprobs",), UpstreamGradients._fields])}


def chunk_with_edge_tokens(paired: bool, dtype: torch.dtype):
    logits, tokens, bias, grads = make_chunk(N, V, paired, True, seed=3, dtype=dtype)
    tokens[:6] = torch.tensor([edge for block in BLOCKS for edge in (block[0], block[1] - 1)])
    return logits, tokens, bias, grads


def local_ids(tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return torch.where((tokens >= start) & (tokens < stop), tokens - start, NOT_HERE)


def by_blocks(epilogue, logits, tokens, bias, temperature, paired, grads, present):
    """Statistics from the blocks' merged partials, and dz put together from the blocks' gradient sweeps."""
    states = [logits[:, start:stop].clone() for start, stop in BLOCKS]
    block_partials = [epilogue.row_partials(state, local_ids(tokens, start, stop), bias[start:stop], temperature,
                                            paired) for state, (start, stop) in zip(states, BLOCKS)]
    merged = partials.merge(torch.stack(block_partials, dim=1), dim=1)
    stats = RowStatistics(*partials.finalize(merged, paired))
    upstream = UpstreamGradients(*(grads[name] if name in present and (paired or not name.endswith(("masked", "kl")))
                                   else None for name in UpstreamGradients._fields))
    dz = torch.full_like(logits, float("nan"))
    for state, (start, stop) in zip(states, BLOCKS):
        out = torch.empty_like(state)
        epilogue.logit_gradient(state, local_ids(tokens, start, stop), bias[start:stop], temperature, stats,
                                upstream, out)
        dz[:, start:stop] = out
    rows = ([slice(0, N)] if upstream.clean else []) + ([slice(N, 2 * N)] if paired and upstream.masked else [])
    return stats, torch.cat([dz[r] for r in rows]) if rows else None


@pytest.mark.parametrize("name", EPILOGUES)
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "one-pass"])
def test_blocks_of_columns_give_the_whole_chunks_statistics_and_gradient(name, paired):
    device_of, dtype, subsets = EPILOGUES[name]
    device = device_of()
    epilogue = resolve_epilogue(name, device, dtype)
    assert epilogue.NAME == name
    logits, tokens, bias, grads = chunk_with_edge_tokens(paired, dtype)

    def on(device_, dtype_):
        return (logits.to(device_, dtype_), tokens.to(device_), bias.to(device_, dtype_),
                {key: value.to(device_, dtype_) for key, value in grads.items()})

    for present in subsets:
        truth = run_epilogue(torch_epilogue, *on("cpu", torch.float64)[:3], 0.7, paired, grads, present)
        got = by_blocks(epilogue, *on(device, dtype)[:3], 0.7, paired, on(device, dtype)[3], present)
        values = [(f"{stat} with {present}", getattr(got[0], stat), getattr(truth[0], stat))
                  for stat in RowStatistics._fields if getattr(truth[0], stat) is not None]
        if truth[1] is not None:
            values.append((f"dz with {present}", got[1], truth[1]))
        if dtype == torch.float64:
            for label, value, want in values:
                assert_close(label, value, want, rtol=1e-10, atol=1e-12)
            continue
        same_dtype = run_epilogue(torch_epilogue, *on("cpu", dtype)[:3], 0.7, paired, on("cpu", dtype)[3], present)
        same_values = [getattr(same_dtype[0], stat) for stat in RowStatistics._fields
                       if getattr(truth[0], stat) is not None] + ([same_dtype[1]] if truth[1] is not None else [])
        for (label, value, want), same in zip(values, same_values):
            assert_within_budget(label, value.cpu().double(), same.double(), want, factor=4.0, atol=4e-7)


def test_merging_partials_is_exact_in_any_grouping():
    """Merging blocks one by one, or all at once, or in another order gives the same statistics (float64)."""
    logits, tokens, bias, _ = chunk_with_edge_tokens(True, torch.float64)
    block_partials = [torch_epilogue.row_partials(logits[:, start:stop].clone(), local_ids(tokens, start, stop),
                                                  bias[start:stop], 1.0, True) for start, stop in BLOCKS]
    at_once = partials.finalize(partials.merge(torch.stack(block_partials, 1), 1), True)
    first_two = partials.merge(torch.stack(block_partials[:2], 1), 1)
    pairwise = partials.finalize(partials.merge(torch.stack([block_partials[2], first_two], 1), 1), True)
    for name, a, b in zip(RowStatistics._fields, at_once, pairwise):
        assert_close(name, a, b, rtol=1e-12, atol=1e-13)
