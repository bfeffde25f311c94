"""The model options (torch_dtype, mixed_precision, attn_implementation, gradient_checkpointing, model_type): values
refused by name, choices that depend on the machine settled before the model is built, and the flags."""

import pytest
import torch

from papo_kernels.train import main
from papo_kernels.trainer import Trainer, TrainerConfig
from papo_kernels.trainer import model_options
from papo_kernels.trainer.errors import TrainerInputError
from papo_kernels.trainer.model_options import flash_attention_importable, resolve_attn_implementation

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import save_model_folder, small_config


@pytest.mark.parametrize("field, value, message", [
    ("torch_dtype", "float64", "config field 'torch_dtype': got 'float64', expected one of ['float32', 'bfloat16']"),
    ("torch_dtype", "float16", "config field 'torch_dtype': got 'float16', expected 'float32' or 'bfloat16': AdamW "
                               "on float16 weights writes inf and NaN"),
    ("mixed_precision", "fp8", "config field 'mixed_precision': got 'fp8', expected one of ['no', 'bf16', 'fp16']"),
    ("attn_implementation", "flash", "config field 'attn_implementation': got 'flash', expected one of ['auto', "
                                     "'sdpa', 'eager', 'flash_attention_2']"),
    ("gradient_checkpointing", "yes", "config field 'gradient_checkpointing': got 'yes', expected true or false"),
    ("model_type", "llava", "config field 'model_type': got 'llava', expected null or one of ['qwen2_vl', "
                            "'qwen2_5_vl']"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(TrainerInputError) as error:
        TrainerConfig(**{field: value}).validate()
    assert str(error.value).startswith(message), error.value


def test_mixed_precision_needs_float32_weights():
    with pytest.raises(TrainerInputError) as error:
        TrainerConfig(torch_dtype="bfloat16", mixed_precision="bf16").validate()
    assert str(error.value).startswith("config field 'mixed_precision': got 'bf16', expected 'no' with torch_dtype "
                                       "'bfloat16' (mixed precision computes in half precision over float32 weights"), \
        error.value


def test_auto_attention_is_sdpa_without_flash_attn_or_cuda():
    # This machine has neither: auto falls back to SDPA even for a CUDA device.
    assert not flash_attention_importable()
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"


def test_auto_attention_is_flash_attention_on_cuda_where_flash_attn_imports(monkeypatch):
    # The branch a GPU machine with the gpu extra takes; nothing is loaded, only the choice is made.
    monkeypatch.setattr(model_options, "flash_attention_importable", lambda: True)
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("flash_attention_2", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("sdpa", torch.device("cuda")) == "sdpa"


@pytest.mark.parametrize("overrides, message", [
    (dict(attn_implementation="flash_attention_2"),
     "config field 'attn_implementation': got 'flash_attention_2', but the model runs on cpu; FlashAttention needs a "
     "CUDA GPU"),
    (dict(mixed_precision="fp16"),
     "config field 'mixed_precision': got 'fp16', but the model runs on cpu; float16 autocast with its gradient scaler "
     "needs a CUDA GPU"),
])
def test_what_this_machine_cannot_run_is_refused_before_anything_is_built(tmp_path, overrides, message):
    output_dir = tmp_path / "run"
    with pytest.raises(TrainerInputError) as error:
        Trainer(small_config(output_dir, **overrides))
    assert str(error.value).startswith(message), error.value
    assert not output_dir.exists(), "refused before the output directory is made"


def test_flash_attention_cannot_be_resolved_where_flash_attn_does_not_import():
    with pytest.raises(TrainerInputError, match="flash_attn does not import here; install the gpu extra"):
        resolve_attn_implementation("flash_attention_2", torch.device("cuda"))


def test_a_mixed_precision_asked_by_accelerate_launch_must_be_the_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(TrainerInputError) as error:
        Trainer(small_config(tmp_path / "run"))
    assert str(error.value) == ("config field 'mixed_precision': got 'no', but accelerate launch asks for 'bf16'; "
                                "give the same value to both")


def test_a_model_type_that_is_not_the_folders_is_refused(tmp_path, capsys):
    folder = save_model_folder(tmp_path / "model", "qwen2_vl")
    message = cli_error(capsys, ["--model", str(folder), "--model-type", "qwen2_5_vl", "--output-dir",
                                 str(tmp_path / "run")] + SMALL_FLAGS)
    assert message == (f"config field 'model_type': got 'qwen2_5_vl', but --model {folder} holds a 'qwen2_vl' "
                       "model; give 'qwen2_vl' or null")


def test_help_shows_the_model_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--torch-dtype", "--mixed-precision", "--attn-implementation", "--gradient-checkpointing",
                 "--no-gradient-checkpointing", "--model-type"):
        assert flag in out, flag
    assert "auto is flash_attention_2 when flash_attn imports on CUDA, else sdpa" in out


def test_a_bad_dtype_flag_is_a_one_line_error(tmp_path, capsys):
    message = cli_error(capsys, ["--torch-dtype", "float16", "--output-dir", str(tmp_path / "run")])
    assert message.startswith("config field 'torch_dtype': got 'float16', expected 'float32' or 'bfloat16'")
