"""Config values: every numeric field refuses NaN and infinity, NumPy scalars count as the numbers they hold, and a
YAML file that cannot be read as a config is a one-line error naming the file."""

import dataclasses
import json
import math
from typing import Optional

import numpy as np
import pytest

from papo_kernels.trainer import Trainer, TrainerConfig
from papo_kernels.trainer.errors import TrainerInputError
from papo_kernels.trainer.metrics_log import read_metrics

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import small_config

FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainerConfig) if f.type in (float, Optional[float])]
INT_FIELDS = [f.name for f in dataclasses.fields(TrainerConfig) if f.type is int]


def test_the_field_lists_cover_the_numeric_fields():
    assert {"learning_rate", "temperature", "gamma", "gamma_final", "top_p", "epsilon_low"} <= set(FLOAT_FIELDS)
    assert {"steps", "seed", "save_every"} <= set(INT_FIELDS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")],
                         ids=["nan", "inf", "-inf", "np.float32-nan", "np.float64-inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS + INT_FIELDS)
def test_non_finite_numbers_are_refused_naming_the_field(name, value):
    with pytest.raises(TrainerInputError) as error:
        TrainerConfig(**{name: value}).validate()
    message = str(error.value)
    assert message.startswith(f"config field {name!r}: got {float(value)!r}, expected "), message


@pytest.mark.parametrize("flag, name", [("--learning-rate", "learning_rate"), ("--temperature", "temperature"),
                                        ("--gamma", "gamma"), ("--gamma-final", "gamma_final")])
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_the_cli_refuses_non_finite_flags(tmp_path, capsys, flag, name, text):
    message = cli_error(capsys, ["--output-dir", str(tmp_path), f"{flag}={text}"])
    assert message.startswith(f"config field {name!r}: got {float(text)!r}, expected ") and "finite" in message
    assert not (tmp_path / "metrics.jsonl").exists(), "refused before any work"


def test_yaml_nan_and_inf_are_refused(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("learning_rate: .nan\n")
    assert cli_error(capsys, ["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path)]) == \
        "config field 'learning_rate': got nan, expected a finite number > 0"
    (tmp_path / "run.yaml").write_text("gamma: .inf\n")
    assert "config field 'gamma': got inf, expected null (the preset's value) or a finite number >= 0" in \
        cli_error(capsys, ["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path)])


NUMPY_VALUES = dict(learning_rate=np.float32(3e-4), temperature=np.float64(1.0), gamma=np.float16(0.01),
                    gamma_final=np.float32(0), top_p=np.float32(1.0), steps=np.int64(1), group_size=np.int32(4),
                    seed=np.uint8(3), dapo_filter=np.bool_(False))


def test_numpy_scalars_become_the_python_numbers_they_hold():
    config = small_config("unused", **NUMPY_VALUES).validate()
    for name, value in NUMPY_VALUES.items():
        got = getattr(config, name)
        assert type(got) is type(value.item()) and got == value.item(), (name, got)
    json.dumps(config.to_dict())  # a NumPy float32 is not JSON serialisable; the Python float is


def test_a_run_configured_with_numpy_scalars_logs_json(tmp_path):
    Trainer(small_config(tmp_path, **NUMPY_VALUES)).train()
    [record] = read_metrics(tmp_path)
    assert record["step"] == 0 and record["lr"] > 0


@pytest.mark.parametrize("name, value, allowed", [
    ("epsilon_low", 1.0, "null (the preset's value) or a number in [0, 1)"),
    ("image_size", 14, "an integer >= 28 (one 2 x 2 block of 14-pixel vision patches)"),
    ("output_dir", "", "a non-empty path"),
    ("output_dir", 5, "a non-empty path"),
    ("steps", 2.0, "a positive integer up to 2**63 - 1"),
    ("seed", 2**64, "an integer in [0, 2**64 - 1] (torch's seed range)"),
])
def test_values_that_failed_only_inside_a_step_are_refused_up_front(name, value, allowed):
    with pytest.raises(TrainerInputError) as error:
        TrainerConfig(**{name: value}).validate()
    assert str(error.value) == f"config field {name!r}: got {value!r}, expected {allowed}"


BEYOND_FLOAT = 10**400  # a Python int that float() cannot hold
INTEGER_FIELDS = ["steps", "num_threads", "prompts_per_step", "group_size", "max_new_tokens", "image_size",
                  "mask_cell", "ppo_epochs", "minibatches", "micro_batch_size", "eval_prompts", "eval_every",
                  "save_every", "seed"]
NUMBER_FIELDS = ["temperature", "top_p", "accuracy_weight", "format_weight", "mask_probability", "gamma", "beta",
                 "eta_clean", "eta_masked", "epsilon_low", "epsilon_high", "gamma_final", "gamma_anneal_fraction",
                 "learning_rate", "weight_decay", "max_grad_norm"]


@pytest.mark.parametrize("name", INTEGER_FIELDS + NUMBER_FIELDS)
def test_an_int_beyond_float_is_a_one_line_error_naming_the_field(tmp_path, capsys, name):
    """From a YAML file (which reads 10**400 as an int) or the config itself: the field named, the number shown by
    its size, no OverflowError."""
    with pytest.raises(TrainerInputError, match=f"^config field {name!r}: got an int of about 10\\*\\*400, "
                                                "expected "):
        TrainerConfig(**{name: BEYOND_FLOAT}).validate()
    path = tmp_path / "run.yaml"
    path.write_text(f"{name}: {BEYOND_FLOAT}\n")
    message = cli_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert message.startswith(f"config field {name!r}: got an int of about 10**400, expected "), message
    assert not (tmp_path / "run").exists(), "refused before any work"


@pytest.mark.parametrize("name", ["steps", "max_new_tokens", "prompts_per_step"])
def test_integer_fields_stop_at_int64(name):
    TrainerConfig(**{name: 2**63 - 1})  # the largest allowed: built, not run
    with pytest.raises(TrainerInputError, match=f"config field {name!r}: got 9223372036854775808, expected a positive "
                                                r"integer up to 2\*\*63 - 1"):
        TrainerConfig(**{name: 2**63}).validate()


@pytest.mark.parametrize("text, message", [
    ("steps: [1, 2\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
    ("steps: 3\n\tgamma: 0.02\n", "is not valid YAML: found character '\\t' that cannot start any token at line 2, "
                                  "column 1"),
    ("steps: 3\ngamma: 0.02\ngamma: 0.05\n", "is not valid YAML: found duplicate key 'gamma' at line 3, column 1"),
    ("- 1\n- 2\n", "must hold a mapping of field: value, got list"),
    ("just words\n", "must hold a mapping of field: value, got str"),
    ("{1: 2, x: 3}\n", "unknown config field(s) [1, 'x']"),
])
def test_a_yaml_that_is_no_config_is_a_one_line_error_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert cli_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path / "run")]).startswith(
        f"--config: {path}"), "names the file"
    assert message in cli_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists(), "refused before any work"


def test_yaml_bytes_that_are_not_text(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 3\npreset: \xff\xfe\n")
    message = cli_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path)] + SMALL_FLAGS)
    assert message.startswith(f"--config: {path} is not valid YAML: ") and "invalid start byte" in message, message


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("<<: {steps: 3, seed: 1}\nsteps: 5\n")
    config = TrainerConfig.from_yaml(path)
    assert (config.steps, config.seed) == (5, 1), "an explicit key overrides a merged one, as YAML says"
