"""Loading a local Qwen2-VL-family model (Qwen2-VL, Qwen2.5-VL) and an image-only processor for it."""

import json
from pathlib import Path
from typing import Optional, Tuple

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from .errors import TrainerInputError

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (it also serves Qwen2.5-VL, whose image tokens are the same).

    The stock class checks its video processor against a class that needs torchvision
    (which would pull a CUDA build of torch); this one has no video processor and skips
    only that check.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _chat_template(path: Path, tokenizer) -> str:
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise TrainerInputError(f"--model: {path} has no chat template (tokenizer_config.json, chat_template.jinja or "
                     "chat_template.json)")


def load_local_model(path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                     model_type: Optional[str] = None) -> Tuple[torch.nn.Module, ImageOnlyQwen2VLProcessor]:
    """The model and processor in the local Hugging Face folder ``path``; nothing is downloaded.

    The weights load straight into ``dtype`` (no float32 copy first) with the attention kernel
    ``attn_implementation``; ``model_type``, when given, must be the folder's.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TrainerInputError(f"--model: {path} is not a local Hugging Face model folder (no config.json)")
    try:
        folder_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except OSError as error:  # transformers' report of an unreadable or invalid config.json
        raise TrainerInputError(f"--model: {error}") from None
    if folder_type not in SUPPORTED_MODEL_TYPES:
        raise TrainerInputError(f"--model: {path} holds a {folder_type!r} model; supported are "
                                f"{list(SUPPORTED_MODEL_TYPES)}")
    if model_type is not None and model_type != folder_type:
        raise TrainerInputError(f"config field 'model_type': got {model_type!r}, but --model {path} holds a "
                                f"{folder_type!r} model; give {folder_type!r} or null")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                          chat_template=_chat_template(path, tokenizer))
    return model, processor
