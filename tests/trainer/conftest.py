import shutil

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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real run of 2 steps with a checkpoint at each step and a constant learning rate (it may be extended); one
    per test module."""
    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(small_config(run_dir, steps=2, save_every=1, lr_schedule="constant")).train()
    torch.set_num_threads(threads)
    return run_dir


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of ``finished_run`` of the test's own."""
    return shutil.copytree(finished_run, tmp_path / "run")
