"""The torch and triton backends against the reference: values, gradients, gradient subsets, registry.

The torch backend runs in float64 against the float64 reference (same math, other order of summation: tight
tolerances), with a temporaries budget that forces many row and vocabulary chunks; so does its design on CUDA
("head_chunks": library products by chunks of tokens and the fast path's torch epilogue), run here on the CPU. The
triton backend runs in float32 (the interpreter on CPU) and is held to the error-budget rule against the float64
truth, the yardstick being the reference in float32.
"""

import functools
import itertools

import pytest
import torch

import papo_kernels
from papo_kernels import backends
from papo_kernels.backends import torch_chunked
from papo_kernels.backends.torch_chunked import GradientPlan

from backend_cases import INPUTS, OUTPUTS, PAIRED_OUTPUTS, assert_close, assert_within_budget, cast, make_inputs
from backend_cases import run_op, triton_device, upstream_gradients

# (N, V, D): N = 1, sizes that are not powers of two, V not a multiple of any block, D with a tail.
SHAPES = [(1, 50, 24), (37, 203, 40), (20, 97, 17)]
TEMPERATURES = [1.0, 0.6]
OPS = ["logprobs", "perception_kl"]

# float64 against float64: only the order of summation differs.
F64_RTOL, F64_ATOL = 1e-10, 1e-10
# Error budget of float32 kernels: a small multiple of the float32 reference's error, plus a few ulps of the scale.
BUDGET_FACTOR, F32_ATOL = 4.0, 4e-7


def check_float64_against_reference(backend, op, inputs, temperature, upstream, requires_grad=None):
    values, grads = run_op(backend, op, inputs, temperature, upstream, requires_grad)
    ref_values, ref_grads = run_op("reference", op, inputs, temperature, upstream, requires_grad)
    for name in ref_values:
        assert_close(name, values[name], ref_values[name], rtol=F64_RTOL, atol=F64_ATOL)
    for name in ref_grads:
        assert_close(f"grad of {name}", grads[name], ref_grads[name], rtol=F64_RTOL, atol=F64_ATOL)
    return grads


def check_triton_against_reference(op, inputs, temperature, upstream, requires_grad=None):
    truth_values, truth_grads = run_op("reference", op, inputs, temperature, upstream, requires_grad)
    inputs32 = cast(inputs, torch.float32)
    torch_values, torch_grads = run_op("reference", op, inputs32, temperature, upstream, requires_grad)
    values, grads = run_op("triton", op, cast(inputs, torch.float32, triton_device()), temperature, upstream,
                           requires_grad)
    for name in truth_values:
        assert_within_budget(name, values[name], torch_values[name], truth_values[name],
                             factor=BUDGET_FACTOR, atol=F32_ATOL)
    for name in truth_grads:
        assert_within_budget(f"grad of {name}", grads[name], torch_grads[name], truth_grads[name],
                             factor=BUDGET_FACTOR, atol=F32_ATOL)
    return grads


# "head_chunks": the torch backend's design on CUDA (library products by chunks of tokens, the torch epilogue)
CHECKS = {"torch": functools.partial(check_float64_against_reference, "torch"),
          "head_chunks": functools.partial(check_float64_against_reference, "head_chunks"),
          "triton": check_triton_against_reference}


@pytest.mark.parametrize("backend", ["torch", "head_chunks", "triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_values_and_gradients_match_reference(backend, op, shape, bias, temperature):
    n, v, d = shape
    inputs = make_inputs(n, v, d, bias=bias, seed=hash((shape, bias)) % 1000)
    CHECKS[backend](op, inputs, temperature, upstream_gradients(n, op, OUTPUTS[op]))


def nonempty_subsets(names):
    return [subset for size in range(1, len(names) + 1) for subset in itertools.combinations(names, size)]


SUBSET_CASES = [("perception_kl", s) for s in nonempty_subsets(PAIRED_OUTPUTS)] + [
    ("logprobs", s) for s in nonempty_subsets(OUTPUTS["logprobs"])]


@pytest.mark.parametrize("backend", ["torch", "head_chunks", "triton"])
@pytest.mark.parametrize("op,differentiated", SUBSET_CASES, ids=lambda x: "+".join(x) if isinstance(x, tuple) else x)
def test_every_subset_of_differentiated_outputs(backend, op, differentiated):
    """Upstream gradients for some outputs only (None for the rest): gradients still match, and an
    input that no differentiated output depends on gets None, as from the reference."""
    n, v, d = 20, 97, 17
    inputs = make_inputs(n, v, d, bias=True, seed=3)
    CHECKS[backend](op, inputs, 0.8, upstream_gradients(n, op, differentiated))


REQUIRES_GRAD_CASES = [("hidden",), ("weight",), ("bias",), ("hidden_masked",), ("weight", "bias"),
                       ("hidden", "hidden_masked")]


@pytest.mark.parametrize("backend", ["torch", "head_chunks", "triton"])
@pytest.mark.parametrize("requires_grad", REQUIRES_GRAD_CASES, ids="+".join)
def test_inputs_without_requires_grad_get_none(backend, requires_grad):
    n, v, d = 20, 97, 17
    inputs = make_inputs(n, v, d, bias=True, seed=4)
    op = "perception_kl"
    grads = CHECKS[backend](op, inputs, 1.0, upstream_gradients(n, op, PAIRED_OUTPUTS), set(requires_grad))
    for name in INPUTS[op]:
        assert (grads[name] is not None) == (name in requires_grad), f"{name}: grad is {grads[name]}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_op_matches_the_clean_half_of_the_paired_op(backend):
    n, v, d = 37, 203, 40
    inputs = make_inputs(n, v, d, bias=True, seed=5)
    if backend == "triton":
        inputs = cast(inputs, torch.float32, triton_device())
    names = ("logprobs", "entropy")
    single, single_grads = run_op(backend, "logprobs", inputs, 0.9, upstream_gradients(n, "logprobs", names))
    paired, paired_grads = run_op(backend, "perception_kl", inputs, 0.9, upstream_gradients(n, "perception_kl", names))
    # the same operations on the same data; compiled code may still contract them differently
    for name in names:
        assert_close(name, single[name], paired[name], rtol=1e-6, atol=1e-6)
    for name in ("hidden", "weight", "bias"):
        assert_close(f"grad of {name}", single_grads[name], paired_grads[name], rtol=1e-6, atol=1e-6)
    assert paired_grads["hidden_masked"] is None


def plan(grads_present, needs=(True, True, True)):
    grads = tuple(object() if name in grads_present else None for name in PAIRED_OUTPUTS)
    return GradientPlan.make(grads, *needs)


def test_backward_plan_does_only_the_work_asked_for():
    only_clean = plan({"logprobs", "entropy"})
    assert (only_clean.clean_dz, only_clean.masked_dz, only_clean.masked_logits) == (True, False, False)
    only_masked = plan({"entropy_masked"})
    assert (only_masked.clean_dz, only_masked.clean_logits, only_masked.masked_dz) == (False, False, True)
    kl_only = plan({"kl"})
    assert kl_only.clean_dz and kl_only.masked_dz and kl_only.clean_logits and kl_only.masked_logits
    # KL differentiated but only hidden wants a gradient: no dz~, yet log q is needed for dz
    kl_clean_input = plan({"kl"}, needs=(True, False, False))
    assert (kl_clean_input.clean_dz, kl_clean_input.masked_dz, kl_clean_input.masked_logits) == (True, False, True)
    nothing = plan(set(PAIRED_OUTPUTS), needs=(False, False, False))
    assert not (nothing.clean_dz or nothing.masked_dz or nothing.clean_logits or nothing.masked_logits)


def test_registry_lists_the_backends_and_auto_picks_torch_on_cpu():
    assert papo_kernels.BACKENDS == ("auto", "reference", "torch", "triton")
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32) is torch_chunked


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_triton_interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton'.*CUDA tensors.*TRITON_INTERPRET=1.*got tensors on cpu"):
        backends.resolve_backend("triton", torch.device("cpu"), torch.float32)


def test_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_triton_importable", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs the triton package.*'torch'"):
        backends.resolve_backend("triton", torch.device("cpu"), torch.float32)
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32) is torch_chunked


def test_triton_rejects_float64_with_a_clear_error():
    inputs = make_inputs(4, 40, 16, bias=False)
    with pytest.raises(ValueError, match=r"backend='triton'.*float64.*backend='torch'"):
        papo_kernels.linear_logprobs(inputs["hidden"].to(triton_device()), inputs["weight"].to(triton_device()),
                                     inputs["tokens"].to(triton_device()), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_ops_with_batch_dims_and_strided_views(backend):
    """(B, T, D) inputs that are views with unit stride only along D, through the public functions."""
    b, t, v, d = 3, 7, 75, 24
    inputs = make_inputs(b * 2 * t, v, d, bias=True, seed=6)
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = triton_device() if backend == "triton" else torch.device("cpu")
    hidden = inputs["hidden"].to(device, dtype).reshape(b, 2 * t, d)[:, ::2]  # row stride 2 D
    hidden_masked = inputs["hidden_masked"].to(device, dtype).reshape(b, 2 * t, d)[:, 1::2]
    weight = inputs["weight"].to(device, dtype)
    padded = torch.zeros(v, d + 8, dtype=dtype, device=device)
    padded[:, :d] = weight
    weight_view = padded[:, :d]  # row stride d + 8
    bias, tokens = inputs["bias"].to(device, dtype), inputs["tokens"].reshape(b, 2 * t)[:, ::2].to(device)
    assert not hidden.is_contiguous() and not weight_view.is_contiguous()
    kwargs = dict(bias=bias, temperature=0.8)
    got = papo_kernels.linear_perception_kl(hidden, hidden_masked, weight_view, tokens, backend=backend, **kwargs)
    want = papo_kernels.linear_perception_kl(hidden.contiguous(), hidden_masked.contiguous(), weight, tokens,
                                             backend="reference", **kwargs)
    rtol = F64_RTOL if dtype == torch.float64 else 1e-5
    for name, a, e in zip(PAIRED_OUTPUTS, got, want):
        assert a.shape == (b, t)
        assert_close(name, a.cpu().double(), e.cpu().double(), rtol=rtol, atol=rtol)
    single = papo_kernels.linear_logprobs(hidden, weight_view, tokens, backend=backend, **kwargs)
    for name, a, e in zip(("logprobs", "entropy"), single, (want.logprobs, want.entropy)):
        assert_close(name, a.cpu().double(), e.cpu().double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", ["torch", "head_chunks", "triton"])
def test_empty_batch(backend):
    inputs = make_inputs(0, 30, 16, bias=True)
    grads = CHECKS[backend]("perception_kl", inputs, 1.0, upstream_gradients(0, "perception_kl", PAIRED_OUTPUTS))
    assert grads["weight"].shape == (30, 16) and not grads["weight"].any()


def test_auto_on_cuda_sends_float64_to_the_torch_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    inputs = cast(make_inputs(5, 40, 16, bias=False), torch.float64, torch.device("cuda"))
    got = papo_kernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["tokens"], backend="auto")
    want = papo_kernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["tokens"], backend="reference")
    for name, a, e in zip(("logprobs", "entropy"), got, want):
        assert_close(name, a.cpu(), e.cpu(), rtol=F64_RTOL, atol=F64_ATOL)


def test_triton_interpreter_rejects_bfloat16_with_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a CUDA device")
    inputs = cast(make_inputs(4, 40, 16, bias=False), torch.bfloat16)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*bfloat16.*backend='torch'"):
        papo_kernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["tokens"], backend="triton")


def test_auto_picks_triton_for_cuda_half_and_float32_and_torch_for_float64():
    cuda = torch.device("cuda")
    triton_backend = backends.resolve_backend("triton", torch.device("cpu"), torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert backends.resolve_backend("auto", cuda, dtype) is triton_backend
    assert backends.resolve_backend("auto", cuda, torch.float64) is torch_chunked
