"""The statistics GEMM (backends/triton_logit_statistics.py) under the interpreter against the torch epilogue.

The chunk of rows goes through the kernel; the same float32 rows times the weight, in float64, go through the torch
epilogue: the error-budget rule holds the kernel's statistics to 4x the torch epilogue's own float32 error (plus a
few ulps). Shapes are awkward (V not a multiple of any tile, one row, D with a tail and D whose half rows TMA can
load), tokens sit at ids 0 and V - 1, with and without bias, at two temperatures, one pass and pairs, in the
interpreter's config and in the sm_80 and sm_90 configs (forced: the sm_90 one loads half inputs through tensor
descriptors).
"""

import contextlib

import pytest
import torch

from papo_kernels import partials
from papo_kernels.backends import triton_logit_statistics as statistics
from papo_kernels.backends._triton_utils import forced_capability
from papo_kernels.fast_path.epilogues import torch_epilogue
from papo_kernels.fast_path.epilogues.contract import RowStatistics
from papo_kernels.vocab_parallel import VocabShard

from backend_cases import assert_close, assert_within_budget, triton_device

# (tokens, V, D): one row; half rows 16-byte aligned and V a multiple of 16 (the aligned configs: TMA loads on sm_90)
# but not of any vocabulary tile; odd sizes (the unaligned configs), 70 tokens filling more than one 64-row tile
SHAPES = [(1, 50, 24), (37, 208, 40), (70, 150, 17)]
CAPABILITIES = [None, 8, 9]  # the interpreter's config, then the CUDA configs


def make_case(n, v, d, paired, bias, dtype, seed):
    """float64 rows, weight and bias holding values exactly representable in ``dtype``; tokens at 0 and V - 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    rows = torch.cat([hidden, hidden + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)]) if paired else hidden
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.5 / d**0.5)
    bias_vector = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[0], tokens[-1] = 0, v - 1

    def rounded(value):
        return None if value is None else value.to(dtype).double()

    return rounded(rows), rounded(weight), rounded(bias_vector), tokens


def config(capability):
    return contextlib.nullcontext() if capability is None else forced_capability(capability)


def kernel_statistics(rows, weight, bias, tokens, temperature, paired, dtype, capability, store=True):
    device = triton_device()
    out = torch.full((rows.shape[0], weight.shape[0]), float("nan"), device=device) if store else None
    with config(capability):
        stats = statistics.chunk_statistics(rows.to(device, dtype), weight.to(device, dtype),
                                            None if bias is None else bias.to(device, dtype), tokens.to(device),
                                            temperature, paired, out)
    return stats, out


def torch_statistics(rows, weight, bias, tokens, temperature, paired, dtype):
    logits = (rows.to(dtype) @ weight.to(dtype).T) if dtype != torch.float64 else rows @ weight.T
    return torch_epilogue.statistics(logits, tokens, None if bias is None else bias.to(dtype), temperature, paired)


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: "interpreter" if c is None else f"sm{c}0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("paired", [False, True], ids=["one_pass", "paired"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias, temperature", [(False, 1.0), (True, 0.6)], ids=["plain", "bias_tau0.6"])
def test_statistics_match_the_torch_epilogue(capability, dtype, paired, shape, bias, temperature):
    n, v, d = shape
    rows, weight, bias_vector, tokens = make_case(n, v, d, paired, bias, dtype, seed=n + v + d)
    truth = torch_statistics(rows, weight, bias_vector, tokens, temperature, paired, torch.float64)
    same_dtype = torch_statistics(rows, weight, bias_vector, tokens, temperature, paired, torch.float32)
    stats, out = kernel_statistics(rows, weight, bias_vector, tokens, temperature, paired, dtype, capability)
    for name, value in truth._asdict().items():
        if value is not None:
            assert_within_budget(name, getattr(stats, name).cpu().double(), getattr(same_dtype, name).double(),
                                 value, factor=4.0, atol=4e-7)
    # store mode: z = (rows W^T + b) / tau, every entry written
    z = rows @ weight.T
    z = (z if bias_vector is None else z + bias_vector) / temperature
    assert_within_budget("stored logits", out.cpu().double(),
                         ((rows.float() @ weight.float().T + (0 if bias_vector is None else bias_vector.float()))
                          / temperature).double(), z, factor=4.0, atol=4e-7)


def test_the_sm90_config_loads_aligned_half_rows_through_tensor_descriptors(monkeypatch):
    made = []

    class CountedDescriptor(statistics.TensorDescriptor):
        def __post_init__(self):
            super().__post_init__()
            made.append(tuple(self.block_shape))

    monkeypatch.setattr(statistics, "TensorDescriptor", CountedDescriptor)
    rows, weight, bias_vector, tokens = make_case(37, 208, 40, True, True, torch.float16, seed=10)
    kernel_statistics(rows, weight, bias_vector, tokens, 0.8, True, torch.float16, 9)
    assert made == [(64, 64), (64, 64), (128, 64)]  # hidden, hidden_masked, weight: sm_90's blocks
    made.clear()
    kernel_statistics(rows, weight, bias_vector, tokens, 0.8, True, torch.float16, 8)
    assert made == []


def test_statistics_only_and_store_mode_agree():
    """The logits never leave the chip without a buffer; the statistics are the same bits either way."""
    rows, weight, bias_vector, tokens = make_case(37, 203, 40, True, True, torch.float32, seed=7)
    stored, _ = kernel_statistics(rows, weight, bias_vector, tokens, 0.8, True, torch.float32, None)
    on_chip, _ = kernel_statistics(rows, weight, bias_vector, tokens, 0.8, True, torch.float32, None, store=False)
    for name in stored._fields:
        assert torch.equal(getattr(stored, name), getattr(on_chip, name)), name


def test_a_row_shift_leaves_logprobs_entropies_and_kl_and_moves_lse():
    """The backward's shift by the forward's row maxima m: the same l, H, KL, lse - m, and z - m stored."""
    device = triton_device()
    rows, weight, bias_vector, tokens = make_case(37, 203, 40, True, True, torch.float32, seed=8)
    rows, weight, bias_vector = rows.float().to(device), weight.float().to(device), bias_vector.float().to(device)
    count = tokens.shape[0]
    plain = statistics.head_statistics(rows[:count], rows[count:], weight, bias_vector, tokens.to(device), 0.8)
    out = torch.empty(2 * count, weight.shape[0], device=device)
    shifted = statistics.head_statistics(rows[:count], rows[count:], weight, bias_vector, tokens.to(device), 0.8,
                                         out, shift=plain.maxima)
    for name in ("logprobs", "entropy", "logprobs_masked", "entropy_masked", "kl"):
        assert_close(name, getattr(shifted.stats, name).double(), getattr(plain.stats, name).double(), rtol=1e-6,
                     atol=1e-6)
    assert_close("lse - m", shifted.stats.lse.double(), (plain.stats.lse - plain.maxima[0]).double(), rtol=1e-6,
                 atol=1e-6)
    assert torch.equal(shifted.maxima, torch.zeros_like(shifted.maxima))  # the maximum of z - m is 0, exactly
    z = ((rows @ weight.T + bias_vector) / 0.8 - plain.maxima.reshape(-1)[:, None])
    assert_close("stored z - m", out.double(), z.double(), rtol=1e-5, atol=1e-5)


def test_vocabulary_shards_add_up_between_the_two_steps():
    """Partials of two vocabulary shards (ids shifted by each shard's start; ids outside a shard match none),
    gathered along the tiles with their token logits added, finalize to the unsharded statistics: the seam a
    vocabulary-parallel all-reduce uses."""
    device = triton_device()
    rows, weight, bias_vector, tokens = make_case(37, 203, 40, True, True, torch.float32, seed=9)
    rows, weight, bias_vector = rows.float().to(device), weight.float().to(device), bias_vector.float().to(device)
    tokens, count, split = tokens.to(device), tokens.shape[0], 120
    whole = statistics.head_statistics(rows[:count], rows[count:], weight, bias_vector, tokens, 0.8).stats
    shards = [statistics.logit_partials(rows[:count], rows[count:], weight[part], bias_vector[part],
                                        tokens - part.start, 0.8)
              for part in (slice(0, split), slice(split, weight.shape[0]))]
    gathered = statistics.Partials(torch.cat([shard.partials for shard in shards], dim=1),
                                   sum(shard.token_logits for shard in shards))
    sharded = statistics.finalize_statistics(gathered, True).stats
    for name in whole._fields:
        assert_close(name, getattr(sharded, name).double(), getattr(whole, name).double(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("paired", [False, True], ids=["one_pass", "pair"])
def test_rank_partials_merged_over_the_ranks_finalize_to_the_whole_statistics(paired):
    """A vocabulary-parallel head's step 2 without the process group: each rank's tiles merged into
    ``partials.FIELDS`` (``rank_partials``, ids local to the rank's block), merged over the ranks as the group's
    all-reduce does (``partials.merge``), finalize to the whole head's statistics with its row maxima; and with those
    maxima as the shift (the backward's), to the same l, H and KL, lse - m, and maxima of 0 (to rounding: a rank's
    product of fewer columns may round apart from the whole head's)."""
    device = triton_device()
    rows, weight, bias_vector, tokens = make_case(37, 203, 40, paired, True, torch.float32, seed=11)
    rows, weight, bias_vector = rows.float().to(device), weight.float().to(device), bias_vector.float().to(device)
    tokens, count = tokens.to(device), tokens.shape[0]
    hidden_masked = rows[count:] if paired else None
    whole = statistics.head_statistics(rows[:count], hidden_masked, weight, bias_vector, tokens, 0.8)
    blocks = [VocabShard(None, start, size, weight.shape[0], "all_reduce") for start, size in ((0, 120), (120, 83))]

    def over_the_ranks(shift):
        ranks = [statistics.rank_partials(statistics.logit_partials(
            rows[:count], hidden_masked, weight[block.start:block.start + block.size],
            bias_vector[block.start:block.start + block.size], block.local_ids(tokens), 0.8, shift=shift), paired)
            for block in blocks]
        merged = partials.merge(torch.stack(ranks, dim=1), dim=1)
        return RowStatistics(*partials.finalize(merged, paired)), merged[partials.max_fields(paired)]

    stats, maxima = over_the_ranks(None)
    for name in whole.stats._fields:
        want = getattr(whole.stats, name)
        if want is not None:
            assert_close(name, getattr(stats, name).double(), want.double(), rtol=2e-6, atol=2e-6)
    assert_close("maxima", maxima.double(), whole.maxima.double(), rtol=2e-6, atol=2e-6)
    shifted, shifted_maxima = over_the_ranks(whole.maxima)
    for name in ("logprobs", "entropy", "logprobs_masked", "entropy_masked", "kl"):
        want = getattr(whole.stats, name)
        if want is not None:
            assert_close(name, getattr(shifted, name).double(), want.double(), rtol=2e-6, atol=2e-6)
    assert_close("lse - m", shifted.lse.double(), (whole.stats.lse - whole.maxima[0]).double(), rtol=2e-6, atol=2e-6)
    assert_close("maxima of z - m", shifted_maxima.double(), torch.zeros_like(shifted_maxima).double(), rtol=0,
                 atol=2e-6)


def test_no_tokens():
    stats, out = kernel_statistics(torch.zeros(0, 16, dtype=torch.float64), torch.ones(30, 16, dtype=torch.float64),
                                   None, torch.zeros(0, dtype=torch.long), 1.0, True, torch.float32, None)
    assert all(value.shape == (0,) for value in stats) and out.shape == (0, 30)
