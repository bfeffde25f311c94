"""papo-train refuses DeepSpeed, naming what to use instead (sharding.py says why), also where accelerate's
cpu=True would have dropped it silently."""

import pytest
from accelerate import Accelerator
from accelerate.utils import DistributedType

from papo_kernels.trainer import Trainer
from papo_kernels.trainer.errors import TrainerInputError
from trainer_helpers import small_config

REFUSAL = (r"^accelerate DeepSpeed: papo-train does not run under DeepSpeed; launch with --use_fsdp --fsdp_version 2 "
           r"\(sharded like ZeRO-3\), or use PAPOTrainer \(papo_kernels.integrations.trl\), which runs under ZeRO-3$")


def test_a_deepspeed_launch_is_refused_on_the_cpu(tmp_path, monkeypatch):
    """What `accelerate launch --use_deepspeed` sets; Accelerator(cpu=True) then trains plain data parallel."""
    accelerator = Accelerator(cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert accelerator.distributed_type != DistributedType.DEEPSPEED
    with pytest.raises(TrainerInputError, match=REFUSAL):
        Trainer(small_config(tmp_path), accelerator=accelerator)


def test_a_deepspeed_accelerator_is_refused(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.DEEPSPEED  # as on a GPU machine (the state is reset after)
    with pytest.raises(TrainerInputError, match=REFUSAL):
        Trainer(small_config(tmp_path), accelerator=accelerator)
