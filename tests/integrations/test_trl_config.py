"""PAPOConfig: the paper's settings in full, refused options, and the import guard of the TRL integration."""

import subprocess
import sys

import numpy as np
import pytest
from trl import GRPOConfig

from papo_kernels import PRESETS
from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import build_processor_and_model_folder, colour_dataset, common_fields, length_reward

CPU = dict(output_dir="unused", use_cpu=True, report_to=[])


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_defaults_are_papo_d_with_trls_reference_kl():
    """Plain PAPOConfig: PAPO-D's loss setting, with TRL's default reference KL (the ratio times k3, where beta > 0);
    the presets carry the paper's plain k3."""
    assert PAPOConfig(**CPU).use_bias_correction_kl is GRPOConfig(**CPU).use_bias_correction_kl is True
    assert PAPOConfig(**CPU) == PAPOConfig.from_preset("papo_d", use_bias_correction_kl=True, **CPU)
    assert PAPOConfig.from_preset("papo_d", **CPU).use_bias_correction_kl is False


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_set_every_setting_under_trls_names(name):
    config = PAPOConfig.from_preset(name, **CPU)
    preset = PRESETS[name]
    assert (config.epsilon, config.epsilon_high, config.delta) == (preset["epsilon_low"], preset["epsilon_high"],
                                                                   preset["dual_clip"])
    for field in ("beta", "gamma", "eta_clean", "eta_masked", "perception_kl", "loss_type"):
        assert getattr(config, field) == preset[field], field
    assert config.use_bias_correction_kl is False, "the paper's reference KL is the plain k3"
    assert config.papo_loss_options()["ref_kl_importance_weighted"] is False
    assert config.uses_masked_image == (preset["gamma"] != 0 or preset["eta_clean"] != 0 or preset["eta_masked"] != 0)
    assert PAPOConfig.from_preset(name, beta=0.5, **CPU).beta == 0.5, "overrides win"


def test_a_grpo_config_differs_where_papo_sets_the_paper_value():
    """What a user switching from GRPOConfig gets unless they set it: PAPO-D's clip range and dual clip; the
    reference KL and every other TRL field keep TRL's defaults."""
    grpo, papo = GRPOConfig(**CPU), PAPOConfig(**CPU)
    assert (grpo.epsilon_high, grpo.delta) == (None, None)
    assert (papo.epsilon_high, papo.delta) == (0.28, 3.0)
    shared = ("use_bias_correction_kl", "learning_rate", "max_completion_length", "bf16", "gradient_checkpointing",
              "num_generations", "temperature", "per_device_train_batch_size")
    assert {name: getattr(papo, name) for name in shared} == {name: getattr(grpo, name) for name in shared}
    assert papo.papo_loss_options()["ref_kl_importance_weighted"] is True


def test_epsilon_high_none_is_epsilon_as_in_trl():
    config = PAPOConfig(epsilon=0.25, epsilon_high=None, **CPU)
    assert config.papo_loss_options()["epsilon_high"] == 0.25
    with pytest.raises(ValueError, match="delta=1.2 is not supported.*1 \\+ epsilon_high = 1.25"):
        PAPOConfig(epsilon=0.25, epsilon_high=None, delta=1.2, **CPU)


def test_linear_gamma_schedule():
    config = PAPOConfig(gamma=0.02, gamma_schedule="linear", gamma_final=0.01, gamma_anneal_fraction=0.5, **CPU)
    assert [config.coefficient_scale(step, 100) for step in (0, 25, 50, 90)] == pytest.approx([1, 0.75, 0.5, 0.5])
    assert PAPOConfig(gamma=0.02, **CPU).coefficient_scale(50, 100) == 1.0


@pytest.mark.parametrize("fields, message", [
    (dict(loss_type="cispo"), "loss_type='cispo' is not supported"),
    (dict(importance_sampling_level="segment"), "importance_sampling_level"),
    (dict(delta=1.2), "delta=1.2 is not supported"),
    (dict(epsilon=1.0), r"epsilon=1.0 is not supported.*\[0, 1\)"),
    (dict(epsilon=-0.1), "epsilon=-0.1 is not supported"),
    (dict(epsilon=None), "epsilon=None is not supported"),
    (dict(epsilon_high=-0.1), "epsilon_high=-0.1 is not supported"),
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(perception_kl="k4"), "perception_kl"),
    (dict(entropy="estimated"), "entropy"),
    (dict(mask_target="video"), "mask_target"),
    (dict(mask_probability=1.5), "mask_probability"),
    (dict(mask_cell=0), "mask_cell"),
    (dict(gamma_schedule="cosine"), "gamma_schedule"),
    (dict(gamma_anneal_fraction=0.0), "gamma_anneal_fraction"),
    (dict(gamma=0.0, gamma_final=0.02, gamma_schedule="linear"), "gamma_schedule.*gamma=0 and gamma_final=0.02"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(backend="cuda"), "backend"),
    (dict(masked_gradient=False, perception_kl="exact"), "masked_gradient"),
    (dict(masked_gradient=1), "masked_gradient: got 1, expected True or False"),
    (dict(gamma=-0.01), r"gamma: got -0.01, expected a finite number >= 0 \(a negative gamma minimises the "
                        r"perception KL.*allow_negative_coefficients=True"),
    (dict(eta_clean=-0.03), r"eta_clean: got -0.03, expected a finite number >= 0 \(a negative eta_clean "
                            r"maximises the clean pass's entropy"),
    (dict(eta_masked=-0.03), "eta_masked: got -0.03, expected a finite number >= 0"),
    (dict(allow_negative_coefficients="yes"), "allow_negative_coefficients: got 'yes', expected True or False"),
    (dict(use_bias_correction_kl=None), "use_bias_correction_kl: got None, expected True or False"),
    (dict(masked_forward="interleaved"), r"masked_forward: got 'interleaved', expected one of \['joint', "
                                         r"'sequential'\]"),
    (dict(masked_forward="sequential", fp16=True), "masked_forward.*'joint' with fp16=True"),
])
def test_refused_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PAPOConfig(**fields, **CPU)


def test_negative_coefficients_only_for_ablations():
    config = PAPOConfig(gamma=-0.02, eta_clean=-0.01, eta_masked=-0.01, allow_negative_coefficients=True, **CPU)
    assert (config.gamma, config.eta_clean, config.eta_masked) == (-0.02, -0.01, -0.01)
    assert PAPOConfig.from_preset("papo_d", gamma=0.0, eta_clean=0.0, eta_masked=0.0, **CPU).uses_masked_image is False


def test_a_backend_that_cannot_run_on_the_device_is_refused_at_construction(monkeypatch):
    """backend='triton' on the CPU runs only under Triton's interpreter, which this suite turns on; with Triton's
    interpreter knob off, this is a CPU machine without CUDA."""
    assert PAPOConfig(backend="triton", **CPU).backend == "triton"
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "interpret", False)
    assert PAPOConfig(backend="torch", **CPU).backend == "torch"
    with pytest.raises(ValueError, match=r"PAPOConfig.backend: got 'triton', which cannot run on this trainer's device "
                                         r"\(cpu\): backend='triton' runs on CUDA tensors"):
        PAPOConfig(backend="triton", **CPU)


@pytest.mark.parametrize("fields, message", [
    (dict(beta=float("nan")), r"PAPOConfig: beta must be a finite number in \[0.0, inf\), got nan"),
    (dict(beta=-1.0), r"PAPOConfig: beta must be a finite number in \[0.0, inf\), got -1.0"),
    (dict(temperature=float("nan")), "PAPOConfig: temperature must be a finite number"),
    (dict(temperature=-1.0), r"PAPOConfig: temperature must be a finite number in \(0.0, inf\), got -1.0"),
    (dict(loss_type="dr_grpo", max_completion_length=None), "PAPOConfig: loss_type='dr_grpo' needs "
                                                             "max_completion_length"),
])
def test_what_papo_loss_would_refuse_is_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        PAPOConfig(**fields, **CPU)


def test_numpy_numbers_are_the_numbers_they_hold():
    config = PAPOConfig(gamma=np.float32(0.02), epsilon=np.float64(0.2), delta=np.float32(3.0),
                        mask_probability=np.float64(0.5), gamma_anneal_fraction=np.float32(0.5),
                        mask_cell=np.int64(14), **CPU)
    assert (config.gamma, config.epsilon, config.delta) == (float(np.float32(0.02)), 0.2, 3.0)
    assert (config.mask_probability, config.gamma_anneal_fraction, config.mask_cell) == (0.5, 0.5, 14)
    assert all(type(value) in (float, int) for value in (config.gamma, config.delta, config.mask_cell))
    config.to_json_string()  # TRL logs its arguments as JSON, which NumPy numbers would break


def test_trainer_refuses_what_it_cannot_honour(tmp_path):
    processor = build_processor_and_model_folder(tmp_path / "model")
    dataset = colour_dataset(1)

    def trainer(**kwargs):
        args = kwargs.pop("args", PAPOConfig(**common_fields(processor, tmp_path / "out")))
        return PAPOTrainer(model=str(tmp_path / "model"), reward_funcs=length_reward, args=args,
                           train_dataset=dataset, processing_class=processor, **kwargs)

    with pytest.raises(TypeError, match="args must be a PAPOConfig"):
        trainer(args=GRPOConfig(**common_fields(processor, tmp_path / "out")))
    with pytest.raises(ValueError, match="tools="):
        trainer(tools=[len])
    with pytest.raises(ValueError, match="mask_cell must be 14"):
        trainer(args=PAPOConfig(mask_target="pixel_values", mask_cell=16, **common_fields(processor, tmp_path)))
    with pytest.raises(ValueError, match="Qwen-VL processor"):
        PAPOTrainer(model=str(tmp_path / "model"), reward_funcs=length_reward, train_dataset=dataset,
                    args=PAPOConfig(**common_fields(processor, tmp_path)), processing_class=processor.tokenizer)


def test_papo_kernels_never_imports_trl_or_pillow():
    result = run_python("import sys, papo_kernels, papo_kernels.integrations, papo_kernels.masking, "
                        "papo_kernels.hidden_states; print('trl' in sys.modules, 'PIL' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_without_trl_the_import_error_names_the_extra():
    result = run_python("import sys; sys.modules['trl'] = None\nimport papo_kernels.integrations.trl")
    assert result.returncode != 0
    assert "ImportError: papo_kernels.integrations.trl needs TRL" in result.stderr
    assert 'pip install "papo-kernels[trl]"' in result.stderr
