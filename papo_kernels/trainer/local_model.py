"""Loading a local Qwen2-VL-family model (Qwen2-VL, Qwen2.5-VL) and an image-only processor for it.

A folder that cannot serve (no or unreadable config, tokenizer, image processor or weights; weights that lack
tensors of the model; a tokenizer without the model's image token) is a ``TrainerInputError`` naming ``--model``,
the folder and the part, raised before training; the small parts load before the weights.
"""

import json
from pathlib import Path
from typing import Callable, Optional, Tuple, TypeVar

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.utils import logging as transformers_logging

from .errors import TrainerInputError

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")
SHOWN_KEYS = 3  # tensors named in an error
Loaded = TypeVar("Loaded")


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (it also serves Qwen2.5-VL, whose image tokens are the same).

    The stock class needs a video processor, whose class needs torchvision (which would pull a CUDA
    build of torch); this one has an image processor and a tokenizer only, so ``save_pretrained`` and
    ``from_pretrained`` (transformers' own) write and read just those two and the chat template.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        # Qwen2VLProcessor hands ProcessorMixin (image_processor, tokenizer, video_processor=None); ProcessorMixin pairs
        # them with get_attributes(), the processors named in this signature, so the None has no attribute to fill.
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


def _chat_template(path: Path, tokenizer) -> str:
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise TrainerInputError(f"--model: {path} has no chat template (tokenizer_config.json, chat_template.jinja or "
                     "chat_template.json)")


def _load_part(part: str, path: Path, load: Callable[[], Loaded]) -> Loaded:
    """``load()``, transformers' and safetensors' errors turned into one ``TrainerInputError`` naming ``part``."""
    try:
        return load()
    # OSError: a missing or unreadable file; ValueError: a file that is not JSON; RuntimeError: weights transformers
    # cannot convert; SafetensorError: a damaged or truncated weight file.
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:300]
        raise TrainerInputError(f"--model: cannot load the {part} of {path} ({type(error).__name__}: {reason})") \
            from None


def _check_image_token(path: Path, processor: ImageOnlyQwen2VLProcessor, image_token_id: int) -> None:
    got = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if got != image_token_id:
        raise TrainerInputError(f"--model: the tokenizer of {path} gives the image token {processor.image_token!r} "
                                f"the id {got}, the model expects {image_token_id}; the tokenizer files "
                                "(tokenizer.json, tokenizer_config.json) are missing or belong to another model")


def _load_weights(path: Path, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    """The model of ``path``, refused when its weight files lack tensors of the model or hold some of other shapes
    (transformers would initialise those at random; its multi-line report of them is silenced for the one-line
    error)."""
    files = ", ".join(sorted(file.name for pattern in WEIGHT_FILE_PATTERNS for file in path.glob(pattern)))
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, loading = _load_part(f"weights ({files or 'no weight file'})", path,
                                    lambda: AutoModelForImageTextToText.from_pretrained(
                                        path, dtype=dtype, attn_implementation=attn_implementation,
                                        local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True))
    finally:
        transformers_logging.set_verbosity(verbosity)
    problems = []
    missing = sorted(loading["missing_keys"])
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are missing (e.g. {missing[:SHOWN_KEYS]})")
    mismatched = sorted(loading["mismatched_keys"])
    if mismatched:
        shapes = ", ".join(f"{key} {list(saved)} where the model has {list(expected)}"
                           for key, saved, expected in mismatched[:SHOWN_KEYS])
        problems.append(f"{len(mismatched)} tensor(s) have another shape (e.g. {shapes})")
    if problems:
        raise TrainerInputError(f"--model: the weights of {path} ({files}) do not fit the model of its config.json: "
                                f"{'; '.join(problems)}; a weight file is missing or was written for another model")
    return model


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
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except OSError as error:  # transformers' report of an unreadable or invalid config.json
        raise TrainerInputError(f"--model: {error}") from None
    folder_type = config.model_type
    if folder_type not in SUPPORTED_MODEL_TYPES:
        raise TrainerInputError(f"--model: {path} holds a {folder_type!r} model; supported are "
                                f"{list(SUPPORTED_MODEL_TYPES)}")
    if model_type is not None and model_type != folder_type:
        raise TrainerInputError(f"config field 'model_type': got {model_type!r}, but --model {path} holds a "
                                f"{folder_type!r} model; give {folder_type!r} or null")
    tokenizer = _load_part("tokenizer", path,
                           lambda: AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True))
    image_processor = _load_part("image processor (preprocessor_config.json)", path,
                                 lambda: AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True))
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=_chat_template(path, tokenizer))
    _check_image_token(path, processor, config.image_token_id)
    return _load_weights(path, dtype, attn_implementation), processor

