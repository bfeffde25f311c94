"""How the model is held and run: weight dtype, attention kernel, gradient checkpointing, mixed precision.

The config names are those of transformers and accelerate (``torch_dtype``,
``attn_implementation``, ``gradient_checkpointing``, ``mixed_precision``). The choices
that depend on the machine (whether FlashAttention can run, whether fp16 autocast can)
are settled here, once the device is known, with a ``TrainerInputError`` naming the
field when the machine cannot do what the config asks.
"""

import importlib

import torch
from transformers.utils import is_flash_attn_2_available

from .errors import TrainerInputError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # float16: TrainerConfig says why not
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


def flash_attention_importable() -> bool:
    """Whether ``flash_attn`` imports and transformers accepts it (a CUDA torch and flash-attn >= 2.3.3)."""
    if not is_flash_attn_2_available():
        return False
    try:
        importlib.import_module("flash_attn")
    except (ImportError, OSError):  # OSError: a wheel built for another CUDA or torch fails to load its library
        return False
    return True


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """The attention kernel to load the model with.

    ``auto`` is ``flash_attention_2`` when ``flash_attn`` imports and the model is on CUDA, else
    ``sdpa`` (PyTorch's scaled-dot-product attention, which runs everywhere). ``flash_attention_2``
    asked for where it cannot run is an error naming the field.
    """
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attention_importable() else "sdpa"
    if requested == "flash_attention_2":
        if not on_cuda:
            raise TrainerInputError(f"config field 'attn_implementation': got 'flash_attention_2', but the model runs "
                                    f"on {torch.device(device).type}; FlashAttention needs a CUDA GPU (use 'sdpa' or "
                                    "'auto')")
        if not flash_attention_importable():
            raise TrainerInputError("config field 'attn_implementation': got 'flash_attention_2', but flash_attn does "
                                    "not import here; install the gpu extra (README, Training) or use 'sdpa' or "
                                    "'auto'")
    return requested


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse fp16 autocast off CUDA: accelerate would silently run such a run in float32 on a CPU."""
    if mixed_precision == "fp16" and torch.device(device).type != "cuda":
        raise TrainerInputError(f"config field 'mixed_precision': got 'fp16', but the model runs on "
                                f"{torch.device(device).type}; float16 autocast with its gradient scaler needs a "
                                "CUDA GPU (use 'bf16' or 'no')")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder and vision block's activations in the backward instead of keeping them.

    The non-reentrant checkpoint of ``torch.utils.checkpoint``: it needs no input that requires
    grad and works under DDP and FSDP. Blocks checkpoint only in training mode, so generation
    (run in eval mode) keeps its KV cache and speed.
    """
    model.activation_checkpointing_enable({"use_reentrant": False})
