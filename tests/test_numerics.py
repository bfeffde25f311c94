"""Numerics of the torch and triton backends: the error budget per dtype, and the edge cases.

Error budget (STYLE.md): the kernel's error against the float64 truth (the reference run in
float64 on the same, already rounded inputs) is at most ``BUDGET_FACTOR`` times the error of
the reference run at the kernel's dtype, plus ``ATOL[dtype]`` times the scale of the truth.
On CPU the triton backend runs float32 and float16 (the interpreter cannot do bf16 tl.dot);
bfloat16 and realistic shapes run where CUDA is present.
"""

import math

import pytest
import torch

from papo_kernels import backends

from backend_cases import OUTPUTS, assert_within_budget, cast, make_inputs, run_op, triton_device
from backend_cases import upstream_gradients

BUDGET_FACTOR = 4.0
# A few units in the last place of the output's dtype (gradients come back in the input dtype).
ATOL = {torch.float32: 4e-7, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CPU_TRITON_DTYPES = [torch.float32, torch.float16]


def require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def check_budget(backend, op, inputs, dtype, temperature, device=torch.device("cpu")):
    """Runs the op at ``dtype`` on ``backend``, the reference at ``dtype`` and in float64 on the rounded inputs."""
    n = inputs["hidden"].shape[0]
    rounded = cast(cast(inputs, dtype), torch.float64)
    upstream = upstream_gradients(n, op, OUTPUTS[op])
    truth_values, truth_grads = run_op("reference", op, rounded, temperature, upstream)
    torch_values, torch_grads = run_op("reference", op, cast(rounded, dtype, device), temperature, upstream)
    values, grads = run_op(backend, op, cast(rounded, dtype, device), temperature, upstream)
    for name in truth_values:
        assert_within_budget(f"{name} ({dtype})", values[name], torch_values[name], truth_values[name],
                             factor=BUDGET_FACTOR, atol=ATOL[torch.float32])  # outputs are float32
    for name in truth_grads:
        assert_within_budget(f"grad of {name} ({dtype})", grads[name], torch_grads[name], truth_grads[name],
                             factor=BUDGET_FACTOR, atol=ATOL[dtype])
    return values, grads


@pytest.mark.parametrize("op", ["logprobs", "perception_kl"])
@pytest.mark.parametrize("backend,dtype", [("triton", d) for d in CPU_TRITON_DTYPES] + [
    ("torch", d) for d in (torch.float32, torch.float16, torch.bfloat16)], ids=str)
def test_error_budget(backend, dtype, op):
    inputs = make_inputs(37, 203, 40, bias=True, seed=11)
    device = triton_device() if backend == "triton" else torch.device("cpu")
    check_budget(backend, op, inputs, dtype, 0.7, device)


def edge_inputs(case: str, v: int):
    n, d = 24, 32
    if case == "logits_1e4":  # logits spread over about +-1e4
        return make_inputs(n, v, d, bias=True, seed=12, logit_std=4000.0)
    inputs = make_inputs(n, v, d, bias=True, seed=13)
    if case == "all_negative":  # every logit near -1e4
        inputs["bias"] = inputs["bias"] - 1e4
    if case == "uniform":  # identical logits: p = q uniform, H = log V, KL = 0
        inputs["weight"] = torch.zeros_like(inputs["weight"])
        inputs["bias"] = torch.full_like(inputs["bias"], -3.0)
    return inputs


EDGE_CASES = ["logits_1e4", "all_negative", "uniform", "plain"]


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("torch", torch.float32),
                                           ("torch", torch.float64)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.05])
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_stay_finite_and_in_range(backend, dtype, temperature, case):
    v = 211
    inputs = edge_inputs(case, v)
    device = triton_device() if backend == "triton" else torch.device("cpu")
    if dtype == torch.float64:
        n = inputs["hidden"].shape[0]
        upstream = upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"])
        values, grads = run_op(backend, "perception_kl", inputs, temperature, upstream)
        truth, truth_grads = run_op("reference", "perception_kl", inputs, temperature, upstream)
        for name in truth:
            assert torch.allclose(values[name], truth[name], rtol=1e-9, atol=1e-9 * truth[name].abs().max()), name
    else:
        values, grads = check_budget(backend, "perception_kl", inputs, dtype, temperature, device)
    for name, value in {**values, **grads}.items():
        assert torch.isfinite(value).all(), f"{name} has non-finite entries at {(~torch.isfinite(value)).nonzero()}"
    rounding = 1e-5 if dtype == torch.float32 else 1e-12
    log_v = math.log(v)
    for name in ("logprobs", "logprobs_masked"):
        assert (values[name] <= 0).all(), f"{name} > 0: {values[name].max()}"
    for name in ("entropy", "entropy_masked"):
        assert (values[name] >= 0).all(), f"{name} < 0: {values[name].min()}"
        assert (values[name] <= log_v * (1 + rounding)).all(), f"{name} > log V = {log_v}: {values[name].max()}"
    assert (values["kl"] >= -rounding).all(), f"kl < 0 beyond rounding: {values['kl'].min()}"
    if case == "uniform":
        assert torch.allclose(values["entropy"], torch.full_like(values["entropy"], log_v), rtol=rounding, atol=0)
        assert values["kl"].abs().max() <= rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["logprobs", "perception_kl"])
def test_error_budget_on_gpu_at_a_real_shape(dtype, op):
    require_cuda()
    inputs = make_inputs(1000, 32003, 896, bias=False, seed=14)
    check_budget("triton", op, inputs, dtype, 1.0, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_backward_on_gpu_for_every_input(dtype):
    require_cuda()
    inputs = make_inputs(333, 5003, 256, bias=True, seed=15)
    check_budget("triton", "perception_kl", inputs, dtype, 0.7, torch.device("cuda"))


def test_triton_gpu_memory_has_no_logits():
    """Forward and backward of both passes allocate the gradients (float32 buffers and their bf16
    casts) and per-token vectors; the float32 logits of one pass would be 500 MiB."""
    require_cuda()
    n, v, d = 4096, 32003, 1024
    inputs = cast(make_inputs(n, v, d, bias=True, seed=16), torch.bfloat16, torch.device("cuda"))
    leaves = [inputs[name].requires_grad_() for name in ("hidden", "hidden_masked", "weight", "bias")]
    upstream = upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"])
    upstream = [grad.to("cuda", torch.float32) for grad in upstream.values()]
    module = backends.resolve_backend("triton", torch.device("cuda"), torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    outputs = module.linear_perception_kl(*leaves[:3], inputs["tokens"], leaves[3], 1.0)
    torch.autograd.backward(outputs, upstream)
    growth = torch.cuda.max_memory_allocated() - start
    gradient_elements = 2 * n * d + v * d + v
    allowed = gradient_elements * (4 + 2) + 64 * n * 4 + 2**20
    assert growth < allowed, f"peak grew by {growth / 2**20:.0f} MiB, allowed {allowed / 2**20:.0f} MiB"
