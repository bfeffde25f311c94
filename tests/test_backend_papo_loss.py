"""papo_loss end to end on the torch and triton backends, on both paths, against the reference backend: loss,
metrics, gradients. (The fast path takes the backend as its epilogue; the per-token path as its LM-head ops.)"""

import pytest
import torch

from papo_kernels import PRESETS, papo_loss

from backend_cases import assert_close, assert_within_budget, triton_device

B, T, D, V = 3, 9, 24, 101

SETTINGS = {
    "papo_d": dict(PRESETS["papo_d"], hidden_masked=True, old_logprobs=True),
    "papo_g_exact": dict(PRESETS["papo_g"], hidden_masked=True, ref_logprobs=True, perception_kl="exact",
                         eta_clean=0.05, eta_masked=0.05, temperature=0.7, bias=True, loss_type="grpo"),
    "sampled_entropy": dict(hidden_masked=True, entropy="sampled", perception_kl="k3", gamma=0.02, bias=True),
    "masked_logprobs": dict(masked_logprobs=True, perception_kl="k2", old_logprobs=True, loss_type="bnpo"),
    "grpo_no_papo": dict(PRESETS["grpo"], ref_logprobs=True),
}
TENSOR_OPTIONS = ("hidden_masked", "masked_logprobs", "old_logprobs", "ref_logprobs", "bias")


def make_batch(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    batch = dict(
        hidden=hidden,
        hidden_masked=hidden + 0.8 * torch.randn(B, T, D, generator=g, dtype=torch.float64),
        weight=torch.randn(V, D, generator=g, dtype=torch.float64) * (2 / D**0.5),
        bias=torch.randn(V, generator=g, dtype=torch.float64) / 2,
        completion_ids=torch.randint(0, V, (B, T), generator=g),
        completion_mask=torch.ones(B, T, dtype=torch.long),
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 5,
        ref_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 5,
        masked_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 5,
    )
    batch["completion_mask"][0, 6:] = 0
    batch["completion_ids"][0, 6:] = -100  # padding ids never reach the head
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for name, t in batch.items()}


def loss_and_grads(batch, setting, backend, path="auto"):
    options = dict(setting)
    leaves = {name: batch[name].detach().clone().requires_grad_() for name in ("hidden", "weight")}
    for name in TENSOR_OPTIONS:
        if options.pop(name, False):
            wants_grad = name in ("hidden_masked", "bias")
            options[name] = batch[name].detach().clone().requires_grad_(wants_grad)
            if wants_grad:
                leaves[name] = options[name]
    loss, metrics = papo_loss(leaves["hidden"], leaves["weight"], batch["completion_ids"], batch["completion_mask"],
                              batch["advantages"], backend=backend, path=path, **options)
    loss.backward()
    grads = {name: None if leaf.grad is None else leaf.grad.cpu().double() for name, leaf in leaves.items()}
    return loss.detach().cpu().double(), {k: v.cpu().double() for k, v in metrics.items()}, grads


@pytest.mark.parametrize("path", ["fast", "per_token"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_torch_backend_loss_matches_reference(setting, path):
    batch = make_batch(torch.float64, "cpu")
    loss, metrics, grads = loss_and_grads(batch, SETTINGS[setting], "torch", path)
    ref_loss, ref_metrics, ref_grads = loss_and_grads(batch, SETTINGS[setting], "reference")
    assert_close("loss", loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name in ref_metrics:
        assert_close(name, metrics[name], ref_metrics[name], rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        assert_close(f"grad of {name}", grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["fast", "per_token"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_triton_backend_loss_matches_reference(setting, path):
    """float32 triton against the float64 truth, within 4x the float32 reference's error (+ a few ulps)."""
    truth = loss_and_grads(make_batch(torch.float64, "cpu"), SETTINGS[setting], "reference")
    same_dtype = loss_and_grads(make_batch(torch.float32, "cpu"), SETTINGS[setting], "reference")
    kernel = loss_and_grads(make_batch(torch.float32, triton_device()), SETTINGS[setting], "triton", path)
    check = dict(factor=4.0, atol=4e-7)
    assert_within_budget("loss", kernel[0], same_dtype[0], truth[0], **check)
    for name in truth[1]:
        assert_within_budget(name, kernel[1][name], same_dtype[1][name], truth[1][name], **check)
    for name in truth[2]:
        assert_within_budget(f"grad of {name}", kernel[2][name], same_dtype[2][name], truth[2][name], **check,
                             scale_to_truth=True)
