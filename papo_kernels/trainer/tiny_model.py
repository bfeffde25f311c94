"""An offline tiny Qwen2-VL: word-level tokenizer, PIL image processor, processor and random-init model.

Everything is built from code, with no hub access, so the default run works on a
fresh clone without a download. Sizes follow shared TRAINER_NOTES.md: a model of
about 0.17 M parameters that learns the synthetic colour task on a 2-core CPU.
"""

from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
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
    """A whitespace word-level tokenizer over the Qwen-VL special tokens, chat words and ``words``."""
    vocabulary = list(SPECIAL_TOKENS) + list(CHAT_WORDS)
    vocabulary += [word for word in dict.fromkeys(words) if word not in vocabulary]
    word_level = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(vocabulary)},
                                            unk_token=PAD_TOKEN))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token=PAD_TOKEN, eos_token=END_OF_TURN, unk_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), padding_side="left",
    )


def build_processor(words: Sequence[str], image_size: int) -> ImageOnlyQwen2VLProcessor:
    """Tokenizer + ``Qwen2VLImageProcessorPil`` that keeps ``image_size`` x ``image_size`` images as they are."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(words),
                                video_processor=None, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` sized for CPU RL (about 0.17 M parameters)."""
    text_hidden, text_heads = 64, 4
    head_dim = text_hidden // text_heads
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=text_heads, num_key_value_heads=2, max_position_embeddings=256,
            # The three M-RoPE sections (time, height, width) split the head's head_dim / 2 frequencies.
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
            bos_token_id=None, eos_token_id=ids(END_OF_TURN), pad_token_id=ids(PAD_TOKEN),
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=text_hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids(IMAGE_TOKEN), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids(PAD_TOKEN)
    model.generation_config.eos_token_id = ids(END_OF_TURN)
    model.generation_config.bos_token_id = None
    return model
