"""completion_hidden_states and output_head on the offline tiny Qwen2-VL: the head's own input, no logits."""

import random

import pytest
import torch

from papo_kernels.hidden_states import completion_hidden_states, gathered_head, output_head, unwrap_model
from papo_kernels.trainer.data import synthetic_example, synthetic_words
from papo_kernels.trainer.rollout import encode_prompts
from papo_kernels.trainer.tiny_model import build_model, build_processor

COMPLETION = 3


@pytest.fixture(scope="module")
def model_and_inputs():
    processor = build_processor(synthetic_words(["color"]), 56)
    model = build_model(processor.tokenizer, seed=0)
    rng = random.Random(0)
    examples = [synthetic_example("color", rng, 56) for _ in range(3)]
    prompt = encode_prompts(processor, examples)
    words = processor.tokenizer.convert_tokens_to_ids(["red", "blue", "green"])
    completion = torch.tensor(words)[torch.randint(0, 3, (3, COMPLETION), generator=torch.Generator().manual_seed(0))]
    inputs = dict(prompt)
    inputs["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    return model, inputs


class Wrapper(torch.nn.Module):
    """A wrapper in the style of DDP: the model is its ``.module`` and its forward calls the model's."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_hidden_states_give_the_models_logits(model_and_inputs):
    model, inputs = model_and_inputs
    hidden = completion_hidden_states(model, inputs, COMPLETION)
    weight, bias = output_head(model)
    assert hidden.shape == (3, COMPLETION, model.config.text_config.hidden_size) and bias is None
    logits = model(**inputs).logits[:, -COMPLETION - 1:-1]
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-6, atol=1e-6)
    backbone = model.model(**inputs).last_hidden_state[:, -COMPLETION - 1:-1]
    torch.testing.assert_close(hidden, backbone, rtol=0, atol=0)


def test_hidden_states_under_bf16_autocast_are_the_heads_input(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = completion_hidden_states(model, inputs, COMPLETION)
        backbone = model.model(**inputs).last_hidden_state[:, -COMPLETION - 1:-1]
    torch.testing.assert_close(hidden, backbone, rtol=0, atol=0)


def test_the_call_goes_through_the_wrapper_and_carries_gradient(model_and_inputs):
    model, inputs = model_and_inputs
    wrapped = Wrapper(model)
    assert unwrap_model(wrapped) is model
    hidden = completion_hidden_states(wrapped, inputs, COMPLETION)
    weight, _ = output_head(wrapped)
    assert wrapped.calls == 1
    model.zero_grad()
    (hidden @ weight.T).logsumexp(-1).sum().backward()
    for name in ("lm_head.weight", "model.language_model.norm.weight", "model.visual.patch_embed.proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not model._forward_pre_hooks and not model.lm_head._forward_pre_hooks, "the hook must be removed"


def test_bad_arguments_are_named(model_and_inputs):
    model, inputs = model_and_inputs
    length = inputs["input_ids"].shape[1]
    for bad in (0, length):
        with pytest.raises(ValueError, match=f"completion_length must be an int in \\[1, {length - 1}\\], got {bad}"):
            completion_hidden_states(model, inputs, bad)
    for bad in (2.0, True, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="completion_length must be an int"):
            completion_hidden_states(model, inputs, bad)
    with pytest.raises(ValueError, match="input_ids"):
        completion_hidden_states(model, {"attention_mask": inputs["attention_mask"]}, 1)
    with pytest.raises(ValueError, match="output embeddings"):
        output_head(torch.nn.Linear(2, 2))


def peft_model(target_modules, modules_to_save=None):
    """The tiny Qwen2-VL under a real PEFT LoRA adapter (random adapter weights, so it changes the outputs)."""
    peft = pytest.importorskip("peft")
    processor = build_processor(synthetic_words(["color"]), 56)
    model = build_model(processor.tokenizer, seed=0)
    config = peft.LoraConfig(r=2, target_modules=target_modules, modules_to_save=modules_to_save,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("target_modules, modules_to_save", [(["q_proj", "v_proj"], None), (["q_proj"], ["lm_head"])],
                         ids=["lora-attention", "lm_head-to-save"])
def test_peft_models_give_the_heads_own_input_and_weight(model_and_inputs, target_modules, modules_to_save):
    _, inputs = model_and_inputs
    model = peft_model(target_modules, modules_to_save)
    hidden = completion_hidden_states(model, inputs, COMPLETION)
    weight, bias = output_head(model)
    assert bias is None and weight.requires_grad == (modules_to_save is not None)
    logits = model(**inputs).logits[:, -COMPLETION - 1:-1]
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)


def test_a_lora_adapter_on_the_head_is_refused(model_and_inputs):
    """LoRA on lm_head changes its output, which hidden @ weight.T would silently leave out (2.98 off here)."""
    model = peft_model(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="LM head is an adapter layer .*keep lm_head out of the adapter's target"):
        output_head(model)
    with pytest.raises(ValueError, match="LM head is an adapter layer"):
        completion_hidden_states(model, model_and_inputs[1], COMPLETION)


def test_an_empty_head_is_refused():
    """A head whose weight is an empty placeholder that is not DeepSpeed's (a real ZeRO-3 head is tested in
    tests/test_zero3.py), made by hand."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight.data = torch.empty(0)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match=r"LM head's weight is empty \(shape \(0,\)\), partitioned outside"):
        output_head(Head())


def test_gathered_head_without_zero3_is_the_heads_own_weight(model_and_inputs):
    model, _ = model_and_inputs
    with gathered_head(Wrapper(model)) as (weight, bias):
        assert weight is model.lm_head.weight and bias is None
