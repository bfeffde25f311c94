"""The configuration: presets with overrides, the gamma schedule, YAML loading and validation."""

import pytest

from papo_kernels import PRESETS
from papo_kernels.trainer import TrainerConfig
from papo_kernels.trainer.errors import TrainerInputError


def test_loss_kwargs_are_the_preset_with_overrides():
    kwargs = TrainerConfig(preset="papo_g", gamma=0.03, temperature=0.7).loss_kwargs()
    assert kwargs == {**PRESETS["papo_g"], "gamma": 0.03, "temperature": 0.7, "entropy": "exact"}
    assert TrainerConfig(preset="dapo").loss_kwargs()["gamma"] == 0.0


def test_gamma_schedule():
    fixed = TrainerConfig(steps=100, gamma=0.02)
    assert fixed.coefficient_scale(0) == fixed.coefficient_scale(99) == 1.0
    linear = TrainerConfig(steps=100, gamma=0.02, gamma_schedule="linear", gamma_final=0.005,
                           gamma_anneal_fraction=0.5)
    # gamma goes 0.02 -> 0.005 over the first 50 steps, then stays; the factor is gamma_t / gamma_0.
    assert [round(linear.coefficient_scale(s), 6) for s in (0, 25, 50, 90)] == [1.0, 0.625, 0.25, 0.25]
    assert TrainerConfig(preset="dapo", gamma_schedule="linear").coefficient_scale(10) == 1.0


@pytest.mark.parametrize("overrides", [dict(preset="dapo"), dict(preset="papo_d", gamma=0.0)])
def test_a_linear_schedule_from_gamma_zero_to_a_nonzero_gamma_final_is_refused(overrides):
    """The schedule is a ratio to the starting gamma: from 0 it would stay at 0 whatever gamma_final says."""
    config = TrainerConfig(gamma_schedule="linear", gamma_final=0.02, **overrides)
    with pytest.raises(TrainerInputError, match="config field 'gamma_final': got 0.02, expected 0 with gamma 0"):
        config.validate()


def test_trainer_scales_gamma_and_both_entropies(small_trainer):
    small_trainer.config.gamma_schedule = "linear"
    kwargs = small_trainer.step_loss_kwargs(1)  # half-way through 2 steps, annealing to 0
    preset = PRESETS["papo_d"]
    assert kwargs["gamma"] == pytest.approx(preset["gamma"] / 2)
    assert kwargs["eta_clean"] == pytest.approx(preset["eta_clean"] / 2)
    assert kwargs["eta_masked"] == pytest.approx(preset["eta_masked"] / 2)
    assert kwargs["epsilon_high"] == preset["epsilon_high"]


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: grpo\nsteps: 7\ntasks: [color, count]\nmask_target: pixel_values\n"
                    "learning_rate: 3e-4\ngamma: 2.5E-2\n")
    config = TrainerConfig.from_yaml(path).validate()
    assert (config.preset, config.steps, config.tasks, config.mask_target) == ("grpo", 7, ["color", "count"],
                                                                              "pixel_values")
    assert (config.learning_rate, config.gamma) == (3e-4, 0.025), "exponent floats without a dot are numbers"


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "'steps': got 0, expected a positive integer"),
    ("tasks", ["colour"], "'tasks': got ['colour'], expected a non-empty list of"),
    ("top_p", 0.0, "'top_p': got 0.0, expected a number in (0, 1]"),
    ("gamma", -0.1, "'gamma': got -0.1, expected null (the preset's value) or a finite number >= 0"),
    ("mask_cell", 28, "'mask_cell': got 28, expected 14 (the vision patch size) with mask_target 'pixel_values'"),
    ("dapo_filter", "yes", "'dapo_filter': got 'yes', expected true or false"),
])
def test_validation_names_the_field(field, value, message):
    values = {field: value}
    if field == "mask_cell":
        values["mask_target"] = "pixel_values"
    with pytest.raises(ValueError) as error:
        TrainerConfig(**values).validate()
    assert message in str(error.value)


def test_yaml_must_be_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of field: value, got list"):
        TrainerConfig.from_yaml(tmp_path / "list.yaml")
