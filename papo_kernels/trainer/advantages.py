"""Group-relative advantages and DAPO's filter of groups without signal.

Rewards come in groups: the G responses of one prompt are consecutive.
"""

import torch
from torch import Tensor

STD_EPSILON = 1e-6


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True) -> Tensor:
    """``A = (R - mean_group(R)) / (std_group(R) + 1e-6)``, unbiased std; without the division when
    ``scale_by_std`` is False (Dr. GRPO). Same shape as ``rewards``."""
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPSILON)
    return centred.reshape(-1)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``(num_groups,)`` bool: False for groups whose rewards are all equal (DAPO's dynamic-sampling
    filter: such a group has zero advantage everywhere and only dilutes the token normaliser)."""
    groups = _groups(rewards, group_size)
    return (groups != groups[:, :1]).any(dim=1)


def keep_responses(group_mask: Tensor, group_size: int) -> Tensor:
    """Expand a per-group bool mask to one entry per response."""
    return torch.repeat_interleave(group_mask, group_size)
