"""Backends that compute the per-token statistics of the LM head.

Each backend module provides the same two functions on flattened inputs,
``linear_logprobs(hidden, weight, tokens, bias, temperature)`` and
``linear_perception_kl(hidden, hidden_masked, weight, tokens, bias, temperature)``;
see ``reference.py`` for the semantics.
"""

from types import ModuleType

import torch

from .._checks import check_choice
from . import reference

BACKENDS = ("auto", "reference")

_MODULES = {"reference": reference}


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name``; ``auto`` picks the best one available on ``device``."""
    check_choice("backend", name, BACKENDS)
    if name == "auto":
        name = "reference"
    return _MODULES[name]
