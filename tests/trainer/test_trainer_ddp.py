"""Two CPU processes under `accelerate launch` (DDP, gloo) give the loss and gradient of one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from ddp_worker import one_update

WORKER = Path(__file__).with_name("ddp_worker.py")
REPOSITORY = Path(__file__).parents[2]


def launch(command, tmp_path):
    # The workers import this checkout's package, whatever is installed.
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    completed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=170)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return torch.load(tmp_path / "result.pt", weights_only=False)


def test_two_processes_match_one(tmp_path):
    (tmp_path / "two").mkdir()
    one = one_update(tmp_path / "one")
    two = launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER),
               str(tmp_path / "two")], tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert torch.equal(one["completion_ids"], two["completion_ids"]), "both runs must train on the same rollout"
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-7)
    scale = one["gradient"].abs().max()
    assert scale > 0
    torch.testing.assert_close(two["gradient"], one["gradient"], rtol=1e-4, atol=1e-6 * scale)
