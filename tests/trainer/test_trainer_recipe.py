"""The GPU recipe for Qwen2.5-VL-3B is a valid config with the paper's PAPO-D settings, and its settings run end to
end on the tiny Qwen2.5-VL (the model, data, batch and lengths scaled down; bfloat16 autocast on the CPU)."""

import dataclasses
from pathlib import Path

from papo_kernels.trainer import Trainer, TrainerConfig

RECIPE = Path(__file__).parents[2] / "examples" / "qwen2_5_vl_3b_papo_d.yaml"


def test_the_recipe_is_a_valid_papo_d_config():
    config = TrainerConfig.from_yaml(RECIPE).validate()
    assert (config.torch_dtype, config.mixed_precision, config.attn_implementation, config.gradient_checkpointing) \
        == ("float32", "bf16", "auto", True)
    assert (config.model_type, config.preset, config.eval_every) == ("qwen2_5_vl", "papo_d", 0)
    loss = config.loss_kwargs()
    assert (loss["gamma"], loss["eta_clean"], loss["eta_masked"], loss["beta"]) == (0.01, 0.03, 0.03, 0.0)
    assert (loss["epsilon_low"], loss["epsilon_high"], loss["dual_clip"], loss["loss_type"]) == (0.2, 0.28, 3.0, "dapo")
    assert (config.learning_rate, config.weight_decay, config.group_size, config.prompts_per_step,
            config.minibatches, config.max_new_tokens, config.top_p) == (1e-6, 0.01, 5, 384, 3, 2048, 0.99)


def test_the_recipes_settings_train_the_tiny_qwen2_5_vl(tmp_path):
    recipe = TrainerConfig.from_yaml(RECIPE)
    # The tiny model answers with one word, never \boxed{}: first_word gives the rollouts rewards to learn from.
    config = dataclasses.replace(recipe, model=None, data=None, output_dir=str(tmp_path), steps=1, prompts_per_step=4,
                                 max_new_tokens=4, answer_format="first_word", learning_rate=3e-4, num_threads=1)
    trainer = Trainer(config)
    assert type(trainer.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    [record] = trainer.train()
    assert record["step"] == 0 and record["skipped"] == 0 and record["grad_norm"] > 0
