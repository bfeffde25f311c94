"""papo_loss against the formulas of PAPO_SPEC.md, written out again here in NumPy float64."""

import itertools

import numpy as np
import pytest
import torch

import papo_kernels
from papo_kernels import PAPOLoss, PRESETS, papo_loss

B, T, D, V = 3, 5, 8, 23


def make_batch(seed=0, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        hidden=torch.randn(b, t, D, generator=g, dtype=torch.float64),
        hidden_masked=torch.randn(b, t, D, generator=g, dtype=torch.float64),
        weight=torch.randn(V, D, generator=g, dtype=torch.float64) / 2,
        bias=torch.randn(V, generator=g, dtype=torch.float64) / 4,
        completion_ids=torch.randint(0, V, (b, t), generator=g),
        completion_mask=torch.ones(b, t, dtype=torch.long),
        advantages=torch.randn(b, generator=g, dtype=torch.float64),
        old_logprobs=-torch.rand(b, t, generator=g, dtype=torch.float64) * 4,
        ref_logprobs=-torch.rand(b, t, generator=g, dtype=torch.float64) * 4,
    )
    batch["completion_mask"][0, 3:] = 0
    batch["completion_mask"][2, 1:] = 0
    return batch


def expected_loss(batch, *, masked_input, with_old, with_ref, dual_clip, perception_kl, entropy, loss_type,
                  temperature=0.9, epsilon_low=0.2, epsilon_high=0.28, beta=0.05, gamma=0.7, eta_clean=0.3,
                  eta_masked=0.4, max_completion_length=7, num_items_in_batch=None):
    """The spec's per-token loss and aggregation, in NumPy."""
    stats = papo_kernels.linear_perception_kl(
        batch["hidden"], batch["hidden_masked"], batch["weight"], batch["completion_ids"], bias=batch["bias"],
        temperature=temperature, backend="reference")
    l, lm, h, hm, kl_exact = (s.detach().numpy() for s in stats)
    mask = batch["completion_mask"].numpy() != 0
    adv = batch["advantages"].numpy()[:, None]
    old = batch["old_logprobs"].numpy() if with_old else l
    r = np.exp(np.clip(l - old, -20, 20))
    pg = np.maximum(-adv * r, -adv * np.clip(r, 1 - epsilon_low, 1 + epsilon_high))
    if dual_clip is not None:
        pg = np.where(adv < 0, np.minimum(pg, -dual_clip * adv), pg)
    loss = pg
    if with_ref:
        d_ref = np.clip(batch["ref_logprobs"].numpy() - l, -20, 20)
        loss = loss + beta * np.clip(np.exp(d_ref) - d_ref - 1, -10, 10)
    if entropy == "sampled":
        h = -l
    if masked_input is not None:
        d = lm - l
        kl = {"k1": -d, "k2": d * d / 2, "exact": kl_exact,
              "k3": np.clip(np.exp(np.clip(d, -20, 20)) - np.clip(d, -20, 20) - 1, -10, 10)}[perception_kl]
        if entropy == "sampled" or masked_input == "masked_logprobs":
            hm = -lm
        loss = loss - gamma * kl + eta_clean * h + eta_masked * hm
    else:  # the clean entropy needs no masked pass; the perception KL and the masked entropy do
        loss = loss + eta_clean * h
    loss = np.where(mask, loss, 0.0)
    if loss_type == "grpo":
        return np.mean(loss.sum(-1) / np.maximum(mask.sum(-1), 1))
    if loss_type == "bnpo":
        return loss.sum() / mask.sum()
    if loss_type == "dr_grpo":
        return loss.sum() / (loss.shape[0] * max_completion_length)
    return loss.sum() / (mask.sum() if num_items_in_batch is None else num_items_in_batch)


def call(batch, *, masked_input, with_old, with_ref, **options):
    kwargs = dict(bias=batch["bias"], temperature=0.9, beta=0.05 if with_ref else 0.0, gamma=0.7, eta_clean=0.3,
                  eta_masked=0.4, max_completion_length=7)
    kwargs.update(options)
    if masked_input == "hidden_masked":
        kwargs["hidden_masked"] = batch["hidden_masked"]
    if masked_input == "masked_logprobs":
        kwargs["masked_logprobs"] = papo_kernels.linear_logprobs(
            batch["hidden_masked"], batch["weight"], batch["completion_ids"], bias=batch["bias"], temperature=0.9,
            backend="reference").logprobs.detach()
    if with_old:
        kwargs["old_logprobs"] = batch["old_logprobs"]
    if with_ref:
        kwargs["ref_logprobs"] = batch["ref_logprobs"]
    kwargs.setdefault("backend", "reference")
    return papo_loss(batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"],
                     batch["advantages"], **kwargs)


CASES = [
    case for case in itertools.product(
        ["grpo", "bnpo", "dapo", "dr_grpo"], ["k1", "k2", "k3", "exact"], ["exact", "sampled"], [None, 3.0],
        [False, True], [False, True], ["hidden_masked", "masked_logprobs", None])
    if not (case[1] == "exact" and case[6] == "masked_logprobs")
]


@pytest.mark.parametrize("loss_type, perception_kl, entropy, dual_clip, with_old, with_ref, masked_input", CASES)
def test_loss_matches_spec(loss_type, perception_kl, entropy, dual_clip, with_old, with_ref, masked_input):
    batch = make_batch()
    options = dict(loss_type=loss_type, perception_kl=perception_kl, entropy=entropy, dual_clip=dual_clip)
    loss, metrics = call(batch, masked_input=masked_input, with_old=with_old, with_ref=with_ref, **options)
    want = expected_loss(batch, masked_input=masked_input, with_old=with_old, with_ref=with_ref, **options)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert all(not m.requires_grad and m.dim() == 0 and torch.isfinite(m) for m in metrics.values())


def test_dual_clip_and_clip_fractions_change_the_loss():
    batch = make_batch(seed=3)
    batch["advantages"] = torch.tensor([-1.0, 1.0, -2.0], dtype=torch.float64)
    logprobs = papo_kernels.linear_logprobs(batch["hidden"], batch["weight"], batch["completion_ids"],
                                            bias=batch["bias"], temperature=0.9).logprobs
    batch["old_logprobs"] = logprobs - 2.0  # ratio e^2 = 7.4 everywhere: above 1 + eps_high and above c = 3
    plain, metrics = call(batch, masked_input=None, with_old=True, with_ref=False, loss_type="bnpo")
    dual, _ = call(batch, masked_input=None, with_old=True, with_ref=False, loss_type="bnpo", dual_clip=3.0)
    mask = batch["completion_mask"]
    # Unclipped tokens with A < 0 cost -A e^2; dual clip caps them at -3A.
    negative = (batch["advantages"][:, None] < 0) & (mask != 0)
    saving = ((-batch["advantages"][:, None] * (np.exp(2.0) - 3.0)) * negative).sum() / mask.sum()
    assert float(plain - dual) == pytest.approx(float(saving), rel=1e-10)
    positive_tokens = float(((batch["advantages"][:, None] > 0) & (mask != 0)).sum() / mask.sum())
    assert float(metrics["clip_fraction_high"]) == pytest.approx(positive_tokens) and positive_tokens > 0
    assert float(metrics["clip_fraction_low"]) == 0.0


def test_on_policy_ratio_is_one_with_the_policy_gradient():
    batch = make_batch()
    hidden = batch["hidden"].clone().requires_grad_()
    loss, metrics = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                              batch["advantages"], gamma=0.0, eta_clean=0.0, eta_masked=0.0, backend="reference")
    loss.backward()
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    # With r = 1 the surrogate is -A * l up to a constant: the same gradient as the REINFORCE loss.
    hidden_pg = batch["hidden"].clone().requires_grad_()
    logprobs, _ = papo_kernels.linear_logprobs(hidden_pg, batch["weight"], batch["completion_ids"])
    mask = batch["completion_mask"].double()
    (-(batch["advantages"][:, None] * logprobs * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(hidden.grad, hidden_pg.grad, rtol=1e-10, atol=1e-12)


def gradient_step(batch, **options):
    """Inputs after one gradient step on the loss, with zero advantages (the PAPO terms alone)."""
    hidden = batch["hidden"].clone().requires_grad_()
    hidden_masked = batch["hidden_masked"].clone().requires_grad_()
    loss, _ = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                        torch.zeros(B, dtype=torch.float64), hidden_masked=hidden_masked, backend="reference",
                        **options)
    loss.backward()
    return hidden.detach() - 0.05 * hidden.grad, hidden_masked.detach() - 0.05 * hidden_masked.grad


def test_signs_perception_kl_is_maximised_and_entropies_minimised():
    batch = make_batch()
    before = papo_kernels.linear_perception_kl(batch["hidden"], batch["hidden_masked"], batch["weight"],
                                               batch["completion_ids"])
    h, hm = gradient_step(batch, gamma=1.0, eta_clean=0.0, eta_masked=0.0, perception_kl="exact")
    after = papo_kernels.linear_perception_kl(h, hm, batch["weight"], batch["completion_ids"])
    assert float(after.kl.sum()) > float(before.kl.sum())
    h, hm = gradient_step(batch, gamma=0.0, eta_clean=1.0, eta_masked=1.0)
    after = papo_kernels.linear_perception_kl(h, hm, batch["weight"], batch["completion_ids"])
    assert float(after.entropy.sum()) < float(before.entropy.sum())
    assert float(after.entropy_masked.sum()) < float(before.entropy_masked.sum())


def test_terms_with_zero_coefficients_send_no_gradient_to_the_masked_pass():
    batch = make_batch()
    hidden = batch["hidden"].clone().requires_grad_()
    hidden_masked = batch["hidden_masked"].clone().requires_grad_()
    loss, _ = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                        batch["advantages"], hidden_masked=hidden_masked, gamma=0.0, eta_clean=0.0, eta_masked=0.0)
    loss.backward()
    assert hidden_masked.grad is None and hidden.grad is not None


def test_masked_logprobs_give_the_clean_gradient_of_hidden_masked_and_none_to_the_masked_pass():
    batch = make_batch()
    grads = {}
    for masked_input in ("hidden_masked", "masked_logprobs"):
        hidden = batch["hidden"].clone().requires_grad_()
        loss, _ = call({**batch, "hidden": hidden}, masked_input=masked_input, with_old=True, with_ref=False,
                       entropy="sampled")
        loss.backward()
        grads[masked_input] = hidden.grad
    torch.testing.assert_close(grads["hidden_masked"], grads["masked_logprobs"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("perception_kl", ["k3", "exact"])
def test_dapo_microbatches_sum_to_the_full_batch_gradient(perception_kl):
    batch = make_batch(b=4)
    total_tokens = int(batch["completion_mask"].sum())

    def gradients(rows):
        weight = batch["weight"].clone().requires_grad_()
        hidden = batch["hidden"].clone().requires_grad_()
        hidden_masked = batch["hidden_masked"].clone().requires_grad_()
        for part in rows:
            loss, _ = papo_loss(hidden[part], weight, batch["completion_ids"][part], batch["completion_mask"][part],
                                batch["advantages"][part], hidden_masked=hidden_masked[part],
                                old_logprobs=batch["old_logprobs"][part], perception_kl=perception_kl,
                                num_items_in_batch=torch.tensor(total_tokens), backend="reference")
            loss.backward()
        return weight.grad, hidden.grad, hidden_masked.grad

    full = gradients([slice(0, 4)])
    split = gradients([slice(0, 1), slice(1, 4)])
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_a_masked_out_token_changes_nothing():
    batch = make_batch()
    changed = {key: value.clone() for key, value in batch.items()}
    off = batch["completion_mask"] == 0
    changed["hidden"][off] = 1e3
    changed["hidden_masked"][off] = -7.0
    changed["completion_ids"][off] = -100
    changed["old_logprobs"][off] = float("nan")
    changed["ref_logprobs"][off] = float("-inf")
    results = []
    for data in (batch, changed):
        hidden = data["hidden"].clone().requires_grad_()
        weight = data["weight"].clone().requires_grad_()
        loss, metrics = call({**data, "hidden": hidden, "weight": weight}, masked_input="hidden_masked",
                             with_old=True, with_ref=True)
        loss.backward()
        results.append((loss, metrics, hidden.grad, weight.grad))
    (loss_a, metrics_a, dh_a, dw_a), (loss_b, metrics_b, dh_b, dw_b) = results
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12)
    for key in metrics_a:
        assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), rel=1e-12, abs=1e-15), key
    torch.testing.assert_close(dw_a, dw_b, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dh_a, dh_b, rtol=1e-10, atol=1e-13)
    assert (dh_b[off] == 0).all()


@pytest.mark.parametrize("path, backend", [("per_token", "reference"), ("per_token", "torch"), ("fast", "torch"),
                                           ("fast", "native")])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_all_zero_mask_gives_a_finite_zero_loss_and_zero_gradients(loss_type, path, backend):
    """Zero gradients, not none: the layers before the head (here a linear map) get a gradient to reduce, as
    under DDP every rank must, when a micro-batch has no unmasked token."""
    batch = make_batch()
    batch["completion_mask"].zero_()
    body = torch.nn.Linear(D, D, dtype=torch.float64)
    hidden_masked = batch["hidden_masked"].clone().requires_grad_()
    loss, metrics = call({**batch, "hidden": body(batch["hidden"]), "hidden_masked": hidden_masked},
                         masked_input="hidden_masked", with_old=True, with_ref=True, loss_type=loss_type, path=path,
                         backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert body.weight.grad is not None and (body.weight.grad == 0).all()
    assert hidden_masked.grad is not None and (hidden_masked.grad == 0).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    batch = make_batch()
    per_sequence, _ = call(batch, masked_input="hidden_masked", with_old=True, with_ref=False)
    expanded = {**batch, "advantages": batch["advantages"][:, None].expand(B, T).contiguous()}
    per_token, _ = call(expanded, masked_input="hidden_masked", with_old=True, with_ref=False)
    assert float(per_sequence) == pytest.approx(float(per_token), rel=1e-12)


def test_metrics_report_the_token_means():
    batch = make_batch()
    _, metrics = call(batch, masked_input="hidden_masked", with_old=False, with_ref=True, perception_kl="exact")
    stats = papo_kernels.linear_perception_kl(batch["hidden"], batch["hidden_masked"], batch["weight"],
                                              batch["completion_ids"], bias=batch["bias"], temperature=0.9)
    mask = batch["completion_mask"] != 0
    assert set(metrics) == {"policy_loss", "clip_fraction_low", "clip_fraction_high", "perception_kl", "ref_kl",
                            "entropy", "entropy_masked", "ratio_mean", "tokens"}
    assert float(metrics["tokens"]) == float(mask.sum())
    assert float(metrics["perception_kl"]) == pytest.approx(float(stats.kl[mask].mean()), rel=1e-12)
    assert float(metrics["entropy"]) == pytest.approx(float(stats.entropy[mask].mean()), rel=1e-12)
    assert float(metrics["entropy_masked"]) == pytest.approx(float(stats.entropy_masked[mask].mean()), rel=1e-12)


def test_papo_loss_module_forwards_its_preset():
    batch = make_batch()
    module = PAPOLoss.from_preset("papo_g", gamma=0.05)
    args = (batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"], batch["advantages"])
    tensors = dict(hidden_masked=batch["hidden_masked"], ref_logprobs=batch["ref_logprobs"])
    loss, _ = module(*args, **tensors)
    direct, _ = papo_loss(*args, **tensors, **{**PRESETS["papo_g"], "gamma": 0.05})
    assert float(loss) == float(direct)


def test_presets_hold_the_published_settings():
    assert PRESETS["papo_d"]["gamma"] == 0.01 and PRESETS["papo_d"]["epsilon_high"] == 0.28
    assert PRESETS["papo_d"]["eta_clean"] == PRESETS["papo_d"]["eta_masked"] == 0.03
    assert PRESETS["papo_g"]["gamma"] == 0.02 and PRESETS["papo_g"]["beta"] == 0.01
    assert PRESETS["grpo"]["gamma"] == 0.0 and PRESETS["dapo"]["gamma"] == 0.0
