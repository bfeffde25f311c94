"""accelerate's FSDP2 on two CPU processes (gloo; see fsdp_worker.py for how FSDP is turned on without a GPU).

The loss reads the LM head inside the sharded model's own forward, gathered: the loss and
every gradient equal one process's, on the same rollout, which generation on the sharded
model reproduces token for token. Checkpoints hold full tensors in the format written
without FSDP, and a resume shards them back.
"""

from pathlib import Path

import torch

from ddp_worker import one_update
from trainer_helpers import assert_same_update, launch_two_processes

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_fsdp_update_checkpoint_and_resume(tmp_path):
    (tmp_path / "fsdp").mkdir()
    one = one_update(tmp_path / "one")
    two = launch_two_processes(WORKER, tmp_path / "fsdp")

    assert two["refusals"]["fsdp_version 1"].startswith("accelerate FSDP: fsdp_version 1 is not supported")
    assert two["refusals"]["eval_every 1"].startswith("config field 'eval_every': got 1, but evaluation runs on "
                                                      "the main process only")
    # Every parameter is sharded (a DTensor), the head included: the loss's full weight was gathered.
    assert two["sharded"] == sorted(two["parameters"]) and "lm_head.weight" in two["sharded"]
    assert_same_update(one, two)

    checkpoint = torch.load(tmp_path / "fsdp" / "run" / "checkpoint.pt", weights_only=True)
    without_fsdp = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for part in ("model", "optimizer"):
        assert checkpoint[part].keys() == without_fsdp[part].keys()
    assert checkpoint["optimizer"]["state"].keys() == without_fsdp["optimizer"]["state"].keys()
    weights, moments = two["saved"]
    assert set(checkpoint["model"]) == set(weights)
    for name, weight in weights.items():
        assert torch.equal(checkpoint["model"][name], weight), name
        assert torch.equal(checkpoint["optimizer"]["state"][name]["exp_avg"], moments[name]), name
    restored_weights, restored_moments = two["restored"]
    for name in weights:
        assert torch.equal(restored_weights[name], weights[name]), name
        assert torch.equal(restored_moments[name], moments[name]), name
