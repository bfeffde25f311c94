import pytest
import torch
from accelerate.state import AcceleratorState

from papo_kernels.trainer import Trainer
from trainer_helpers import small_config


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The trainer sets torch's thread count for its process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; let the next test's Trainer set its own (what a new
    `papo-train` process does), as accelerate's own test cases do."""
    yield
    AcceleratorState._reset_state()


@pytest.fixture
def small_trainer(tmp_path):
    return Trainer(small_config(tmp_path))
