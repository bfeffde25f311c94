"""The real PAPOTrainer on the offline tiny Qwen2-VL: training steps, the masked images, the masked pass's gradient."""

import numpy as np
import pytest
import torch

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from papo_kernels.masking import normalised_black
import papo_kernels.integrations._trl_trainer as trl_trainer
from trl_setup import (NUM_GENERATIONS, build_processor_and_model_folder, colour_dataset, common_fields,
                       first_word_reward, generation_rows, length_reward)

NUM_PROMPTS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2vl")
    return folder, build_processor_and_model_folder(folder), colour_dataset(2 * NUM_PROMPTS)


def make_trainer(tiny, tmp_path, preset="papo_d", reward=length_reward, **fields):
    folder, processor, dataset = tiny
    args = PAPOConfig.from_preset(preset, **common_fields(processor, tmp_path, **fields))
    trainer = PAPOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=dataset,
                          eval_dataset=dataset.select(range(1)), processing_class=processor)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer


def test_papo_g_trains_a_few_steps(tiny, tmp_path):
    """PAPO-G (reference model, beta 0.01) under bf16 autocast with gradient checkpointing, two PPO iterations per
    rollout (old log-probs from the package's fused forward), a linear gamma schedule, then an evaluation."""
    trainer = make_trainer(tiny, tmp_path, preset="papo_g", reward=first_word_reward, max_steps=4, num_iterations=2,
                           learning_rate=1e-3, gradient_checkpointing=True, gamma_schedule="linear",
                           gamma_final=0.0, eta_clean=0.05, eta_masked=0.05)
    before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert all(torch.isfinite(torch.tensor(value)) for value in entry.values())
        for name in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                     "papo/perception_kl", "papo/entropy_masked", "papo/policy_loss", "papo/gamma"):
            assert name in entry, name
        assert entry["papo/perception_kl"] > 0 and 0 < entry["entropy"] <= torch.log(torch.tensor(47.0)).item() + 1e-4
    assert [entry["papo/gamma"] for entry in logs] == pytest.approx([0.02, 0.015, 0.01, 0.005])
    assert [entry["papo/eta_masked"] for entry in logs] == pytest.approx([0.05, 0.0375, 0.025, 0.0125])
    assert "reward" in logs[0] and "reward" in logs[2], "rewards are logged at the steps that generate"
    assert logs[0]["kl"] < 1e-3, "the reference starts as the policy"
    assert any(not torch.equal(before[name], value) for name, value in trainer.model.named_parameters())
    evaluation = trainer.evaluate()
    assert "eval_papo/perception_kl" in evaluation and torch.isfinite(torch.tensor(evaluation["eval_loss"]))


def masked_blocks(batch):
    """Per sample: (masked rows, clean rows) of its image."""
    rows = batch["image_grid_thw"].prod(-1).tolist()
    return list(zip(batch["masked_pixel_values"], torch.split(batch["pixel_values"], rows)))


@pytest.mark.parametrize("mask_target", ["image", "pixel_values"])
def test_one_mask_per_prompt_fresh_each_rollout(tiny, tmp_path, mask_target):
    trainer = make_trainer(tiny, tmp_path, mask_target=mask_target)
    rows = generation_rows(tiny[2], NUM_PROMPTS)
    black = normalised_black(trainer.processing_class.image_processor.image_mean,
                             trainer.processing_class.image_processor.image_std)
    rollouts = []
    for _ in range(2):
        batch = trainer._generate_and_score_completions(rows)
        blocks = masked_blocks(batch)
        assert len(blocks) == NUM_PROMPTS * NUM_GENERATIONS
        is_black = []
        for masked, clean in blocks:
            black_rows = (masked.view(masked.shape[0], 3, -1) == black[None, :, None]).all(-1).all(-1)
            # A masked image is its clean image with some patches black: never a mask applied twice.
            torch.testing.assert_close(masked[~black_rows], clean[~black_rows], rtol=0, atol=0)
            is_black.append(black_rows)
        for group in range(NUM_PROMPTS):
            first = group * NUM_GENERATIONS
            for member in range(first + 1, first + NUM_GENERATIONS):
                torch.testing.assert_close(blocks[member][0], blocks[first][0], rtol=0, atol=0)
        assert not torch.equal(is_black[0], is_black[NUM_GENERATIONS]), "different prompts get different masks"
        fraction = torch.stack(is_black).float().mean().item()
        assert 0.3 < fraction < 0.9, fraction  # 0.6 in expectation; 3 masks of 16 patches
        rollouts.append(torch.stack(is_black))
    assert not torch.equal(rollouts[0], rollouts[1]), "every rollout draws fresh masks"


def test_the_masked_pass_receives_gradient(tiny, tmp_path, monkeypatch):
    trainer = make_trainer(tiny, tmp_path)
    captured = {}

    def keep_masked_hidden_states(*args, **kwargs):
        captured.update(kwargs)
        kwargs["hidden_masked"].retain_grad()
        return papo_loss(*args, **kwargs)

    papo_loss = trl_trainer.papo_loss
    monkeypatch.setattr(trl_trainer, "papo_loss", keep_masked_hidden_states)
    batch = trainer._prepare_inputs(generation_rows(tiny[2], 1))
    trainer.compute_loss(trainer.model, batch).backward()
    grad = captured["hidden_masked"].grad
    mask = batch["completion_mask"].bool()
    assert grad is not None and grad[mask].abs().sum(-1).min() > 0, "every response token's masked state"
    assert grad[~mask].abs().max() == 0
    assert captured["masked_logprobs"] is None


def test_detached_masked_logprobs_of_the_rollout_policy(tiny, tmp_path, monkeypatch):
    """masked_gradient=False: the masked pass runs once per rollout without gradient (the authors' default)."""
    trainer = make_trainer(tiny, tmp_path, masked_gradient=False)
    captured = {}

    def keep_arguments(*args, **kwargs):
        captured.update(kwargs)
        return papo_loss(*args, **kwargs)

    papo_loss = trl_trainer.papo_loss
    monkeypatch.setattr(trl_trainer, "papo_loss", keep_arguments)
    batch = trainer._prepare_inputs(generation_rows(tiny[2], 1))
    assert "masked_pixel_values" not in batch
    masked_logps = batch["masked_per_token_logps"]
    assert not masked_logps.requires_grad and masked_logps.shape == batch["completion_ids"].shape
    mask = batch["completion_mask"].bool()
    assert (masked_logps[mask] < 0).all() and (masked_logps[~mask] == 0).all()
    trainer.compute_loss(trainer.model, batch).backward()
    assert captured["hidden_masked"] is None and captured["masked_logprobs"] is masked_logps


def test_text_only_prompts_are_refused(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path)
    rows = [{"prompt": [{"role": "user", "content": "what color is the square ?"}], "answer": "red"}] * NUM_GENERATIONS
    with pytest.raises(ValueError, match="needs image prompts"):
        trainer._generate_and_score_completions(rows)


def prompt_with_images(layout: str, example: dict, other_image) -> dict:
    """``example`` with its image in the ``image`` column, inside the prompt's message, or both: a message image
    (``other_image``) first, then a placeholder the column's image fills."""
    question = {"type": "text", "text": example["prompt"][0]["content"][1]["text"]}
    if layout == "column":
        return example
    if layout == "messages":
        content = [{"type": "image", "image": example["image"]}, question]
        return {"prompt": [{"role": "user", "content": content}], "answer": example["answer"]}
    content = [{"type": "image", "image": other_image}, {"type": "image"}, question]
    return {"prompt": [{"role": "user", "content": content}], "image": example["image"], "answer": example["answer"]}


@pytest.mark.parametrize("layout, images_per_prompt", [("column", 1), ("messages", 1), ("mixed", 2)])
def test_images_in_a_column_inside_the_messages_or_both(tiny, tmp_path, layout, images_per_prompt):
    """TRL's image formats, in the order TRL gives them to the processor: with nothing masked the masked
    pixel_values are the clean ones, image by image."""
    trainer = make_trainer(tiny, tmp_path, mask_probability=0.0)
    dataset = tiny[2]
    rows = [prompt_with_images(layout, dataset[0], dataset[1]["image"])] * NUM_GENERATIONS
    batch = trainer._prepare_inputs(rows)
    assert batch["num_images"] == [images_per_prompt] * len(batch["num_images"])
    torch.testing.assert_close(torch.cat(batch["masked_pixel_values"]), batch["pixel_values"], rtol=0, atol=0)
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_images_that_are_not_pil_are_refused(tiny):
    example = prompt_with_images("messages", tiny[2][0], None)
    example["prompt"][0]["content"][0]["image"] = np.asarray(example["prompt"][0]["content"][0]["image"])
    with pytest.raises(ValueError, match=r"PIL images.*'image' or 'images' column.*prompt 0 has \['ndarray'\]"):
        trl_trainer._prompt_images([example])


def test_a_lora_adapter_trains_through_trls_peft_config(tiny, tmp_path):
    """TRL's own peft_config: a real PEFT LoRA on the attention; the loss reads the frozen head, and only the
    adapter's weights move."""
    peft = pytest.importorskip("peft")
    folder, processor, dataset = tiny
    args = PAPOConfig.from_preset("papo_d", **common_fields(processor, tmp_path, max_steps=2, learning_rate=1e-2))
    trainer = PAPOTrainer(model=str(folder), reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=processor,
                          peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, value in trainer.model.named_parameters() if not torch.equal(before[name], value)]
    assert changed and all("lora_" in name for name in changed), changed
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["papo/perception_kl"] > 0 for entry in logs)
