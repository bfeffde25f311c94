"""What the package guarantees on hostile input: nothing leaks from masked positions, numbers are validated one way,
autocast changes nothing, and a second derivative through a fused backward raises instead of being wrong."""

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from papo_kernels import PAPOLoss, linear_logprobs, linear_perception_kl, papo_loss

from backend_cases import triton_device

REPOSITORY = Path(__file__).resolve().parents[1]
B, T, D, V = 3, 6, 8, 29
PATHS = [("fast", "native"), ("fast", "torch"), ("fast", "triton"), ("per_token", "torch"), ("per_token", "triton"),
         ("per_token", "reference")]


def make_batch(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, D, generator=g)
    batch = dict(
        hidden=hidden, hidden_masked=hidden + 0.5 * torch.randn(B, T, D, generator=g),
        weight=torch.randn(V, D, generator=g) / D**0.5, bias=torch.randn(V, generator=g) / 4,
        completion_ids=torch.randint(0, V, (B, T), generator=g), completion_mask=torch.ones(B, T),
        advantages=torch.randn(B, T, generator=g), old_logprobs=-torch.rand(B, T, generator=g) * 3,
        ref_logprobs=-torch.rand(B, T, generator=g) * 3, policy_weights=torch.rand(B, T, generator=g) + 0.5,
    )
    batch["completion_mask"][0, 4:] = 0
    batch["completion_mask"][1, 1:] = 0
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in batch.items()}


def loss_and_grads(batch, path, backend, forward_context=contextlib.nullcontext, **options):
    leaves = {name: batch[name].detach().clone().requires_grad_()
              for name in ("hidden", "hidden_masked", "weight", "bias")}
    with forward_context():
        loss, metrics = papo_loss(leaves["hidden"], leaves["weight"], batch["completion_ids"],
                                  batch["completion_mask"], batch["advantages"], hidden_masked=leaves["hidden_masked"],
                                  bias=leaves["bias"], old_logprobs=batch["old_logprobs"],
                                  ref_logprobs=batch["ref_logprobs"], policy_weights=batch["policy_weights"],
                                  beta=0.02, perception_kl="exact", path=path, backend=backend, **options)
    loss.backward()
    return loss.detach(), metrics, {name: leaf.grad for name, leaf in leaves.items()}


def assert_nothing_changed(poisoned, clean):
    """The same loss, metrics and finite gradients, bit for bit, as the run with clean masked positions."""
    assert torch.equal(poisoned[0], clean[0]), f"loss {poisoned[0]} != {clean[0]}"
    for metric, clean_value in clean[1].items():
        assert torch.equal(poisoned[1][metric], clean_value), metric
    for input_name, clean_grad in clean[2].items():
        assert torch.isfinite(poisoned[2][input_name]).all(), f"non-finite gradient of {input_name}"
        assert torch.equal(poisoned[2][input_name], clean_grad), f"gradient of {input_name} changed"


POISONS = {
    "nan advantages": ("advantages", float("nan")),
    "inf advantages": ("advantages", float("inf")),
    "nan hidden": ("hidden", float("nan")),
    "inf hidden_masked": ("hidden_masked", float("-inf")),
    "-inf old_logprobs": ("old_logprobs", float("-inf")),
    "nan ref_logprobs": ("ref_logprobs", float("nan")),
    "inf policy_weights": ("policy_weights", float("inf")),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("path, backend", PATHS, ids=str)
def test_non_finite_values_at_masked_positions_change_nothing(path, backend, poison):
    device = triton_device() if backend == "triton" else "cpu"
    batch = make_batch(device=device)
    batch["completion_ids"][0, 4:] = -100  # padding ids too
    clean = loss_and_grads(batch, path, backend)
    name, value = POISONS[poison]
    off = (batch["completion_mask"] == 0).to(device)
    batch[name] = batch[name].masked_fill(off[..., None] if batch[name].dim() == 3 else off, value)
    poisoned = loss_and_grads(batch, path, backend)
    assert_nothing_changed(poisoned, clean)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("path, backend", PATHS, ids=str)
def test_non_finite_masked_logprobs_at_masked_positions_change_nothing(path, backend, value):
    """The authors' detached masked pass (masked_logprobs instead of hidden_masked)."""
    device = triton_device() if backend == "triton" else "cpu"
    batch = make_batch(device=device)
    leaves = {name: batch[name].detach().clone().requires_grad_() for name in ("hidden", "weight")}

    def loss_and_grads_with(masked_logprobs):
        for leaf in leaves.values():
            leaf.grad = None
        loss, metrics = papo_loss(leaves["hidden"], leaves["weight"], batch["completion_ids"],
                                  batch["completion_mask"], batch["advantages"], masked_logprobs=masked_logprobs,
                                  old_logprobs=batch["old_logprobs"], gamma=0.05, path=path, backend=backend)
        loss.backward()
        return loss.detach(), metrics, {name: leaf.grad.clone() for name, leaf in leaves.items()}

    clean = loss_and_grads_with(batch["old_logprobs"] - 0.1)
    off = batch["completion_mask"] == 0
    poisoned = loss_and_grads_with((batch["old_logprobs"] - 0.1).masked_fill(off, value))
    assert_nothing_changed(poisoned, clean)


def test_masked_rows_get_zero_gradient():
    batch = make_batch()
    _, _, grads = loss_and_grads(batch, "fast", "torch")
    off = batch["completion_mask"] == 0
    assert grads["hidden"][off].abs().max() == 0 and grads["hidden_masked"][off].abs().max() == 0


def call_with(**changes):
    batch = make_batch()
    positional = {name: changes.pop(name, batch[name]) for name in
                  ("hidden", "weight", "completion_ids", "completion_mask", "advantages")}
    return papo_loss(*positional.values(), **changes)


BAD_NUMBERS = [
    # (what, changes, exception, words the message must hold)
    ("negative num_items_in_batch tensor", dict(num_items_in_batch=torch.tensor(-4.0)), ValueError,
     ["num_items_in_batch", "-4.0", "(0.0, inf)"]),
    ("nan num_items_in_batch tensor", dict(num_items_in_batch=torch.tensor(float("nan"))), ValueError,
     ["num_items_in_batch", "nan"]),
    ("zero num_items_in_batch", dict(num_items_in_batch=0), ValueError, ["num_items_in_batch", "0.0"]),
    ("zero num_items_in_batch tensor", dict(num_items_in_batch=torch.zeros(1)), ValueError,
     ["num_items_in_batch", "0.0"]),
    ("bool num_items_in_batch tensor", dict(num_items_in_batch=torch.tensor(True)), TypeError,
     ["num_items_in_batch", "torch.bool"]),
    ("inf gamma", dict(gamma=float("inf")), ValueError, ["gamma", "inf"]),
    ("temperature below float32", dict(temperature=1e-46), ValueError, ["temperature must lie in [1.175e-38",
                                                                         "got 1e-46"]),
    ("num_items_in_batch below float32", dict(num_items_in_batch=1e-300), ValueError,
     ["num_items_in_batch must lie in", "got 1e-300"]),
    ("epsilon_high above float32", dict(epsilon_high=1e300), ValueError, ["epsilon_high must be at most 3.403e+38",
                                                                          "got 1e+300"]),
    ("numpy nan temperature", dict(temperature=np.float32("nan")), ValueError, ["temperature", "nan"]),
    ("dr_grpo length below the longest response", dict(loss_type="dr_grpo", max_completion_length=4), ValueError,
     ["max_completion_length", "longest response (6 tokens", "got 4"]),
    ("numpy float max_completion_length", dict(loss_type="dr_grpo", max_completion_length=np.float64(8.0)),
     TypeError, ["max_completion_length must be an int", "8.0"]),
    ("zero max_completion_length", dict(loss_type="dr_grpo", max_completion_length=np.int64(0)), ValueError,
     ["max_completion_length must be an int in [1, 9007199254740992]", "got 0"]),
    ("max_completion_length beyond float", dict(loss_type="dr_grpo", max_completion_length=10**400), ValueError,
     ["max_completion_length must be an int in [1, 9007199254740992]", "got an int of about 10**400"]),
    ("max_completion_length of another loss type", dict(max_completion_length="7"), TypeError,
     ["max_completion_length must be an int", "'7'"]),
    ("-inf bias entry", dict(bias=torch.zeros(V).index_fill(0, torch.tensor([3]), float("-inf"))), ValueError,
     ["bias must hold finite numbers, got -inf at id 3", "say -1e4"]),
    ("nan bias entry", dict(bias=torch.zeros(V).index_fill(0, torch.tensor([28]), float("nan"))), ValueError,
     ["bias must hold finite numbers, got nan at id 28"]),
    ("half mask", dict(completion_mask=torch.full((B, T), 0.5)), ValueError, ["completion_mask", "0.5"]),
    ("negative mask", dict(completion_mask=-torch.ones(B, T)), ValueError, ["completion_mask", "-1.0"]),
    ("nan mask", dict(completion_mask=torch.full((B, T), float("nan"))), ValueError, ["completion_mask", "nan"]),
    ("unknown path", dict(path="fused"), ValueError, ["path", "'fused'", "'per_token'"]),
    ("fast path with the reference", dict(path="fast", backend="reference"), ValueError, ["path='fast'", "reference"]),
    ("zero workspace", dict(workspace_bytes=0), ValueError, ["workspace_bytes", "0"]),
    ("policy_weights shape", dict(policy_weights=torch.ones(B)), ValueError, ["policy_weights", f"({B},)"]),
    ("unknown importance level", dict(importance_sampling_level="group"), ValueError,
     ["importance_sampling_level", "'group'", "'sequence'"]),
]


@pytest.mark.parametrize("what, changes, error, words", BAD_NUMBERS, ids=[case[0] for case in BAD_NUMBERS])
def test_bad_numbers_and_masks_are_rejected(what, changes, error, words):
    with pytest.raises(error) as raised:
        call_with(**changes)
    for word in words:
        assert word in str(raised.value), f"{what}: {word!r} not in {str(raised.value)!r}"


NUMBER_SETTINGS = ["temperature", "epsilon_low", "epsilon_high", "dual_clip", "beta", "gamma", "eta_clean",
                   "eta_masked", "num_items_in_batch", "workspace_bytes"]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("name", NUMBER_SETTINGS)
def test_an_int_beyond_float_is_a_clear_error_naming_the_setting(name, sign):
    """10**400 is a Python int that float() cannot hold: a ValueError naming the setting, in papo_loss and in
    PAPOLoss's constructor alike, not an OverflowError naming nothing."""
    for call in (lambda: call_with(**{name: sign * 10**400}), lambda: PAPOLoss(**{name: sign * 10**400})):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number in .*, got "
                                             f"{'-' if sign < 0 else ''}an int of about 10\\*\\*400, beyond"):
            call()


def test_the_lm_head_ops_refuse_a_non_finite_bias():
    batch = make_batch()
    bias = batch["bias"].index_fill(0, torch.tensor([5]), float("-inf"))
    with pytest.raises(ValueError, match="bias must hold finite numbers, got -inf at id 5"):
        linear_logprobs(batch["hidden"], batch["weight"], batch["completion_ids"], bias=bias)
    with pytest.raises(ValueError, match="bias must hold finite numbers, got -inf at id 5"):
        linear_perception_kl(batch["hidden"], batch["hidden_masked"], batch["weight"], batch["completion_ids"],
                             bias=bias)


def test_a_bias_far_below_the_logits_is_a_token_never_drawn_with_finite_statistics():
    """What the refusal of -inf points to: -1e4 gives the token probability 0 and every statistic finite, on every
    path and backend."""
    batch = make_batch()
    batch["bias"] = batch["bias"].index_fill(0, torch.tensor([3]), -1e4)
    batch["completion_ids"] = batch["completion_ids"].where(batch["completion_ids"] != 3, 4)
    for path, backend in PATHS:
        loss, metrics, grads = loss_and_grads(make_device_batch(batch, backend), path, backend)
        assert torch.isfinite(loss) and all(torch.isfinite(value) for value in metrics.values()), (path, backend)
        assert all(torch.isfinite(grad).all() for grad in grads.values()), (path, backend)
        assert grads["bias"][3] == 0, "a token of probability 0 gets no bias gradient"


def make_device_batch(batch, backend):
    device = triton_device() if backend == "triton" else "cpu"
    return {name: value.to(device) for name, value in batch.items()}


def test_numpy_scalars_and_one_element_tensors_are_numbers_like_python_floats():
    plain, _ = call_with(gamma=0.02, temperature=0.8, num_items_in_batch=11, epsilon_high=0.3)
    numpy, _ = call_with(gamma=np.float32(0.02), temperature=np.float64(0.8), num_items_in_batch=np.int64(11),
                         epsilon_high=np.float16(0.3))
    tensors, _ = call_with(gamma=torch.tensor(0.02), temperature=torch.tensor([0.8]),
                           num_items_in_batch=torch.tensor(11), epsilon_high=torch.tensor(0.3, dtype=torch.float64))
    # the same values once rounded to Python floats: np.float32(0.02) is not 0.02
    expected, _ = call_with(gamma=float(np.float32(0.02)), temperature=0.8, num_items_in_batch=11,
                            epsilon_high=float(np.float16(0.3)))
    assert torch.equal(numpy, expected)
    expected, _ = call_with(gamma=float(torch.tensor(0.02)), temperature=float(torch.tensor(0.8)),
                            num_items_in_batch=11, epsilon_high=0.3)
    assert torch.equal(tensors, expected)
    assert plain.isfinite()


def test_papo_loss_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"temperature must be a finite number in \(0.0, inf\), got -1.0"):
        PAPOLoss(temperature=-1)
    with pytest.raises(ValueError, match="loss_type"):
        PAPOLoss.from_preset("papo_d", loss_type="token_mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        PAPOLoss(loss_type="dr_grpo")
    # path and backend go together whatever the grad mode, so they are checked here too
    with pytest.raises(ValueError, match="path='fast' computes with an epilogue.*got backend='reference'"):
        PAPOLoss(path="fast", backend="reference")
    with pytest.raises(ValueError, match="path='per_token' runs the LM-head ops.*got backend='native'"):
        PAPOLoss(path="per_token", backend="native")
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' couples"):
        PAPOLoss(path="fast", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' couples"):
        PAPOLoss(backend="native", importance_sampling_level="sequence")
    PAPOLoss(importance_sampling_level="sequence")  # auto takes the per-token path for it


def test_integer_settings_take_numpy_and_one_element_tensors():
    plain, _ = call_with(loss_type="dr_grpo", max_completion_length=8)
    for value in (np.int64(8), torch.tensor(8), torch.tensor([8], dtype=torch.int32)):
        other, _ = call_with(loss_type="dr_grpo", max_completion_length=value)
        assert torch.equal(other, plain), value
    with pytest.raises(TypeError, match="max_completion_length must be an int or a one-element integer tensor"):
        call_with(loss_type="dr_grpo", max_completion_length=torch.tensor(8.0))


def test_meta_tensors_get_a_clear_error():
    meta = {name: value.to("meta") for name, value in make_batch().items()}
    with pytest.raises(ValueError, match="hidden is on the meta device"):
        papo_loss(meta["hidden"], meta["weight"], meta["completion_ids"], meta["completion_mask"], meta["advantages"])
    with pytest.raises(ValueError, match="hidden is on the meta device"):
        linear_logprobs(meta["hidden"], meta["weight"], meta["completion_ids"])


AUTOCAST_CASES = [("fast", "native"), ("fast", "torch"), ("fast", "triton"), ("per_token", "torch"),
                  ("per_token", "reference")]
BFLOAT16_AUTOCAST = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("path, backend", AUTOCAST_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_changes_nothing(path, backend, dtype):
    """A forward under CPU autocast to bfloat16 (what trainers turn on), then backward, equals the same without it."""
    batch = make_batch(dtype=dtype)
    plain = loss_and_grads(batch, path, backend)
    autocast = loss_and_grads(batch, path, backend, BFLOAT16_AUTOCAST)
    assert autocast[0].dtype == torch.float32
    assert torch.equal(autocast[0], plain[0])
    for name in plain[2]:
        assert torch.equal(autocast[2][name], plain[2][name]), f"gradient of {name} changed under autocast"


@pytest.mark.parametrize("path", ["fast", "per_token"])
def test_fused_backwards_ignore_autocast(path):
    """The fused backwards turn autocast off themselves: a backward inside the autocast region changes nothing."""
    batch = make_batch()
    plain = loss_and_grads(batch, path, "torch")
    with BFLOAT16_AUTOCAST():
        inside = loss_and_grads(batch, path, "torch")
    for name in plain[2]:
        assert torch.equal(inside[2][name], plain[2][name]), f"gradient of {name} changed under autocast"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_leaves_the_ops_in_float32(backend):
    batch = make_batch()
    hidden, weight, tokens = batch["hidden"], batch["weight"], batch["completion_ids"]
    plain = linear_perception_kl(hidden, batch["hidden_masked"], weight, tokens, backend=backend)
    with BFLOAT16_AUTOCAST():
        autocast = linear_perception_kl(hidden, batch["hidden_masked"], weight, tokens, backend=backend)
        single = linear_logprobs(hidden, weight, tokens, backend=backend)
    for name, value in plain._asdict().items():
        assert getattr(autocast, name).dtype == torch.float32 and torch.equal(getattr(autocast, name), value), name
    assert single.logprobs.dtype == torch.float32


def differentiate_again(penalty, hidden, weight, form):
    """Each way a user asks for a second derivative: every leaf, or one named input."""
    if form == "backward":
        penalty.backward()
    elif form == "backward_inputs_weight":
        penalty.backward(inputs=[weight])
    elif form == "grad_weight":
        torch.autograd.grad(penalty, weight, allow_unused=True)
    else:
        torch.autograd.grad(penalty, hidden, allow_unused=True)


SECOND_DERIVATIVE_FORMS = ["backward", "backward_inputs_weight", "grad_weight", "grad_hidden"]


@pytest.mark.parametrize("form", SECOND_DERIVATIVE_FORMS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["logprobs", "perception_kl"])
def test_second_derivatives_through_fused_backwards_raise(backend, op, form):
    device = triton_device() if backend == "triton" else "cpu"
    batch = make_batch(device=device)
    hidden = batch["hidden"].detach().clone().requires_grad_()
    weight = batch["weight"].detach().clone().requires_grad_()
    if op == "logprobs":
        outputs = linear_logprobs(hidden, weight, batch["completion_ids"], backend=backend)
    else:
        outputs = linear_perception_kl(hidden, batch["hidden_masked"], weight, batch["completion_ids"],
                                       backend=backend)
    (grad,) = torch.autograd.grad(sum(out.sum() for out in outputs), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{'linear_' + op} \\({backend} backend\\) has no second derivative"):
        differentiate_again(grad.pow(2).sum(), hidden, weight, form)


@pytest.mark.parametrize("form", SECOND_DERIVATIVE_FORMS)
def test_second_derivatives_through_the_fast_path_raise(form):
    batch = make_batch()
    hidden = batch["hidden"].detach().clone().requires_grad_()
    weight = batch["weight"].detach().clone().requires_grad_()
    loss, _ = papo_loss(hidden, weight, batch["completion_ids"], batch["completion_mask"], batch["advantages"],
                        hidden_masked=batch["hidden_masked"], path="fast")
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match=r"papo_loss \(fast path\) has no second derivative"):
        differentiate_again(grad.pow(2).sum(), hidden, weight, form)


def test_second_derivatives_through_the_reference_are_exact():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    hidden_masked = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (4,), generator=g)

    def outputs(h, hm, w):
        return tuple(linear_perception_kl(h, hm, w, tokens, backend="reference"))

    assert torch.autograd.gradgradcheck(outputs, (hidden, hidden_masked, weight))


BROKEN_TRITON = """
import warnings
import torch
from papo_kernels.backends import resolve_backend
from papo_kernels.fast_path import resolve_epilogue

cuda = torch.device("cuda")  # only resolved, never touched: this needs no GPU
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = [resolve_backend("auto", cuda, torch.bfloat16).__name__.rsplit(".", 1)[-1],
             resolve_epilogue("auto", cuda, torch.bfloat16).NAME]
print(names, len(caught), str(caught[0].message).split(",")[0])
"""


def test_a_triton_install_that_raises_at_import_makes_auto_fall_back(tmp_path):
    """A broken install raises more than ImportError (here a RuntimeError, as a missing driver library gives): auto
    runs the torch code with its one warning, as where triton is missing, instead of raising on CUDA tensors."""
    package = tmp_path / "triton"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("simulated broken install: libcuda.so.1 not found")\n')
    path = os.pathsep.join([str(tmp_path), str(REPOSITORY)])
    result = subprocess.run([sys.executable, "-c", BROKEN_TRITON], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": path}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['torch_chunked', 'torch'] 1 papo_kernels: triton does not import"
