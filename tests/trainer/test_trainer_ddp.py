"""Two CPU processes under `accelerate launch` (DDP, gloo) give the loss and gradient of one process."""

from pathlib import Path

from ddp_worker import one_update
from trainer_helpers import assert_same_update, launch_two_processes

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_match_one(tmp_path):
    (tmp_path / "two").mkdir()
    one = one_update(tmp_path / "one")
    assert_same_update(one, launch_two_processes(WORKER, tmp_path / "two"))
