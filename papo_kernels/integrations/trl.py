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

try:
    import trl  # noqa: F401
except ImportError as error:
    raise ImportError(
        "papo_kernels.integrations.trl needs TRL, which is not installed: pip install \"papo-kernels[trl]\" "
        f"(tested with trl{','.join(TESTED_TRL)})"
    ) from error

from packaging.specifiers import SpecifierSet  # noqa: E402 (a dependency of TRL)

_TRL_VERSION = importlib.metadata.version("trl")
if _TRL_VERSION not in SpecifierSet(",".join(TESTED_TRL)):
    warnings.warn(f"papo_kernels.integrations.trl is tested with trl{','.join(TESTED_TRL)}; found trl "
                  f"{_TRL_VERSION}. PAPOTrainer overrides private GRPOTrainer methods, which may have changed.",
                  stacklevel=2)

from ._trl_config import PAPOConfig  # noqa: E402
from ._trl_trainer import PAPOTrainer  # noqa: E402

__all__ = ["PAPOConfig", "PAPOTrainer", "TESTED_TRL"]
