"""The fast path's numerics where chunking could cost accuracy: the loss summed over many chunks, and float16 dZ.

- The loss is summed over the chunks in float64, so its error does not grow with their number:
  at N = 65536 split into over 1000 chunks the float32 loss stays within 1e-7 of the float64
  truth (summing the chunk totals in float32 gave 4.7e-7 here).
- A float16 dZ carries the aggregation weight (1/N): at gradients of order 1e-9 its entries lie
  below float16's smallest subnormal. The chunk loop scales the upstream gradients by a power of
  two first and unscales in the products; a test switch (``FastPathOptions.dz_dtype``) runs that
  code on CPU tensors, against float64.
"""

import functools
import math

import pytest
import torch

import papo_kernels.loss
from papo_kernels import papo_loss
from papo_kernels.fast_path import FastPathOptions
from papo_kernels.fast_path.chunk_loop import bytes_per_token
from papo_kernels.fast_path.half_dz import dz_scale
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients

from backend_cases import assert_within_budget, triton_device

OPTIONS = dict(perception_kl="exact", gamma=0.3, eta_clean=0.2, eta_masked=0.25, dual_clip=3.0)


def make_batch(b: int, t: int, d: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=torch.randn(v, d, generator=g, dtype=torch.float64) * (2 / d**0.5),
                completion_ids=torch.randint(0, v, (b, t), generator=g),
                completion_mask=torch.ones(b, t, dtype=torch.bool),
                advantages=torch.randn(b, generator=g, dtype=torch.float64),
                hidden_masked=hidden + 0.7 * torch.randn(b, t, d, generator=g, dtype=torch.float64),
                old_logprobs=-torch.rand(b, t, generator=g, dtype=torch.float64) * 4,
                bias=torch.randn(v, generator=g, dtype=torch.float64) / 2)


def test_the_float32_loss_over_a_thousand_chunks_is_within_1e7_of_float64():
    b, t, d, v = 64, 1024, 8, 23
    batch = make_batch(b, t, d, v)
    at_float32 = {name: x.float() if x.is_floating_point() else x for name, x in batch.items()}
    tokens_per_chunk = 65  # 1009 chunks
    workspace = tokens_per_chunk * bytes_per_token(v, d, True, 4, False, 3 * v * 4)  # room for the torch epilogue
    with torch.no_grad():
        truth, _ = papo_loss(**batch, path="per_token", backend="reference", **OPTIONS)
        loss, _ = papo_loss(**at_float32, path="fast", workspace_bytes=workspace, **OPTIONS)
    assert loss.dtype == torch.float32
    error = abs(float(loss) - float(truth)) / abs(float(truth))
    assert error <= 1e-7, f"relative error {error:.3g} of the float32 loss over {-(-b * t // tokens_per_chunk)} chunks"


def test_dz_scale_is_a_power_of_two_bringing_the_largest_gradient_into_half_to_one():
    def grads(*values):
        return UpstreamGradients(torch.tensor(values), None, torch.tensor([0.0]), None, None)

    for largest in (3e-9, 1e-4, 0.75, 1.0, 37.0, 6e4):
        scale = dz_scale(grads(largest / 3, -largest))
        assert math.log2(scale).is_integer() and 0.5 < largest * scale <= 1.0, (largest, scale)
    assert dz_scale(grads(0.0, 0.0)) == 1.0
    assert dz_scale(grads(float("inf"), 1.0)) == 1.0 and dz_scale(grads(float("nan"))) == 1.0
    assert dz_scale(grads(1e-44)) == 2.0**126  # bounded: 2^k and 2^-k stay normal float32 numbers


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_float16_dz_keeps_gradients_of_order_1e9(backend, monkeypatch):
    """float32 inputs, dZ forced into float16, 1/N = 1e-8: the gradients (about 1e-9) against float64 within the
    float16 error budget; an unscaled float16 dZ flushes most of them to zero."""
    monkeypatch.setattr(papo_kernels.loss, "FastPathOptions", functools.partial(FastPathOptions,
                                                                                dz_dtype=torch.float16))
    batch = make_batch(3, 7, 8, 23)
    device = triton_device() if backend == "triton" else torch.device("cpu")

    def gradients(dtype, path, **options):
        leaves = {name: batch[name].to(device, dtype).detach().requires_grad_() for name in
                  ("hidden", "hidden_masked", "weight", "bias")}
        others = {name: x.to(device, dtype) if x.is_floating_point() else x.to(device) for name, x in batch.items()
                  if name not in leaves}
        loss, _ = papo_loss(**leaves, **others, path=path, num_items_in_batch=1e8, **OPTIONS, **options)
        loss.backward()
        return {name: leaf.grad.cpu().double() for name, leaf in leaves.items()}

    truth = gradients(torch.float64, "per_token", backend="reference")
    same_dtype = gradients(torch.float32, "per_token", backend="reference")
    kernel = gradients(torch.float32, "fast", backend=backend, workspace_bytes=3000)  # several chunks
    assert 1e-10 < float(truth["hidden"].abs().max()) < 1e-8
    for name, value in truth.items():
        assert_within_budget(f"grad of {name}", kernel[name], same_dtype[name], value, factor=4.0, atol=2e-3,
                             scale_to_truth=True)
