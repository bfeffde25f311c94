"""The coefficient rule (csrc/papo_epilogue.h): a statistic whose coefficient is 0 is never multiplied.

What an unused statistic holds (a NaN of a masked pass that only feeds the metrics, of a clean row that the
masked gradient does not need) never reaches a gradient through 0 x NaN, and a tiny temperature never turns
0 x (g / tau) (log p + H) into 0 x inf. Tested on every epilogue of the fast path (native, torch, Triton under
the interpreter) with a chunk of logits, and end to end through ``papo_loss`` on every path and backend.
"""

import pytest
import torch

from papo_kernels import papo_loss
from papo_kernels.fast_path.epilogues import resolve_epilogue
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients

from backend_cases import triton_device
from test_epilogues import make_chunk
from test_reliability import PATHS, make_batch

EPILOGUES = ["native", "torch", "triton"]
N, V = 3, 203


def epilogue_on(name: str):
    device = triton_device() if name == "triton" else torch.device("cpu")
    epilogue = resolve_epilogue(name, device, torch.float32)
    assert epilogue.NAME == name, f"backend={name!r} resolved to the {epilogue.NAME} epilogue"
    return epilogue, device


def chunk_dz(epilogue, device, logits, tokens, grads, temperature=1.0, dtype=torch.float32):
    """Statistics then dz of a paired chunk; the rows of a pass without gradient are NaN-filled."""
    logits = logits.to(device, dtype).clone()
    stats = epilogue.statistics(logits, tokens.to(device), None, temperature, True)
    upstream = UpstreamGradients(*(None if grads.get(name) is None else grads[name].to(device, dtype)
                                   for name in UpstreamGradients._fields))
    out = torch.full_like(logits, float("nan"))
    epilogue.logit_gradient(logits, tokens.to(device), None, temperature, stats, upstream, out)
    return out.cpu()


# (poisoned pass, the gradients present): the poisoned pass's rows are read by no term that is on
UNUSED_PASS_CASES = {
    "nan masked row, clean gradients": ("masked", ("logprobs", "entropy")),
    "nan clean row, masked gradients": ("clean", ("logprobs_masked", "entropy_masked")),
}


@pytest.mark.parametrize("case", list(UNUSED_PASS_CASES))
@pytest.mark.parametrize("name", EPILOGUES)
def test_a_nan_in_the_pass_no_term_reads_leaves_dz_unchanged(name, case):
    epilogue, device = epilogue_on(name)
    logits, tokens, _, grads = make_chunk(N, V, True, False, seed=7, dtype=torch.float32)
    poisoned_pass, present = UNUSED_PASS_CASES[case]
    grads = {field: grads[field] if field in present else None for field in UpstreamGradients._fields}
    row = N + 1 if poisoned_pass == "masked" else 1
    poisoned = logits.clone()
    poisoned[row, 17] = float("nan")
    kept = slice(0, N) if poisoned_pass == "masked" else slice(N, 2 * N)
    want = chunk_dz(epilogue, device, logits, tokens, grads)[kept]
    got = chunk_dz(epilogue, device, poisoned, tokens, grads)[kept]
    assert torch.isfinite(got).all(), f"{name}: a NaN of the {poisoned_pass} pass reached the other pass's dz"
    assert torch.equal(got, want)


def test_native_skips_a_term_whose_coefficient_is_zero_row_by_row():
    """The C++ ops take a column for every upstream gradient: a row whose KL or entropy gradient is 0 gives the
    dz of the same row with that gradient absent, whatever the unused statistics hold."""
    native, _ = epilogue_on("native")
    logits, tokens, _, grads = make_chunk(N, V, True, False, seed=8, dtype=torch.float32)
    logits = logits.float()
    logits[N + 1, 5] = float("nan")  # the masked row of token 1: its KL and masked statistics are NaN
    stats = native.statistics(logits, tokens, None, 0.7, True)
    grads = {name: value.float() for name, value in grads.items()}
    zero_at_1 = {name: value.index_fill(0, torch.tensor([1]), 0.0) for name, value in grads.items()}
    present = UpstreamGradients(zero_at_1["logprobs"], zero_at_1["entropy"], None, None, zero_at_1["kl"])
    absent = UpstreamGradients(zero_at_1["logprobs"], zero_at_1["entropy"])
    with_zeros, without = torch.full_like(logits, float("nan")), torch.full_like(logits, float("nan"))
    native.logit_gradient(logits, tokens, None, 0.7, stats, present, with_zeros)
    native.logit_gradient(logits, tokens, None, 0.7, stats, absent, without)
    assert torch.isfinite(with_zeros[1]).all()
    assert torch.equal(with_zeros[1], without[1])


@pytest.mark.parametrize("temperature", [1e-20, 1e-30])
@pytest.mark.parametrize("name", EPILOGUES)
def test_a_tiny_temperature_gives_finite_dz(name, temperature):
    """z = x / tau of 1e20 and more: p is 0 at all but the largest logit, and the terms it multiplies are
    formed before the division by tau, so dz is finite and equals the float64 torch epilogue's."""
    epilogue, device = epilogue_on(name)
    logits, tokens, _, grads = make_chunk(N, V, True, False, seed=9, dtype=torch.float32)
    got = chunk_dz(epilogue, device, logits, tokens, grads, temperature)
    assert torch.isfinite(got).all(), f"{name}: non-finite dz at temperature {temperature}"
    want = chunk_dz(epilogue_on("torch")[0], "cpu", logits, tokens, grads, temperature, torch.float64)
    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= 1e-6 * scale


LEAVES = ("hidden", "hidden_masked", "weight", "bias")


def loss_and_grads(batch, path, backend, **options):
    device = triton_device() if backend == "triton" else "cpu"
    batch = {name: value.to(device) for name, value in batch.items()}
    leaves = {name: batch[name].detach().clone().requires_grad_() for name in LEAVES}
    loss, _ = papo_loss(leaves["hidden"], leaves["weight"], batch["completion_ids"], batch["completion_mask"],
                        batch["advantages"], hidden_masked=leaves["hidden_masked"], bias=leaves["bias"],
                        old_logprobs=batch["old_logprobs"], path=path, backend=backend, **options)
    loss.backward()
    return loss.detach().cpu(), {name: None if leaf.grad is None else leaf.grad.cpu() for name, leaf in
                                 leaves.items()}


def poison_unmasked(batch, name):
    """A NaN in ``name`` at a position the mask keeps (batch 2, token 3: make_batch masks none of row 2)."""
    poisoned = dict(batch)
    poisoned[name] = batch[name].clone()
    poisoned[name][2, 3, 1] = float("nan")
    return poisoned


@pytest.mark.parametrize("perception_kl", ["exact", "k3"])
@pytest.mark.parametrize("path, backend", PATHS, ids=str)
def test_a_masked_pass_given_for_its_metrics_only_cannot_poison_the_gradients(path, backend, perception_kl):
    """gamma = eta_masked = 0 with hidden_masked given (its metrics are logged): a NaN in it at a kept position
    leaves the loss and every gradient as they were, and the masked pass gets none."""
    options = dict(gamma=0.0, eta_masked=0.0, eta_clean=0.03, perception_kl=perception_kl)
    batch = make_batch()
    clean = loss_and_grads(batch, path, backend, **options)
    poisoned = loss_and_grads(poison_unmasked(batch, "hidden_masked"), path, backend, **options)
    assert torch.equal(poisoned[0], clean[0])
    for name in ("hidden", "weight", "bias"):
        assert torch.isfinite(poisoned[1][name]).all(), f"non-finite gradient of {name}"
        assert torch.equal(poisoned[1][name], clean[1][name]), f"gradient of {name} changed"
    hidden_masked_grad = poisoned[1]["hidden_masked"]
    assert hidden_masked_grad is None or not hidden_masked_grad.any()


@pytest.mark.parametrize("path, backend", PATHS, ids=str)
def test_a_nan_in_the_clean_pass_leaves_the_masked_gradient_alone(path, backend):
    """Without a KL term (gamma = 0) the masked entropy's gradient reads only the masked pass: a NaN in the clean
    pass makes the loss NaN, as it should, but not hidden_masked's gradient."""
    options = dict(gamma=0.0, eta_masked=0.05, eta_clean=0.03)
    batch = make_batch()
    clean = loss_and_grads(batch, path, backend, **options)
    poisoned = loss_and_grads(poison_unmasked(batch, "hidden"), path, backend, **options)
    assert poisoned[0].isnan()
    assert torch.isfinite(poisoned[1]["hidden_masked"]).all()
    assert torch.equal(poisoned[1]["hidden_masked"], clean[1]["hidden_masked"])


@pytest.mark.parametrize("temperature", [1e-20, 1e-30])
@pytest.mark.parametrize("path, backend", PATHS, ids=str)
def test_a_tiny_temperature_gives_finite_gradients_under_a_finite_loss(path, backend, temperature):
    loss, grads = loss_and_grads(make_batch(), path, backend, temperature=temperature, perception_kl="exact")
    assert torch.isfinite(loss)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"non-finite gradient of {name} at temperature {temperature}"
