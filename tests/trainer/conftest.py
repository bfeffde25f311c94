import pytest

from papo_kernels.trainer import Trainer
from trainer_helpers import small_config


@pytest.fixture
def small_trainer(tmp_path):
    return Trainer(small_config(tmp_path))
