"""papo_kernels: the PAPO objective computed from final hidden states without the N x V logits."""

from .backends import BACKENDS
from .loss import PRESETS, PAPOLoss, papo_loss
from .ops.logprobs import LinearLogprobs, linear_logprobs
from .ops.perception_kl import LinearPerceptionKL, linear_perception_kl

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PRESETS",
    "LinearLogprobs",
    "LinearPerceptionKL",
    "PAPOLoss",
    "linear_logprobs",
    "linear_perception_kl",
    "papo_loss",
]
