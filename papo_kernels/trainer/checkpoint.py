"""Checkpoints: model, optimizer, lr schedule, loss scaler, next step, RNG state, config and vocabulary in one file.

The file is written atomically (``files.write_atomically``): a kill at any moment leaves
either the old checkpoint or the new one. The tokenizer's vocabulary is stored so that a
resume with a different tokenizer (another task's words, another model) is refused
rather than reading the saved token ids as other words.

Everything in it is tensors and plain Python values, so it loads with ``weights_only``:
loading runs no code from the file, and damaged bytes cannot make the unpickler reserve
memory for a huge memo index (the full unpickler does: one randomly damaged checkpoint
grew to 22 GB before the kernel killed the process).

Its bytes are verified before it is read: ``torch.save`` writes a zip archive that records
a CRC-32 of every member, and ``torch.load`` checks none of them (a flipped byte inside a
tensor loads as another number). ``load_checkpoint`` reads every member against its CRC
first, so a damaged checkpoint is an error naming the file before any work, and is never
trained on (nor overwritten at the next save by one that looks sound).
"""

import random
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .errors import TrainerInputError
from .files import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"
# What each entry of the payload is; a file with other kinds there was not written by papo-train.
PAYLOAD_TYPES = {"model": dict, "optimizer": dict, "scheduler": dict, "next_step": int, "rng_states": list,
                 "config": dict, "vocabulary": dict}
PAYLOAD_KEYS = tuple(PAYLOAD_TYPES)


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The state of every random generator a step draws from (Python, NumPy, torch's CPU one and, for a CUDA
    ``device``, that device's, which sampling on it draws from), as plain values and tensors."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, key.tolist(), position, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore ``rng_state``'s generators; the CUDA one when the state has it and ``device`` is a CUDA device (a
    run saved on one kind of device and resumed on the other keeps the generators both have)."""
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(output_dir, *, model_state: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
                    scheduler_state: Dict[str, Any], next_step: int, rng_states: List[Dict[str, Any]],
                    config: Dict[str, Any], vocabulary: Dict[str, int],
                    scaler_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``output_dir/checkpoint.pt`` atomically; ``rng_states`` holds one state per process,
    ``vocabulary`` the tokenizer's token -> id map and ``scaler_state`` fp16's loss scaler (None without one;
    a checkpoint written before it was saved has no ``scaler`` key)."""
    payload = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler_state,
               "next_step": next_step, "rng_states": rng_states, "config": config, "vocabulary": vocabulary,
               "scaler": scaler_state}
    return write_atomically(Path(output_dir) / CHECKPOINT_NAME, lambda handle: torch.save(payload, handle))


def _damage(path: Path) -> Optional[str]:
    """Why the zip archive ``path`` is damaged (not a zip archive, a member whose bytes fail its CRC-32 or cannot be
    read), or None when every member reads back as written."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except zipfile.BadZipFile as error:  # also the CRC error of a member testzip reads in one piece
        return f"not a whole zip archive: {error}"
    except (OSError, EOFError, ValueError, NotImplementedError) as error:
        return f"its members cannot be read: {type(error).__name__}: {error}"
    if bad is not None:
        return f"the bytes of its member {bad} fail their CRC-32"
    return None


def load_checkpoint(output_dir) -> Dict[str, Any]:
    """The payload of ``output_dir/checkpoint.pt``; ``TrainerInputError`` naming the file when there is none
    or it cannot be read as a checkpoint (its bytes fail their CRCs, or it is not a papo-train checkpoint). The
    CRCs are read each time (a resume reads the file twice: for its config, then for the state)."""
    path = Path(output_dir) / CHECKPOINT_NAME
    if path.exists() and not path.is_file():
        raise TrainerInputError(f"--resume: {path} is not a regular file, so it holds no checkpoint")
    if not path.is_file():
        raise TrainerInputError(f"--resume: no checkpoint at {path}; train without --resume first")
    unreadable = f"--resume: {path} cannot be read as a checkpoint: damaged, truncated or not written by papo-train"
    damage = _damage(path)
    if damage is not None:
        raise TrainerInputError(f"{unreadable} ({damage})")
    # mmap reads tensors only when used, so reading just the config stays cheap.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # A file whose CRCs hold can still be no checkpoint: torch's zip reader raises RuntimeError, the unpickler of
    # other bytes UnpicklingError, UnicodeDecodeError, KeyError, ValueError, EOFError (seen over random damage).
    except Exception as error:  # noqa: BLE001 (reported with its type, the cause kept)
        # The first sentence: torch adds a paragraph of advice to its reader's errors.
        reason = " ".join(str(error).split(". ")[0].split())
        raise TrainerInputError(f"{unreadable} ({type(error).__name__}: {reason})") from error
    missing = [key for key in PAYLOAD_KEYS if key not in payload] if isinstance(payload, dict) else PAYLOAD_KEYS
    if missing:
        raise TrainerInputError(f"--resume: {path} is not a papo-train checkpoint of this version: it lacks "
                                f"{list(missing)}")
    wrong = [f"{key}: got {type(payload[key]).__name__}, expected {kind.__name__}"
             for key, kind in PAYLOAD_TYPES.items()
             if not isinstance(payload[key], kind) or isinstance(payload[key], bool)]
    if wrong:
        raise TrainerInputError(f"--resume: {path} is not a papo-train checkpoint: {'; '.join(wrong)}")
    return payload
