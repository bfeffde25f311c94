"""The fast path's workspace policy (``fast_path/workspace.py``): a pure function of the free memory, the dW kernel
and the bytes per token, and how ``papo_loss`` applies it."""

import pytest
import torch

from papo_kernels import papo_loss
from papo_kernels.fast_path.chunk_loop import bytes_per_token
from papo_kernels.fast_path.workspace import GiB, LOW_MEMORY_WORKSPACE_BYTES, MiB, policy_workspace_bytes
from papo_kernels.fast_path.workspace import resolve_workspace_bytes

# the headline shape: Qwen2.5-VL-7B's head, bf16 on CUDA, both passes, the Triton epilogue (no temporaries)
HEADLINE_BYTES_PER_TOKEN = bytes_per_token(152064, 3584, True, 4, True, 0)


def test_headline_bytes_per_token():
    # float32 logits 2 x 4 V, bfloat16 dZ 2 x 2 V, the stacked rows and their gradients 2 x 2 x 4 D
    assert HEADLINE_BYTES_PER_TOKEN == 12 * 152064 + 16 * 3584 == 1882112


@pytest.mark.parametrize("free_gib, expected", [(130.0, 4 * GiB), (20.0, 2 * GiB), (1.0, int(0.1 * GiB))])
def test_addmm_takes_four_gib_or_a_tenth_of_free_memory(free_gib, expected):
    assert policy_workspace_bytes(int(free_gib * GiB), "addmm", HEADLINE_BYTES_PER_TOKEN) == expected


def test_reduce_add_takes_1024_tokens_when_they_fit():
    small_vocabulary = bytes_per_token(32000, 4096, True, 4, True, 0)  # 1024 tokens: 0.43 GB
    assert policy_workspace_bytes(130 * GiB, "reduce_add", small_vocabulary) == 1024 * small_vocabulary


def test_reduce_add_is_capped_at_one_gib_in_steps_of_64_tokens():
    # at the headline shape 1024 tokens take 1.8 GiB: the 1 GiB cap leaves 570 tokens, 512 in steps of 64
    workspace = policy_workspace_bytes(130 * GiB, "reduce_add", HEADLINE_BYTES_PER_TOKEN)
    assert workspace == 512 * HEADLINE_BYTES_PER_TOKEN <= GiB
    # a tenth of 8 GiB of free memory: 456 tokens fit, 448 in steps of 64
    assert policy_workspace_bytes(8 * GiB, "reduce_add", HEADLINE_BYTES_PER_TOKEN) == 448 * HEADLINE_BYTES_PER_TOKEN


def test_reduce_add_below_64_tokens_takes_what_fits_and_at_least_one_token():
    assert policy_workspace_bytes(int(0.5 * GiB), "reduce_add", HEADLINE_BYTES_PER_TOKEN) == \
        28 * HEADLINE_BYTES_PER_TOKEN
    assert policy_workspace_bytes(0, "reduce_add", HEADLINE_BYTES_PER_TOKEN) == HEADLINE_BYTES_PER_TOKEN
    assert policy_workspace_bytes(0, "addmm", HEADLINE_BYTES_PER_TOKEN) == 1  # one token a chunk, whatever it holds


def test_the_policy_refuses_bad_arguments():
    with pytest.raises(ValueError, match="grad_weight_kernel must be 'addmm' or 'reduce_add', got 'cublas'"):
        policy_workspace_bytes(GiB, "cublas", 1000)
    with pytest.raises(ValueError, match="free_bytes must be >= 0 and bytes_per_token >= 1, got -1 and 1000"):
        policy_workspace_bytes(-1, "addmm", 1000)


def test_an_explicit_workspace_wins_and_the_cpu_keeps_256_mib():
    cpu = torch.device("cpu")
    assert resolve_workspace_bytes(12345, cpu, "addmm", 1000) == 12345
    assert resolve_workspace_bytes(None, cpu, "addmm", 1000) == LOW_MEMORY_WORKSPACE_BYTES == 256 * MiB


def test_papo_loss_takes_none_for_the_policy_and_refuses_a_zero_workspace():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    inputs = (hidden, torch.randn(11, 4, generator=g), torch.randint(0, 11, (2, 3), generator=g),
              torch.ones(2, 3, dtype=torch.bool), torch.randn(2, generator=g))
    default, _ = papo_loss(*inputs, path="fast", backend="torch")
    chosen, _ = papo_loss(*inputs, path="fast", backend="torch", workspace_bytes=None)
    small, _ = papo_loss(*inputs, path="fast", backend="torch", workspace_bytes=500)  # one token a chunk
    assert torch.equal(default, chosen) and torch.allclose(default, small, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="workspace_bytes"):
        papo_loss(*inputs, path="fast", backend="torch", workspace_bytes=0)
