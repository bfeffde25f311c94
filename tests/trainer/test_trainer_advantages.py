"""Group-relative advantages and DAPO's filter of groups whose rewards are all equal."""

import pytest
import torch

from papo_kernels.trainer.advantages import group_advantages, informative_groups, keep_responses


def test_group_advantages_with_std_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # Group 1: mean 0.25, unbiased std 0.5; group 2 has no spread.
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected, rtol=0, atol=1e-5)


def test_group_advantages_without_std_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8])
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, -0.3, -0.1, 0.1, 0.3])
    torch.testing.assert_close(group_advantages(rewards, 4, scale_by_std=False), expected, rtol=0, atol=1e-6)


def test_groups_are_consecutive_responses():
    rewards = torch.tensor([0.0, 1.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantages(rewards, 2, scale_by_std=False), torch.tensor([-0.5, 0.5, 0., 0.]))


def test_dapo_filter_drops_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 1.0])
    groups = informative_groups(rewards, 3)
    assert groups.tolist() == [False, False, True]
    assert keep_responses(groups, 3).tolist() == [False] * 6 + [True] * 3


def test_bad_group_size_is_an_error():
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(8), 3)
