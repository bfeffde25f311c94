"""Offline tiny Qwen2-VL and Qwen2.5-VL: word-level tokenizer, PIL image processor, processor, random-init model.

Everything is built from code, with no hub access, so the default run works on a
fresh clone without a download. Sizes follow shared TRAINER_NOTES.md: a model of
about 0.15-0.16 M parameters that learns the synthetic colour task on a 2-core CPU.
Both architectures share the tokenizer and the image processor (Qwen2.5-VL uses
Qwen2-VL's image processor and image tokens).
"""

from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .local_model import ImageOnlyQwen2VLProcessor

PAD_TOKEN = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
# The Qwen-VL control tokens, with the ids' order of the real vocabulary's tail.
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", END_OF_TURN, "<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN,
                  "<|video_pad|>")
CHAT_WORDS = ("user", "assistant")

# One user turn with the image first, then the question; the assistant turn is left open.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the Qwen-VL special tokens (first), chat words and ``words``."""
    words = [word for word in dict.fromkeys(CHAT_WORDS + tuple(words)) if word not in SPECIAL_TOKENS]
    vocabulary = list(SPECIAL_TOKENS) + words
    word_level = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(vocabulary)},
                                            unk_token=PAD_TOKEN))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token=PAD_TOKEN, eos_token=END_OF_TURN, unk_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), padding_side="left",
    )


def build_processor(words: Sequence[str], image_size: int) -> ImageOnlyQwen2VLProcessor:
    """Tokenizer (``build_tokenizer``) + ``Qwen2VLImageProcessorPil`` that keeps ``image_size`` x ``image_size``
    images as they are."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(words),
                                     chat_template=CHAT_TEMPLATE)


TEXT_HIDDEN, TEXT_HEADS = 64, 4


def _text_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The language model of both architectures: 2 layers, hidden 64, 4 heads (2 KV heads)."""
    ids = tokenizer.convert_tokens_to_ids
    mrope_section = [2, 3, 3]
    # The three M-RoPE sections (time, height, width) split the head's head_dim / 2 frequencies.
    assert sum(mrope_section) == TEXT_HIDDEN // TEXT_HEADS // 2
    return dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=TEXT_HEADS, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section),
                bos_token_id=None, eos_token_id=ids(END_OF_TURN), pad_token_id=ids(PAD_TOKEN))


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids(IMAGE_TOKEN), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def qwen2_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    """Qwen2-VL: one vision block of width 32 whose merger projects to the text width."""
    return Qwen2VLConfig(text_config=_text_config(tokenizer),
                         vision_config=dict(depth=1, embed_dim=32, hidden_size=TEXT_HIDDEN, num_heads=2, mlp_ratio=2,
                                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                         **_token_ids(tokenizer))


def qwen2_5_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: what its vision tower adds over Qwen2-VL's, at tiny size.

    Two vision blocks of width 32 with a gated MLP (``intermediate_size``) and RMSNorm; block 0
    attends within windows (``window_size`` pixels: 28 is one 2 x 2 merge block, so a 56-pixel
    image has four windows; the real model's 112 is 4 x 4 blocks) and block 1 over the whole
    image (``fullatt_block_indexes``); the merger projects to ``out_hidden_size``, the text width.
    The LM head is tied to the input embeddings, as in Qwen2.5-VL-3B.
    """
    return Qwen2_5_VLConfig(text_config=_text_config(tokenizer),
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                               out_hidden_size=TEXT_HIDDEN, patch_size=14, spatial_merge_size=2,
                                               temporal_patch_size=2, window_size=28, fullatt_block_indexes=[1]),
                            tie_word_embeddings=True, **_token_ids(tokenizer))


TINY_MODELS = {"qwen2_vl": (Qwen2VLForConditionalGeneration, qwen2_vl_config),
               "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config)}


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, model_type: str = "qwen2_vl",
                dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` (``model_type`` 'qwen2_vl', about 0.15 M
    parameters) or ``Qwen2_5_VLForConditionalGeneration`` ('qwen2_5_vl', about 0.16 M), sized for CPU RL.

    The weights are initialised in float32 from ``seed`` and then cast to ``dtype``, so every dtype
    starts from the same model up to rounding.
    """
    if model_type not in TINY_MODELS:
        raise ValueError(f"model_type must be one of {list(TINY_MODELS)}, got {model_type!r}")
    model_class, make_config = TINY_MODELS[model_type]
    torch.manual_seed(seed)
    model = model_class(make_config(tokenizer)).to(dtype)
    model.set_attn_implementation(attn_implementation)
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.pad_token_id = ids(PAD_TOKEN)
    model.generation_config.eos_token_id = ids(END_OF_TURN)
    model.generation_config.bos_token_id = None
    return model
