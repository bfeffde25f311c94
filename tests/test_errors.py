"""Bad input raises TypeError/ValueError naming the argument, before any computation."""

import warnings

import pytest
import torch

from papo_kernels import PAPOLoss, linear_logprobs, linear_perception_kl, papo_loss

B, T, D, V = 2, 3, 4, 11


def good_loss_inputs():
    return dict(
        hidden=torch.randn(B, T, D),
        weight=torch.randn(V, D),
        completion_ids=torch.randint(0, V, (B, T)),
        completion_mask=torch.ones(B, T),
        advantages=torch.randn(B),
    )


def loss_with(**changes):
    inputs = good_loss_inputs()
    positional = {key: changes.pop(key) for key in list(changes) if key in inputs}
    inputs.update(positional)
    return papo_loss(inputs.pop("hidden"), inputs.pop("weight"), inputs.pop("completion_ids"),
                     inputs.pop("completion_mask"), inputs.pop("advantages"), **changes)


LOSS_ERRORS = [
    # (what is wrong, changes, exception, words the message must hold)
    ("integer hidden", dict(hidden=torch.ones(B, T, D, dtype=torch.long)), TypeError, ["hidden", "int64"]),
    ("complex hidden", dict(hidden=torch.ones(B, T, D, dtype=torch.complex64)), TypeError, ["hidden", "complex64"]),
    ("hidden not 3-d", dict(hidden=torch.randn(B * T, D)), ValueError, ["hidden", "(B, T, D)"]),
    ("hidden_masked shape", dict(hidden_masked=torch.randn(B, T + 1, D)), ValueError, ["hidden_masked", "(2, 4, 4)"]),
    ("hidden_masked dtype", dict(hidden_masked=torch.randn(B, T, D, dtype=torch.float64)), TypeError,
     ["hidden_masked", "float64"]),
    ("weight dim", dict(weight=torch.randn(V, D + 1)), ValueError, ["weight", "(11, 5)", "D = hidden.shape[-1] = 4"]),
    ("weight dtype", dict(weight=torch.randn(V, D, dtype=torch.float16)), TypeError, ["weight", "float16"]),
    ("bias length", dict(bias=torch.randn(V - 1)), ValueError, ["bias", "(10,)", "(11,)"]),
    ("float ids", dict(completion_ids=torch.zeros(B, T)), TypeError, ["completion_ids", "float32"]),
    ("ids shape", dict(completion_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, ["completion_ids"]),
    ("id too large", dict(completion_ids=torch.full((B, T), V)), ValueError, ["completion_ids", "[0, 11)", "11"]),
    ("negative id", dict(completion_ids=torch.full((B, T), -1)), ValueError, ["completion_ids", "-1"]),
    ("mask shape", dict(completion_mask=torch.ones(B, T - 1)), ValueError, ["completion_mask", "(2, 2)"]),
    ("advantages shape", dict(advantages=torch.randn(B + 1)), ValueError, ["advantages", "(3,)"]),
    ("integer advantages", dict(advantages=torch.ones(B, dtype=torch.long)), TypeError, ["advantages"]),
    ("old_logprobs shape", dict(old_logprobs=torch.randn(B, T + 2)), ValueError, ["old_logprobs", "(2, 5)"]),
    ("ref_logprobs shape", dict(ref_logprobs=torch.randn(B), beta=0.1), ValueError, ["ref_logprobs", "(2,)"]),
    ("masked_logprobs shape", dict(masked_logprobs=torch.randn(T, B)), ValueError, ["masked_logprobs", "(3, 2)"]),
    ("both masked inputs", dict(hidden_masked=torch.randn(B, T, D), masked_logprobs=torch.randn(B, T)), ValueError,
     ["hidden_masked", "masked_logprobs"]),
    ("zero temperature", dict(temperature=0.0), ValueError, ["temperature", "0.0"]),
    ("negative temperature", dict(temperature=-1.0), ValueError, ["temperature", "-1.0"]),
    ("nan temperature", dict(temperature=float("nan")), ValueError, ["temperature", "nan"]),
    ("epsilon_low >= 1", dict(epsilon_low=1.0), ValueError, ["epsilon_low", "1.0"]),
    ("negative epsilon_low", dict(epsilon_low=-0.1), ValueError, ["epsilon_low", "-0.1"]),
    ("negative epsilon_high", dict(epsilon_high=-0.2), ValueError, ["epsilon_high", "-0.2"]),
    ("dual_clip <= 1", dict(dual_clip=1.0), ValueError, ["dual_clip", "1.0"]),
    ("negative beta", dict(beta=-0.1), ValueError, ["beta", "-0.1"]),
    ("gamma not a number", dict(gamma="0.01"), TypeError, ["gamma", "str"]),
    ("unknown perception_kl", dict(perception_kl="k4"), ValueError, ["perception_kl", "'k4'", "'exact'"]),
    ("unknown entropy", dict(entropy="approx"), ValueError, ["entropy", "'approx'", "'sampled'"]),
    ("unknown loss_type", dict(loss_type="ppo"), ValueError, ["loss_type", "'ppo'", "'dr_grpo'"]),
    ("unknown backend", dict(backend="cuda"), ValueError, ["backend", "'cuda'", "'reference'"]),
    ("dr_grpo without length", dict(loss_type="dr_grpo"), ValueError, ["max_completion_length", "dr_grpo"]),
    ("dr_grpo with a bad length", dict(loss_type="dr_grpo", max_completion_length=0), ValueError,
     ["max_completion_length", "0"]),
    ("beta without ref_logprobs", dict(beta=0.01), ValueError, ["beta", "ref_logprobs"]),
    ("exact KL from masked_logprobs", dict(masked_logprobs=torch.randn(B, T), perception_kl="exact"), ValueError,
     ["perception_kl", "hidden_masked", "masked_logprobs"]),
    ("num_items_in_batch negative", dict(num_items_in_batch=-3), ValueError, ["num_items_in_batch", "-3"]),
    ("num_items_in_batch tensor shape", dict(num_items_in_batch=torch.ones(2)), ValueError, ["num_items_in_batch"]),
    ("tensors on two devices", dict(advantages=torch.randn(B, device="meta")), ValueError,
     ["advantages on meta", "hidden on cpu"]),
    ("not a tensor", dict(completion_mask=[[1, 1, 1], [1, 1, 1]]), TypeError, ["completion_mask", "list"]),
]


@pytest.mark.parametrize("what, changes, error, words", LOSS_ERRORS, ids=[case[0] for case in LOSS_ERRORS])
def test_papo_loss_rejects(what, changes, error, words):
    with pytest.raises(error) as raised:
        loss_with(**changes)
    for word in words:
        assert word in str(raised.value), f"{what}: {word!r} not in {str(raised.value)!r}"


def test_ids_at_masked_out_positions_are_not_checked():
    inputs = good_loss_inputs()
    inputs["completion_mask"][1, 2] = 0
    inputs["completion_ids"][1, 2] = -100
    loss, _ = papo_loss(*inputs.values())
    assert torch.isfinite(loss)


def test_linear_logprobs_rejects_bad_tokens_and_shapes():
    hidden, weight = torch.randn(5, D), torch.randn(V, D)
    with pytest.raises(ValueError, match="tokens must have shape \\(5,\\)"):
        linear_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        linear_logprobs(hidden, weight, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 11\)"):
        linear_logprobs(hidden, weight, torch.full((5,), 11))
    with pytest.raises(ValueError, match="weight must have shape \\(V, D\\)"):
        linear_logprobs(hidden, torch.randn(V, D, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden must have shape"):
        linear_logprobs(torch.tensor(1.0), weight, torch.tensor(0))


def test_linear_perception_kl_rejects_mismatched_passes():
    hidden, weight, tokens = torch.randn(5, D), torch.randn(V, D), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden_masked must have shape \\(5, 4\\)"):
        linear_perception_kl(hidden, torch.randn(6, D), weight, tokens)
    with pytest.raises(ValueError, match="temperature"):
        linear_perception_kl(hidden, hidden, weight, tokens, temperature=-2)


def test_papo_loss_module_rejects_unknown_hyperparameters_and_presets():
    with pytest.raises(ValueError, match="PAPOLoss hyperparameter .*'gama'"):
        PAPOLoss(gama=0.1)
    with pytest.raises(ValueError, match="name must be one of .*'papo_x'"):
        PAPOLoss.from_preset("papo_x")


def test_eta_clean_applies_without_a_masked_pass():
    """The clean entropy needs no masked pass: eta_clean = 100 adds 100 x the token mean of the entropy (dapo), where
    it used to give the loss of eta_clean = 0."""
    inputs = {name: value.double() if value.is_floating_point() else value for name, value in
              good_loss_inputs().items()}
    off = dict(gamma=0.0, eta_masked=0.0)
    without, metrics = papo_loss(*inputs.values(), eta_clean=0.0, **off)
    with_entropy, _ = papo_loss(*inputs.values(), eta_clean=100.0, **off)
    assert float(with_entropy - without) == pytest.approx(100.0 * float(metrics["entropy"]), rel=1e-12)
    assert metrics["entropy"] > 0


def test_gamma_or_eta_masked_without_a_masked_pass_warn_once_per_call_site():
    inputs = good_loss_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: once per message and call site
        for _ in range(3):
            papo_loss(*inputs.values(), gamma=0.01, eta_masked=0.03)
    assert [str(w.message) for w in caught] == [
        "papo_loss: gamma=0.01 and eta_masked=0.03 weigh the masked pass, which was not given (hidden_masked or "
        "masked_logprobs): those terms are off and the loss is GRPO/DAPO with the clean entropy term (eta_clean); "
        "give the masked pass, or gamma=0 and eta_masked=0 (the 'grpo' and 'dapo' presets)"]
    assert caught[0].category is UserWarning and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        papo_loss(*inputs.values(), gamma=0.0, eta_masked=0.0, eta_clean=0.5)
        papo_loss(*inputs.values(), hidden_masked=inputs["hidden"] + 0.1)
        papo_loss(*inputs.values(), masked_logprobs=torch.full((B, T), -1.0))
