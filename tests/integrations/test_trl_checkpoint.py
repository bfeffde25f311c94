"""Checkpoints of TRL trainers on the offline tiny Qwen2-VL: the processor saves and loads, a checkpoint holds what a
resume needs, and a resumed PAPOTrainer replays the uninterrupted run (masks and weights) as closely as a resumed
GRPOTrainer replays its own."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from trl import GRPOConfig, GRPOTrainer

from papo_kernels.integrations._trl_trainer import MASK_STATE_FILE, _saved_weight_names
from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from papo_kernels.trainer.local_model import ImageOnlyQwen2VLProcessor, load_local_model
from trl_setup import build_processor_and_model_folder, colour_dataset, common_fields, length_reward

STEPS, SAVED_AT = 4, 2


class RecordingPAPOTrainer(PAPOTrainer):
    """PAPOTrainer that keeps the masked pixel_values of every rollout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.masks.append(torch.cat(output["masked_pixel_values"]).clone())
        return output


class GRPOTrainerLoadingRenamedWeights(GRPOTrainer):
    """Stock GRPOTrainer with PAPOTrainer's resume of weights saved under legacy names (transformers#43701), so its
    resume can be measured at all."""

    _load_from_checkpoint = PAPOTrainer._load_from_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2vl")
    return folder, build_processor_and_model_folder(folder), colour_dataset(8)


def make_trainer(tiny, output_dir: Path, trainer_class):
    folder, processor, dataset = tiny
    fields = common_fields(processor, output_dir, max_steps=STEPS, save_strategy="steps", save_steps=SAVED_AT,
                           learning_rate=1e-2, bf16=False)
    config = (PAPOConfig if issubclass(trainer_class, PAPOTrainer) else GRPOConfig)(**fields)
    return trainer_class(model=str(folder), reward_funcs=length_reward, args=config, train_dataset=dataset,
                         processing_class=processor)


def weights(model) -> dict:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """For PAPOTrainer and GRPOTrainer: a run of STEPS steps saving at step SAVED_AT, and a run resumed there."""
    results = {}
    for name, trainer_class in (("papo", RecordingPAPOTrainer), ("grpo", GRPOTrainerLoadingRenamedWeights)):
        root = tmp_path_factory.mktemp(name)
        uninterrupted = make_trainer(tiny, root / "uninterrupted", trainer_class)
        uninterrupted.train()
        resumed = make_trainer(tiny, root / "resumed", trainer_class)
        checkpoint = root / "uninterrupted" / f"checkpoint-{SAVED_AT}"
        resumed.train(resume_from_checkpoint=str(checkpoint))
        results[name] = dict(uninterrupted=uninterrupted, resumed=resumed, checkpoint=checkpoint)
    return results


def test_the_offline_processor_saves_and_loads(tiny, tmp_path):
    processor = tiny[1]
    processor.save_pretrained(tmp_path)
    loaded = ImageOnlyQwen2VLProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.chat_template == processor.chat_template and not hasattr(loaded, "video_processor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]}]
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    encoded = []
    for each in (processor, loaded):
        text = each.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded.append(each(text=[text], images=[image], return_tensors="pt"))
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(encoded[1][key], encoded[0][key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_holds_what_a_resume_needs(runs):
    checkpoint = runs["papo"]["checkpoint"]
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja",
                 "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", MASK_STATE_FILE):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / MASK_STATE_FILE).read_text() == '{"mask_rounds": 2}', "one rollout per step"
    model, processor = load_local_model(checkpoint)  # refuses a folder whose weights lack any tensor
    assert isinstance(processor, ImageOnlyQwen2VLProcessor)
    assert sum(value.numel() for value in model.parameters()) > 0


def test_resume_replays_masks_and_weights_as_grpo_trainer_does(tiny, runs):
    papo, grpo = runs["papo"], runs["grpo"]
    uninterrupted, resumed = papo["uninterrupted"].masks, papo["resumed"].masks
    assert len(uninterrupted) == STEPS and len(resumed) == STEPS - SAVED_AT
    for step, (mask, replayed) in enumerate(zip(uninterrupted[SAVED_AT:], resumed), start=SAVED_AT + 1):
        torch.testing.assert_close(replayed, mask, rtol=0, atol=0, msg=f"the masked images of step {step}")
    assert not torch.equal(uninterrupted[SAVED_AT], uninterrupted[SAVED_AT - 1]), "each rollout draws new masks"

    grpo_difference = largest_difference(weights(grpo["resumed"].model), weights(grpo["uninterrupted"].model))
    papo_difference = largest_difference(weights(papo["resumed"].model), weights(papo["uninterrupted"].model))
    initial = weights(Qwen2VLForConditionalGeneration.from_pretrained(tiny[0]))
    assert largest_difference(weights(papo["uninterrupted"].model), initial) > 1e-3, "the weights must move"
    assert papo_difference <= grpo_difference, (papo_difference, grpo_difference)


def test_resume_loads_every_tensor_saved_under_legacy_names(tiny, runs, tmp_path):
    """transformers 5.25 saves Qwen2-VL's tensors under their original names, which the Trainer's own resume
    (``load_state_dict``) matches only for ``lm_head`` (huggingface/transformers#43701); PAPOTrainer loads them all.
    When the stock assertion below fails, transformers has fixed it and the workaround can go."""
    checkpoint = runs["grpo"]["checkpoint"]
    saved = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    model_names = set(saved)
    assert "visual.patch_embed.proj.weight" in _saved_weight_names(checkpoint) - model_names

    stock = make_trainer(tiny, tmp_path / "stock", GRPOTrainer)
    stock._load_from_checkpoint(str(checkpoint))
    restored = [name for name, value in stock.model.state_dict().items() if torch.equal(value, saved[name])]
    assert restored == ["lm_head.weight"], restored

    papo = make_trainer(tiny, tmp_path / "papo", PAPOTrainer)
    papo._load_from_checkpoint(str(checkpoint))
    for name, value in papo.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
