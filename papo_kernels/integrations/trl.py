"""PAPO in TRL: ``PAPOConfig`` and ``PAPOTrainer``, drop-in replacements of TRL's ``GRPOConfig`` and ``GRPOTrainer``.

Switching a TRL GRPO script to PAPO takes two imports and a config::

    from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer

    args = PAPOConfig.from_preset("papo_d", output_dir="runs/papo")
    trainer = PAPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.train()

Needs TRL (``pip install "papo-kernels[trl]"``); the tested range is ``TESTED_TRL``.
"""

import importlib.metadata
import warnings

TESTED_TRL = (">=1.16.0", "<1.17")
_TESTED_MIN, _TESTED_BELOW = (1, 16, 0), (1, 17)

try:
    import trl  # noqa: F401
except ImportError as error:
    raise ImportError(
        "papo_kernels.integrations.trl needs TRL, which is not installed: pip install \"papo-kernels[trl]\" "
        f"(tested with trl{','.join(TESTED_TRL)})"
    ) from error


def _release(version: str) -> tuple:
    parts = []
    for part in version.split("."):
        digits = "".join(character for character in part if character.isdigit())
        if not digits or digits != part:
            break
        parts.append(int(digits))
    return tuple(parts)


_TRL_VERSION = importlib.metadata.version("trl")
if not _TESTED_MIN <= _release(_TRL_VERSION) < _TESTED_BELOW:
    warnings.warn(f"papo_kernels.integrations.trl is tested with trl{','.join(TESTED_TRL)}; found trl "
                  f"{_TRL_VERSION}. PAPOTrainer overrides private GRPOTrainer methods, which may have changed.",
                  stacklevel=2)

from ._trl_config import PAPOConfig  # noqa: E402
from ._trl_trainer import PAPOTrainer  # noqa: E402

__all__ = ["PAPOConfig", "PAPOTrainer", "TESTED_TRL"]
