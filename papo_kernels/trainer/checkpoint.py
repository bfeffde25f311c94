"""Checkpoints: model, optimizer, lr schedule, next step and RNG state in one file, written atomically.

The file is written beside its final name, flushed to disk, then renamed over the
previous checkpoint (``os.replace`` is atomic on POSIX), so a kill at any moment
leaves either the old checkpoint or the new one, never half of one.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> Dict[str, Any]:
    """The state of every random generator a step draws from (Python, NumPy, torch)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(output_dir, *, model_state: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
                    scheduler_state: Dict[str, Any], next_step: int, rng_states: List[Dict[str, Any]],
                    config: Dict[str, Any]) -> Path:
    """Write ``output_dir/checkpoint.pt`` atomically; ``rng_states`` holds one state per process."""
    path = Path(output_dir) / CHECKPOINT_NAME
    payload = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler_state,
               "next_step": next_step, "rng_states": rng_states, "config": config}
    descriptor, temporary = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(output_dir) -> Dict[str, Any]:
    """The payload of ``output_dir/checkpoint.pt``; a clear error when there is none."""
    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume first")
    # The file holds Python RNG state and the config besides tensors, so it cannot load with weights_only;
    # mmap reads tensors only when used, so reading just the config stays cheap.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
