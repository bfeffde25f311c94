"""papo_loss under torch.compile(fullgraph=True) and under torch.func transforms.

Compiled, papo_loss is one opaque custom op (papo_kernels/loss_op.py) whose kernel is the eager function: the loss,
the metrics and every gradient equal eager mode's bit for bit, on both paths and with every kind of masked pass, and
a bad value is the same error. Under torch.func only path='per_token' with backend='reference' runs; every other
choice is a ValueError that names it.
"""

import numpy as np
import pytest
import torch

from papo_kernels import PAPOLoss, papo_loss

from test_reliability import make_batch

LEAVES = ("hidden", "hidden_masked", "weight", "bias")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles anew: the functions here are compiled under many guards, over dynamo's recompile limit."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
# (what, papo_loss keywords, masked pass): the default fast path with each kind of masked pass, the per-token path
CASES = {
    "default, hidden_masked": (dict(), "hidden_masked"),
    "default, masked_logprobs": (dict(), "masked_logprobs"),
    "default, no masked pass": (dict(gamma=0.0, eta_masked=0.0), None),
    "metrics-only masked pass": (dict(gamma=0.0, eta_masked=0.0), "hidden_masked"),
    "torch epilogue, dr_grpo": (dict(backend="torch", loss_type="dr_grpo", max_completion_length=8),
                                "hidden_masked"),
    "per-token reference": (dict(backend="reference", perception_kl="exact", beta=0.02), "hidden_masked"),
}


def scaled_loss(batch, options, masked, num_items_in_batch=None):
    """2 x papo_loss (a use downstream, which the backward must scale by) and the metrics."""
    extra = {"hidden_masked": batch["hidden_masked"]} if masked == "hidden_masked" else {}
    if masked == "masked_logprobs":
        extra = {"masked_logprobs": batch["old_logprobs"] - 0.3}
    loss, metrics = papo_loss(batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"],
                              batch["advantages"], bias=batch["bias"], old_logprobs=batch["old_logprobs"],
                              ref_logprobs=batch["ref_logprobs"], num_items_in_batch=num_items_in_batch,
                              **extra, **options)
    return 2 * loss, metrics


def run(function, options, masked, grad=True, num_items_in_batch=None):
    batch = make_batch()
    for name in LEAVES:
        batch[name] = batch[name].detach().clone().requires_grad_(grad)
    loss, metrics = function(batch, options, masked, num_items_in_batch)
    if grad:
        loss.backward()
    return loss.detach(), metrics, {name: batch[name].grad for name in LEAVES}


def assert_equal_runs(compiled, eager):
    assert torch.equal(compiled[0], eager[0]), f"loss {compiled[0]} != {eager[0]}"
    assert compiled[1].keys() == eager[1].keys()
    for name, value in eager[1].items():
        assert not compiled[1][name].requires_grad and torch.equal(compiled[1][name], value), name
    for name, grad in eager[2].items():
        assert (compiled[2][name] is None) == (grad is None), f"gradient of {name}: None in one mode only"
        assert grad is None or torch.equal(compiled[2][name], grad), f"gradient of {name} differs"


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_fullgraph_equals_eager(case):
    options, masked = CASES[case]
    compiled = torch.compile(scaled_loss, fullgraph=True, backend="aot_eager")
    assert_equal_runs(run(compiled, options, masked), run(scaled_loss, options, masked))


def test_the_default_compiler_runs_the_default_path_for_training_and_evaluation():
    """Inductor, the default backend of torch.compile; a tensor num_items_in_batch, as TRL passes it."""
    compiled = torch.compile(scaled_loss, fullgraph=True)
    items = torch.tensor(7.0)
    assert_equal_runs(run(compiled, {}, "hidden_masked", num_items_in_batch=items),
                      run(scaled_loss, {}, "hidden_masked", num_items_in_batch=items))
    with torch.no_grad():
        assert_equal_runs(run(compiled, {}, "hidden_masked", grad=False),
                          run(scaled_loss, {}, "hidden_masked", grad=False))


def test_a_compiled_papo_loss_module_equals_eager():
    module = PAPOLoss.from_preset("papo_d")

    def through_module(batch, options, masked, num_items_in_batch):
        return module(batch["hidden"], batch["weight"], batch["completion_ids"], batch["completion_mask"],
                      batch["advantages"], hidden_masked=batch["hidden_masked"], bias=batch["bias"])

    compiled = torch.compile(through_module, fullgraph=True, backend="aot_eager")
    assert_equal_runs(run(compiled, {}, None), run(through_module, {}, None))


BAD_VALUES = {
    "num_items_in_batch": (dict(num_items_in_batch=torch.tensor(-4.0)), ValueError,
                           "num_items_in_batch must be a finite number in (0.0, inf), got -4.0"),
    "completion_mask": (dict(completion_mask=torch.full((3, 6), 0.5)), ValueError,
                        "completion_mask must be bool or hold only 0 and 1"),
    "bias": (dict(bias=torch.full((29,), float("-inf"))), ValueError, "bias must hold finite numbers"),
    "gamma": (dict(gamma=float("nan")), ValueError, "gamma must be a finite number in (-inf, inf), got nan"),
    "beta above float32": (dict(beta=10**400), ValueError, "beta must be a finite number in [0.0, inf), got an int "
                                                           "of about 10**400"),
    "hidden shape": (dict(hidden=torch.randn(3, 8)), ValueError, "hidden must have shape (B, T, D), got (3, 8)"),
    "bool temperature": (dict(temperature=True), TypeError, "temperature must be a real number, got bool"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_under_compile_are_the_eager_errors(case):
    """Checked by the op's kernel, the eager papo_loss: the same type and message, before any computation."""
    batch = make_batch()
    changes, error, message = BAD_VALUES[case]

    def call(**changes):
        values = {**batch, **changes}
        return papo_loss(values["hidden"], values["weight"], batch["completion_ids"], values["completion_mask"],
                         batch["advantages"], hidden_masked=batch["hidden_masked"], bias=values["bias"],
                         **{name: value for name, value in changes.items() if name not in batch})[0]

    with pytest.raises(error) as eager:
        call(**changes)
    with pytest.raises(error) as compiled:
        torch.compile(call, fullgraph=True, backend="aot_eager")(**changes)
    assert str(compiled.value) == str(eager.value) and message in str(eager.value)


def test_tensor_and_numpy_hyperparameters_under_compile_equal_eager():
    options = dict(temperature=torch.tensor(0.7), gamma=np.float32(0.02), max_completion_length=torch.tensor(8),
                   eta_masked=np.float64(0.05), loss_type="dr_grpo")
    compiled = torch.compile(scaled_loss, fullgraph=True, backend="aot_eager")
    assert_equal_runs(run(compiled, options, "hidden_masked"), run(scaled_loss, options, "hidden_masked"))


TRANSFORM_CASES = [dict(), dict(path="per_token"), dict(backend="torch"), dict(path="fast", backend="native"),
                   dict(path="per_token", backend="torch")]


def loss_of_hidden(batch, **options):
    def loss(hidden):
        return papo_loss(hidden, batch["weight"], batch["completion_ids"], batch["completion_mask"],
                         batch["advantages"], hidden_masked=batch["hidden_masked"], **options)[0]
    return loss


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("options", TRANSFORM_CASES, ids=str)
def test_torch_func_transforms_point_to_the_reference_on_the_per_token_path(options, transform):
    batch = make_batch()
    function = loss_of_hidden(batch, **options)
    hidden = batch["hidden"] if transform == "grad" else torch.stack([batch["hidden"]] * 2)
    with pytest.raises(ValueError, match="under a torch.func transform .* needs path='per_token' with "
                                         "backend='reference'"):
        getattr(torch.func, transform)(function)(hidden)


def test_torch_func_grad_and_vmap_run_the_reference_on_the_per_token_path():
    batch = make_batch()
    function = loss_of_hidden(batch, path="per_token", backend="reference")
    hidden = batch["hidden"].detach().clone().requires_grad_()
    function(hidden).backward()
    assert torch.allclose(torch.func.grad(function)(batch["hidden"]), hidden.grad, rtol=1e-6, atol=0)
    shifted = torch.stack([batch["hidden"], batch["hidden"] + 0.1])
    assert torch.equal(torch.func.vmap(function)(shifted), torch.stack([function(h) for h in shifted]))
