"""A slim GRPO/PAPO trainer for Qwen2-VL-family models on top of ``papo_kernels.papo_loss``.

``Trainer(TrainerConfig(...)).train()`` runs the loop of ``loop.py``; ``papo-train``
(``papo_kernels.train``) is its command line. Without a model or data it trains a
tiny random-init Qwen2-VL on a synthetic shapes task, offline, on a CPU.
"""

from .config import TrainerConfig
from .loop import Trainer

__all__ = ["Trainer", "TrainerConfig"]
