"""papo_loss's fast path (gradient inside the forward, chunk by chunk) against its per-token path.

In float64 the two must agree to rounding (1e-10) on every option combination sampled
here, values, metrics and gradients, with chunks of a few tokens so that chunk edges fall
everywhere. In float32 and float16 the fast path keeps the error budget against the
float64 truth. The matrix work is counted: 12 N D V for the fast path, 16 N D V for the
per-token torch backend, whose backward recomputes the logits.
"""

import itertools
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from papo_kernels import papo_loss

from backend_cases import assert_close, assert_within_budget, triton_device

B, T, D, V = 3, 7, 8, 23
TINY_WORKSPACE = 3000  # two or three tokens per chunk at these sizes in float64

OPTION_AXES = dict(
    loss_type=["grpo", "bnpo", "dapo", "dr_grpo"],
    perception_kl=["k1", "k2", "k3", "exact"],
    entropy=["exact", "sampled"],
    dual_clip=[None, 3.0],
    with_old=[False, True],
    with_ref=[False, True],
    masked_input=["hidden_masked", "masked_logprobs", None],
    temperature=[1.0, 0.7],
    bias=[False, True],
    token_advantages=[False, True],
    policy_weights=[False, True],
    num_items_in_batch=[None, 17.0],
)


def sampled_cases(count: int, seed: int = 0):
    every = [dict(zip(OPTION_AXES, values)) for values in itertools.product(*OPTION_AXES.values())]
    allowed = [case for case in every if not (case["perception_kl"] == "exact"
                                              and case["masked_input"] == "masked_logprobs")]
    return random.Random(seed).sample(allowed, count)


def make_batch(dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    batch = dict(
        hidden=hidden,
        hidden_masked=hidden + 0.7 * torch.randn(B, T, D, generator=g, dtype=torch.float64),
        weight=torch.randn(V, D, generator=g, dtype=torch.float64) * (2 / D**0.5),
        bias=torch.randn(V, generator=g, dtype=torch.float64) / 2,
        completion_ids=torch.randint(0, V, (B, T), generator=g),
        completion_mask=torch.ones(B, T, dtype=torch.bool),
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        token_advantages=torch.randn(B, T, generator=g, dtype=torch.float64),
        old_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
        ref_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
        masked_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
        policy_weights=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
    )
    batch["completion_mask"][0, 4:] = False
    batch["completion_mask"][2, 1:] = False
    batch["completion_ids"][0, 4:] = -100
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for name, t in batch.items()}


def run(batch, case, **call_options):
    """The loss, metrics and gradients of hidden, hidden_masked, weight and bias for one option case."""
    leaves = {"hidden": batch["hidden"].detach().clone().requires_grad_(),
              "weight": batch["weight"].detach().clone().requires_grad_()}
    options = dict(loss_type=case["loss_type"], perception_kl=case["perception_kl"], entropy=case["entropy"],
                   dual_clip=case["dual_clip"], temperature=case["temperature"], gamma=0.3, eta_clean=0.2,
                   eta_masked=0.25, max_completion_length=9, num_items_in_batch=case["num_items_in_batch"])
    if case["bias"]:
        leaves["bias"] = options["bias"] = batch["bias"].detach().clone().requires_grad_()
    if case["masked_input"] == "hidden_masked":
        leaves["hidden_masked"] = options["hidden_masked"] = batch["hidden_masked"].detach().clone().requires_grad_()
    if case["masked_input"] == "masked_logprobs":
        options["masked_logprobs"] = batch["masked_logprobs"]
    if case["with_old"]:
        options["old_logprobs"] = batch["old_logprobs"]
    if case["with_ref"]:
        options.update(ref_logprobs=batch["ref_logprobs"], beta=0.05)
    if case["policy_weights"]:
        options["policy_weights"] = batch["policy_weights"]
    advantages = batch["token_advantages"] if case["token_advantages"] else batch["advantages"]
    loss, metrics = papo_loss(leaves["hidden"], leaves["weight"], batch["completion_ids"], batch["completion_mask"],
                              advantages, **options, **call_options)
    loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("case", sampled_cases(48), ids=lambda case: "-".join(map(str, case.values())))
def test_fast_path_equals_per_token_path_in_float64(case):
    batch = make_batch()
    loss, metrics, grads = run(batch, case, path="fast", backend="torch", workspace_bytes=TINY_WORKSPACE)
    want_loss, want_metrics, want_grads = run(batch, case, path="per_token", backend="reference")
    assert_close("loss", loss, want_loss, rtol=1e-10, atol=1e-12)
    for name, value in want_metrics.items():
        assert_close(name, metrics[name], value, rtol=1e-10, atol=1e-12)
    for name, value in want_grads.items():
        assert_close(f"grad of {name}", grads[name], value, rtol=1e-10, atol=1e-12)


FULL_CASE = dict(loss_type="dapo", perception_kl="exact", entropy="exact", dual_clip=3.0, with_old=True,
                 with_ref=True, masked_input="hidden_masked", temperature=0.7, bias=True, token_advantages=False,
                 policy_weights=False, num_items_in_batch=None)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("torch", torch.bfloat16), ("triton", torch.float32),
                                           ("triton", torch.float16)], ids=str)
def test_fast_path_keeps_the_error_budget(backend, dtype):
    """Against the float64 truth on the same rounded inputs: within 4x the reference's error at ``dtype``."""
    rounded = {name: t.to(dtype).to(torch.float64) if t.is_floating_point() else t
               for name, t in make_batch().items()}
    truth = run(rounded, FULL_CASE, path="per_token", backend="reference")
    at_dtype = {name: t.to(dtype) if t.is_floating_point() else t for name, t in rounded.items()}
    same_dtype = run(at_dtype, FULL_CASE, path="per_token", backend="reference")
    device = triton_device() if backend == "triton" else torch.device("cpu")
    on_device = {name: t.to(device) for name, t in at_dtype.items()}
    kernel = run(on_device, FULL_CASE, path="fast", backend=backend, workspace_bytes=TINY_WORKSPACE)
    gradient_atol = {torch.float32: 4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def cpu64(value):
        return value.detach().cpu().double()

    assert_within_budget("loss", cpu64(kernel[0]), cpu64(same_dtype[0]), cpu64(truth[0]), factor=4.0, atol=4e-7)
    for name in truth[1]:
        assert_within_budget(name, cpu64(kernel[1][name]), cpu64(same_dtype[1][name]), cpu64(truth[1][name]),
                             factor=4.0, atol=4e-7)
    for name in truth[2]:
        assert kernel[2][name].dtype == dtype, f"grad of {name} comes back in {kernel[2][name].dtype}"
        assert_within_budget(f"grad of {name}", cpu64(kernel[2][name]), cpu64(same_dtype[2][name]),
                             cpu64(truth[2][name]), factor=4.0, atol=gradient_atol, scale_to_truth=True)


def matrix_flops(path: str, backend: str, n_rows: int, dim: int, vocab: int, grad: bool = True,
                 requires=("hidden", "hidden_masked", "weight"), **options) -> int:
    g = torch.Generator().manual_seed(0)
    leaves = dict(hidden=torch.randn(1, n_rows, dim, generator=g),
                  hidden_masked=torch.randn(1, n_rows, dim, generator=g),
                  weight=torch.randn(vocab, dim, generator=g) / dim**0.5, bias=torch.zeros(vocab))
    for name in requires:
        leaves[name].requires_grad_()
    tokens = torch.randint(0, vocab, (1, n_rows), generator=g)
    mask = torch.ones(1, n_rows, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        loss, _ = papo_loss(leaves["hidden"], leaves["weight"], tokens, mask, torch.ones(1),
                            hidden_masked=leaves["hidden_masked"], bias=leaves["bias"], perception_kl="exact",
                            path=path, backend=backend, workspace_bytes=2**20, **options)
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


def test_fast_path_does_twelve_ndv_of_matrix_work_and_the_per_token_path_sixteen():
    n, d, v = 96, 32, 1000
    floor = n * d * v
    fast = matrix_flops("fast", "torch", n, d, v)
    per_token = matrix_flops("per_token", "torch", n, d, v)
    assert abs(fast / floor - 12) < 0.12, f"fast path: {fast / floor:.3f} N D V"
    assert abs(per_token / floor - 16) < 0.16, f"per-token path: {per_token / floor:.3f} N D V"
    # Without grad: statistics only, 2 N D V per pass.
    assert abs(matrix_flops("fast", "torch", n, d, v, grad=False) / floor - 4) < 0.04


@pytest.mark.parametrize("requires, options, ndv", [
    (("hidden", "hidden_masked", "weight"), dict(gamma=0.0, eta_masked=0.0), 8),  # no gradient to the masked pass
    (("hidden", "hidden_masked", "weight"), dict(gamma=0.0, eta_clean=0.0, eta_masked=0.0), 8),
    (("weight",), {}, 8),  # no dH product
    (("hidden", "hidden_masked"), {}, 8),  # no dW product
    (("hidden",), {}, 6),  # dH of the clean rows only
    (("bias",), {}, 4),  # the bias gradient is a sum of dZ: no product after the logits
    ((), {}, 4),  # grad mode on, nothing requires grad: statistics only
], ids=["no-masked-terms", "no-papo-terms", "weight-only", "hidden-only-both", "hidden-only", "bias-only", "none"])
def test_fast_path_does_no_product_that_no_gradient_needs(requires, options, ndv):
    """2 N D V per pass forward (the masked pass still runs for its metrics), then 2 N D V for each pass's dH and
    each pass's dW that some input needs."""
    n, d, v = 96, 32, 1000
    flops = matrix_flops("fast", "torch", n, d, v, requires=requires, **options)
    assert abs(flops / (n * d * v) - ndv) < 0.01 * ndv, f"{flops / (n * d * v):.3f} N D V, expected {ndv}"


def test_backward_scales_the_stored_gradients_by_the_incoming_one():
    batch = make_batch()

    def hidden_grad(outer):
        hidden = batch["hidden"].detach().clone().requires_grad_()
        loss, _ = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                            batch["advantages"], hidden_masked=batch["hidden_masked"], path="fast")
        outer(loss, hidden).backward()
        return hidden.grad

    plain = hidden_grad(lambda loss, hidden: loss)
    combined = hidden_grad(lambda loss, hidden: -2.5 * loss + hidden.pow(2).sum())
    assert_close("grad of -2.5 loss + |h|^2", combined, -2.5 * plain + 2 * batch["hidden"], rtol=1e-12, atol=1e-14)


def test_a_second_backward_and_a_second_derivative_raise():
    batch = make_batch()
    hidden = batch["hidden"].detach().clone().requires_grad_()
    loss, _ = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                        batch["advantages"], path="fast")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="first backward.*path='per_token'"):
        loss.backward()
    loss, _ = papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                        batch["advantages"], path="fast")
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.pow(2).sum().backward()


def test_auto_takes_the_fast_path_for_training_and_the_per_token_ops_without_grad():
    n, d, v = 64, 16, 500
    assert abs(matrix_flops("auto", "torch", n, d, v) / (n * d * v) - 12) < 0.12
    with torch.no_grad():
        assert abs(matrix_flops("auto", "torch", n, d, v, grad=False) / (n * d * v) - 4) < 0.04


def test_fast_path_under_no_grad_gives_the_training_loss_and_metrics():
    batch = make_batch()
    loss, metrics, _ = run(batch, FULL_CASE, path="fast", backend="torch")
    with torch.no_grad():
        value, no_grad_metrics = papo_loss(
            batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"], batch["advantages"],
            hidden_masked=batch["hidden_masked"], old_logprobs=batch["old_logprobs"],
            ref_logprobs=batch["ref_logprobs"], bias=batch["bias"], beta=0.05, dual_clip=3.0, temperature=0.7,
            perception_kl="exact", gamma=0.3, eta_clean=0.2, eta_masked=0.25, path="fast")
    assert_close("loss", value, loss, rtol=1e-12, atol=1e-14)
    for name in metrics:
        assert_close(name, no_grad_metrics[name], metrics[name], rtol=1e-12, atol=1e-14)


def test_sequence_level_importance_sampling_takes_the_per_token_path():
    batch = make_batch()
    case = dict(FULL_CASE, with_old=True)
    loss, _, grads = run(batch, case, importance_sampling_level="sequence")
    want, _, want_grads = run(batch, case, importance_sampling_level="sequence", path="per_token",
                              backend="reference")
    assert_close("loss", loss, want, rtol=1e-10, atol=1e-12)
    assert_close("grad of hidden", grads["hidden"], want_grads["hidden"], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'"):
        run(batch, case, importance_sampling_level="sequence", path="fast")


def test_an_epilogue_only_the_fast_path_has_takes_the_fast_path_without_grad_too():
    batch = make_batch()
    inputs = (batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"], batch["advantages"])
    with torch.no_grad():
        native, _ = papo_loss(*inputs, hidden_masked=batch["hidden_masked"], backend="native")
        per_token, _ = papo_loss(*inputs, hidden_masked=batch["hidden_masked"], backend="reference")
    assert_close("loss", native, per_token, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="path='per_token' runs the LM-head ops.*got backend='native'"):
        papo_loss(*inputs, backend="native", path="per_token")
    with pytest.raises(ValueError, match="backend='native'.*importance_sampling_level='sequence'"):
        papo_loss(*inputs, backend="native", importance_sampling_level="sequence")
