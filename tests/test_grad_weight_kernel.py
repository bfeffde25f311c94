"""The reduce-add dW kernel (``fast_path/triton_grad_weight.py``) through Triton's interpreter, and its flag.

The interpreter has no TMA reduce-add, so it runs the kernel's pointer fallback: the same
persistent loop over output tiles (three programs here, so each does several tiles), the same
K loop and epilogue, with the accumulator tile loaded, added and stored by its one program.
The flag reaches the fast path's chunk loop and the per-token ops' chunked backward alike.
The TMA variant compiles for sm_90 in tests/test_triton_compile.py; its run is a GPU check.
"""

import pytest
import torch

from papo_kernels import papo_loss
from papo_kernels.fast_path import grad_weight
from papo_kernels.fast_path.grad_weight import GRAD_WEIGHT_VARIABLE, resolve_grad_weight_kernel

from backend_cases import OUTPUTS, assert_close, cast, make_inputs, run_op, upstream_gradients


@pytest.fixture(scope="module")
def kernel():
    from papo_kernels.fast_path import triton_grad_weight

    assert not triton_grad_weight.INTERPRETER_CONFIG.tma
    return triton_grad_weight


# (K rows, V, D): tails in every dimension of the 16 x 16 x 16 tiles, one row, a single tile
SHAPES = [(37, 53, 40), (1, 20, 17), (16, 16, 16), (70, 33, 48)]


@pytest.mark.parametrize("k_rows, vocab_size, dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_kernel_adds_alpha_dz_t_rows_into_the_accumulator(kernel, k_rows, vocab_size, dim, dtype):
    g = torch.Generator().manual_seed(k_rows + vocab_size)
    dz = torch.randn(k_rows, vocab_size, generator=g).to(dtype)
    rows = torch.randn(k_rows, dim, generator=g).to(dtype)
    start = torch.randn(vocab_size, dim, generator=g)
    product = dz.double().T @ rows.double()
    tolerance = dict(rtol=1e-5, atol=1e-5 * k_rows**0.5)

    accumulator = start.clone()
    kernel.accumulate_grad_weight(accumulator, dz, rows, alpha=0.25)
    assert_close("accumulate", accumulator.double(), start.double() + 0.25 * product, **tolerance)
    overwritten = torch.full((vocab_size, dim), float("nan"))
    kernel.accumulate_grad_weight(overwritten, dz, rows, alpha=2.0, accumulate=False)
    assert_close("store", overwritten.double(), 2.0 * product, **tolerance)


def test_the_kernel_is_deterministic_and_writes_only_its_matrix(kernel):
    g = torch.Generator().manual_seed(3)
    dz, rows = torch.randn(40, 50, generator=g), torch.randn(40, 24, generator=g)
    padded = torch.zeros(60, 32)
    view = padded[5:55, 4:28]  # a row stride the matrix does not fill
    results = []
    for _ in range(2):
        view.fill_(1.0)
        kernel.accumulate_grad_weight(view, dz, rows, alpha=0.5)
        results.append(view.clone())
    assert torch.equal(results[0], results[1])
    outside = torch.ones_like(padded, dtype=torch.bool)
    outside[5:55, 4:28] = False
    assert torch.equal(padded[outside], torch.zeros(int(outside.sum())))


def _loss_gradients(**options):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g)
    leaves = dict(hidden=hidden.requires_grad_(),
                  hidden_masked=(hidden.detach() + 0.5 * torch.randn(2, 9, 16, generator=g)).requires_grad_(),
                  weight=(torch.randn(40, 16, generator=g) / 4).requires_grad_())
    loss, _ = papo_loss(leaves["hidden"], leaves["weight"], torch.randint(0, 40, (2, 9), generator=g),
                        torch.ones(2, 9, dtype=torch.bool), torch.randn(2, generator=g),
                        hidden_masked=leaves["hidden_masked"], perception_kl="exact", path="fast", backend="torch",
                        workspace_bytes=5000, **options)  # four tokens a chunk: several reduce-adds per tile
    loss.backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def test_the_chunk_loop_with_the_flag_gives_the_addmm_gradients(monkeypatch):
    want = _loss_gradients()
    monkeypatch.setenv(GRAD_WEIGHT_VARIABLE, "reduce_add")
    got = _loss_gradients()
    for name, value in want.items():
        assert_close(f"grad of {name}", got[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["head_chunks", "triton"], ids=["torch_head", "triton_head"])
def test_the_per_token_ops_with_the_flag_run_the_kernel_and_give_the_addmm_gradients(backend, kernel, monkeypatch):
    """The per-token ops' chunked backward takes its dW product from the fast path's MatrixProducts, flag included."""
    n, v, d = 19, 48, 16
    inputs = cast(make_inputs(n, v, d, bias=True, seed=4), torch.float32)
    upstream = upstream_gradients(n, "perception_kl", OUTPUTS["perception_kl"])
    want = run_op(backend, "perception_kl", inputs, 0.8, upstream, temporary_bytes=4000)[1]
    calls, launch = [], kernel.accumulate_grad_weight

    def counted(grad_weight, dz, rows, alpha=1.0, accumulate=True):
        calls.append(accumulate)
        launch(grad_weight, dz, rows, alpha, accumulate)

    monkeypatch.setattr(kernel, "accumulate_grad_weight", counted)
    monkeypatch.setenv(GRAD_WEIGHT_VARIABLE, "reduce_add")
    got = run_op(backend, "perception_kl", inputs, 0.8, upstream, temporary_bytes=4000)[1]
    # the first chunk writes the accumulator, the later ones add to it (the torch head's budget makes several)
    assert calls[0] is False and all(calls[1:]) and len(calls) >= (2 if backend == "head_chunks" else 1), calls
    for name, value in want.items():
        assert_close(f"grad of {name}", got[name], value, rtol=1e-5, atol=1e-6)


def test_the_flag_is_checked_and_falls_back_to_addmm_with_one_warning(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_grad_weight_kernel(cpu, torch.float32, 40, 16) == "addmm"  # unset: the default
    monkeypatch.setenv(GRAD_WEIGHT_VARIABLE, "cutlass")
    with pytest.raises(ValueError, match=f"{GRAD_WEIGHT_VARIABLE} must be one of .'addmm', 'reduce_add'. .*'cutlass'"):
        resolve_grad_weight_kernel(cpu, torch.float32, 40, 16)
    monkeypatch.setenv(GRAD_WEIGHT_VARIABLE, "reduce_add")
    assert resolve_grad_weight_kernel(cpu, torch.float32, 40, 16) == "reduce_add"  # the interpreter's fallback
    grad_weight._warn_unavailable.cache_clear()
    with pytest.warns(RuntimeWarning, match="cannot run here .*float64.*uses addmm"):
        assert resolve_grad_weight_kernel(cpu, torch.float64, 40, 16) == "addmm"


def test_the_cuda_rules_of_the_reduce_add_kernel():
    rules = grad_weight.cuda_reduce_add_unavailable
    assert rules((9, 0), torch.bfloat16, 152064, 3584) is None and rules((10, 0), torch.float16, 64, 64) is None
    assert "compute capability >= 9.0), this device has 8.0" in rules((8, 0), torch.bfloat16, 152064, 3584)
    assert "half-precision inputs, the weight is torch.float32" in rules((9, 0), torch.float32, 152064, 3584)
    assert "multiples of 8, got V = 151937, D = 3584" in rules((9, 0), torch.bfloat16, 151937, 3584)
