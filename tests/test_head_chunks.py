"""The per-token ops by chunks on library products and an epilogue (backends/head_chunks.py), on the CPU.

The torch head (what the torch backend runs on CUDA; "head_chunks" in backend_cases) in float64 against the float64
reference at either end of the chunk sizes: the same math in another order, so tight tolerances. test_backends.py
runs every option at a budget in between, and holds the Triton head, as the triton backend, to the float32 error
budget at the interpreter's blocks; here it runs at the sm_80 and sm_90 configs in float16 as well. Matrix work:
2 N D V per pass forward, 6 N D V per pass backward, no product that no gradient needs. A float16 dZ at gradients of
order 1e-9, by the fast path's switch (``FastPathOptions.dz_dtype``) and its scaling (``fast_path/half_dz.py``).
"""

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from papo_kernels.backends import head_chunks
from papo_kernels.fast_path import FastPathOptions

from backend_cases import OUTPUTS, assert_close, assert_within_budget, cast, make_inputs, run_op
from backend_cases import upstream_gradients

F64_RTOL, F64_ATOL = 1e-10, 1e-10


@pytest.mark.parametrize("op", ["logprobs", "perception_kl"])
@pytest.mark.parametrize("bias, temperature", [(False, 1.0), (True, 0.6)], ids=["plain", "bias_tau0.6"])
@pytest.mark.parametrize("workspace_bytes", [4096, 2**20], ids=["a_chunk_per_token", "one_chunk"])
def test_float64_at_either_end_of_the_chunk_sizes(op, bias, temperature, workspace_bytes):
    """(test_backends.py runs the same checks at a budget in between, over every option.)"""
    n, v, d = 37, 203, 40
    values, grads = run_op("head_chunks", op, make_inputs(n, v, d, bias=bias, seed=n + v), temperature,
                           upstream_gradients(n, op, OUTPUTS[op]), temporary_bytes=workspace_bytes)
    ref_values, ref_grads = run_op("reference", op, make_inputs(n, v, d, bias=bias, seed=n + v), temperature,
                                   upstream_gradients(n, op, OUTPUTS[op]))
    for name in ref_values:
        assert_close(name, values[name], ref_values[name], rtol=F64_RTOL, atol=F64_ATOL)
    for name in ref_grads:
        assert_close(f"grad of {name}", grads[name], ref_grads[name], rtol=F64_RTOL, atol=F64_ATOL)


def test_a_second_backward_through_the_same_graph():
    """Only inputs are saved: unlike the fast path, the ops' graph can be differentiated twice."""
    n, v, d = 9, 40, 16
    inputs = make_inputs(n, v, d, bias=False, seed=5)
    hidden = inputs["hidden"].clone().requires_grad_()
    options = head_chunks.head_options(head_chunks.TORCH_HEAD, 1.0, 4096)
    logprobs, entropy = head_chunks.linear_logprobs(hidden, inputs["weight"], inputs["tokens"], None, options)
    (logprobs.sum() + entropy.sum()).backward(retain_graph=True)
    first = hidden.grad.clone()
    (logprobs.sum() + entropy.sum()).backward()
    assert_close("second backward", hidden.grad, 2 * first, rtol=F64_RTOL, atol=F64_ATOL)


@pytest.mark.parametrize("requires, ndv", [
    (("hidden", "hidden_masked", "weight"), 16),  # per pass: 2 forward; 2 recomputed, 2 dh, 2 dW
    (("hidden", "weight"), 14),  # no dh~ product (the weight still takes both passes' dZ)
    (("hidden",), 10),  # both passes recomputed (the KL's dz needs log q), dh of the clean rows only
    ((), 4),  # forward only
], ids=["all", "no-masked-input", "hidden-only", "forward-only"])
def test_matrix_work(requires, ndv):
    n, v, d = 64, 300, 32
    inputs = make_inputs(n, v, d, bias=False, seed=6)
    upstream = upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"])
    with FlopCounterMode(display=False) as counter:
        run_op("head_chunks", "perception_kl", inputs, 1.0, upstream, set(requires), temporary_bytes=2**16)
    assert counter.get_total_flops() == ndv * n * d * v, counter.get_total_flops() / (n * d * v)


@pytest.mark.parametrize("capability", [8, 9], ids=["sm80", "sm90"])
def test_triton_head_at_the_cuda_configs_in_float16(capability):
    """The triton backend with the sm_80 and sm_90 configs forced (the interpreter runs them; sm_90 loads through
    tensor descriptors), forward and chunked backward, within the error budget of tests/test_numerics.py."""
    if torch.cuda.is_available():
        pytest.skip("forces a CUDA config under the interpreter, which runs only without a CUDA device")
    from papo_kernels.backends._triton_utils import forced_capability

    n, v, d = 37, 208, 40
    rounded = cast(cast(make_inputs(n, v, d, bias=True, seed=12), torch.float16), torch.float64)
    upstream = upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"])
    truth = run_op("reference", "perception_kl", rounded, 0.7, upstream)
    same_dtype = run_op("reference", "perception_kl", cast(rounded, torch.float16), 0.7, upstream)
    with forced_capability(capability):
        kernel = run_op("triton", "perception_kl", cast(rounded, torch.float16), 0.7, upstream)
    for name in truth[0]:
        assert_within_budget(name, kernel[0][name], same_dtype[0][name], truth[0][name], factor=4.0, atol=4e-7)
    for name in truth[1]:
        assert_within_budget(f"grad of {name}", kernel[1][name], same_dtype[1][name], truth[1][name], factor=4.0,
                             atol=2e-3)


@pytest.mark.parametrize("backend", ["head_chunks", "triton"], ids=["torch_head", "triton_head"])
def test_a_float16_dz_keeps_gradients_of_order_1e9(backend, monkeypatch):
    """float32 inputs, dZ forced into float16 (the fast path's test switch, which reaches this loop through
    ``head_options``), upstream gradients of order 1e-9 as papo_loss's 1/N gives them: every gradient within the
    float16 error budget of float64 (an unscaled float16 dZ flushes most of them to zero)."""
    monkeypatch.setattr(head_chunks, "FastPathOptions", functools.partial(FastPathOptions, dz_dtype=torch.float16))
    n, v, d = 21, 70, 24
    inputs = make_inputs(n, v, d, bias=True, seed=21)
    upstream = {name: 1e-9 * g for name, g in upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"]).items()}
    truth = run_op("reference", "perception_kl", inputs, 0.7, upstream)[1]
    same_dtype = run_op("reference", "perception_kl", cast(inputs, torch.float32), 0.7, upstream)[1]
    kernel = run_op(backend, "perception_kl", cast(inputs, torch.float32), 0.7, upstream, temporary_bytes=3000)[1]
    assert 1e-10 < float(truth["hidden"].abs().max()) < 1e-8
    for name, value in truth.items():
        assert_within_budget(f"grad of {name}", kernel[name], same_dtype[name], value, factor=4.0, atol=2e-3,
                             scale_to_truth=True)


@pytest.mark.parametrize("poisoned, kept", [("hidden", "hidden_masked"), ("hidden_masked", "hidden")])
@pytest.mark.parametrize("backend", ["head_chunks", "triton"], ids=["torch_head", "triton_head"])
def test_a_nan_in_one_pass_stays_out_of_the_other_pass_without_a_kl_gradient(backend, poisoned, kept):
    """Both passes' entropies and log-probs take gradients and the KL none: each pass's dZ reads only its own pass,
    so a NaN row of one pass (given for its metrics, say) leaves the other pass's hidden gradient finite and equal to
    the clean run's (the coupling KL term must not enter as 0 x NaN)."""
    n, v, d = 11, 40, 16
    inputs = cast(make_inputs(n, v, d, bias=True, seed=11), torch.float32)
    upstream = upstream_gradients(n, "perception_kl", ("logprobs", "entropy", "logprobs_masked", "entropy_masked"))
    clean = run_op(backend, "perception_kl", inputs, 0.8, upstream, temporary_bytes=3000)[1]
    nan_inputs = dict(inputs, **{poisoned: inputs[poisoned].clone()})
    nan_inputs[poisoned][3] = float("nan")
    grads = run_op(backend, "perception_kl", nan_inputs, 0.8, upstream, temporary_bytes=3000)[1]
    assert grads[poisoned].isnan().any()
    assert torch.equal(grads[kept], clean[kept])
