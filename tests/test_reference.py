"""The reference backend and the sampled KL estimators against an independent NumPy float64 computation."""

import numpy as np
import pytest
import torch

import papo_kernels
from papo_kernels.objective import sampled_kl


def numpy_statistics(hidden, weight, bias, tokens, temperature):
    """log p(y), H and log p from first principles: z = (W h + b)/tau, lse by max-shift."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z / temperature
    top = z.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))
    log_p = z - lse[:, None]
    p = np.exp(log_p)
    entropy = lse - (p * z).sum(axis=-1)  # H = lse(z) - sum_v p_v z_v
    return log_p[np.arange(len(tokens)), tokens], entropy, log_p


def make_case(n=7, d=12, v=37, with_bias=True, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator, dtype=dtype)
    hidden_masked = torch.randn(n, d, generator=generator, dtype=dtype)
    weight = torch.randn(v, d, generator=generator, dtype=dtype) / d**0.5 * 3
    bias = torch.randn(v, generator=generator, dtype=dtype) if with_bias else None
    tokens = torch.randint(0, v, (n,), generator=generator)
    return hidden, hidden_masked, weight, bias, tokens


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_linear_perception_kl_matches_numpy(with_bias, temperature):
    hidden, hidden_masked, weight, bias, tokens = make_case(with_bias=with_bias)
    out = papo_kernels.linear_perception_kl(hidden, hidden_masked, weight, tokens, bias=bias,
                                            temperature=temperature, backend="reference")
    as_np = lambda t: None if t is None else t.numpy()
    lp, ent, log_p = numpy_statistics(as_np(hidden), as_np(weight), as_np(bias), tokens.numpy(), temperature)
    lpm, entm, log_q = numpy_statistics(as_np(hidden_masked), as_np(weight), as_np(bias), tokens.numpy(), temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    for name, got, want in [("logprobs", out.logprobs, lp), ("logprobs_masked", out.logprobs_masked, lpm),
                            ("entropy", out.entropy, ent), ("entropy_masked", out.entropy_masked, entm),
                            ("kl", out.kl, kl)]:
        assert got.dtype == torch.float64, name
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12, err_msg=name)
    assert (out.kl > 0).all() and (out.entropy > 0).all() and (out.logprobs < 0).all()


def test_linear_logprobs_matches_numpy_and_keeps_batch_shape():
    hidden, _, weight, bias, tokens = make_case(n=12)
    out = papo_kernels.linear_logprobs(hidden.reshape(3, 4, -1), weight, tokens.reshape(3, 4), bias=bias,
                                       temperature=0.7, backend="reference")
    lp, ent, _ = numpy_statistics(hidden.numpy(), weight.numpy(), bias.numpy(), tokens.numpy(), 0.7)
    assert out.logprobs.shape == (3, 4) and out.entropy.shape == (3, 4)
    np.testing.assert_allclose(out.logprobs.reshape(-1).numpy(), lp, rtol=1e-10)
    np.testing.assert_allclose(out.entropy.reshape(-1).numpy(), ent, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_give_float32_outputs(dtype):
    hidden, hidden_masked, weight, bias, tokens = make_case(dtype=dtype)
    out = papo_kernels.linear_perception_kl(hidden, hidden_masked, weight, tokens, bias=bias, backend="reference")
    assert all(t.dtype == torch.float32 for t in out)


def test_gradcheck_through_both_passes_weight_and_bias():
    hidden, hidden_masked, weight, bias, tokens = make_case(n=4, d=5, v=9)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, hidden_masked, weight, bias))

    def all_outputs(h, hm, w, b):
        return tuple(papo_kernels.linear_perception_kl(h, hm, w, tokens, bias=b, temperature=0.8,
                                                       backend="reference"))

    assert torch.autograd.gradcheck(all_outputs, inputs)


def test_gradcheck_linear_logprobs():
    hidden, _, weight, bias, tokens = make_case(n=4, d=5, v=9)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: tuple(papo_kernels.linear_logprobs(h, w, tokens, bias=b, backend="reference")), inputs)


def test_sampled_estimators_and_their_clamps():
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -30.0, -1.0], dtype=torch.float64)
    masked = torch.tensor([-1.5, -1.0, -0.5, -1.0, -40.0], dtype=torch.float64)
    d = (masked - logprobs).numpy()
    np.testing.assert_allclose(sampled_kl(logprobs, masked, "k1").numpy(), -d)
    np.testing.assert_allclose(sampled_kl(logprobs, masked, "k2").numpy(), d * d / 2)
    clamped_d = np.clip(d, -20, 20)
    k3 = np.clip(np.exp(clamped_d) - clamped_d - 1, -10, 10)
    np.testing.assert_allclose(sampled_kl(logprobs, masked, "k3").numpy(), k3)
    # d = +29 hits the value clamp at 10; d = -39 hits the log-ratio clamp: exp(-20) + 20 - 1 > 10 -> 10.
    assert sampled_kl(logprobs, masked, "k3")[3] == 10.0 and sampled_kl(logprobs, masked, "k3")[4] == 10.0
    assert float(sampled_kl(logprobs, masked, "k3")[0]) == pytest.approx(np.exp(-0.5) + 0.5 - 1)


def test_k3_stays_finite_with_gradient_at_extreme_log_ratios():
    logprobs = torch.tensor([-80.0, -0.1], dtype=torch.float64, requires_grad=True)
    masked = torch.tensor([-0.1, -80.0], dtype=torch.float64)
    sampled_kl(logprobs, masked, "k3").sum().backward()
    assert torch.isfinite(logprobs.grad).all()
