import pytest
import torch

from papo_kernels.trainer import Trainer
from trainer_helpers import small_config


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The trainer sets torch's thread count for its process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_trainer(tmp_path):
    return Trainer(small_config(tmp_path))
