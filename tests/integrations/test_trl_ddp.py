"""PAPOTrainer in two CPU processes under ``accelerate launch`` (DDP, gloo), every prompt's group split across them.

Checks: the responses of one prompt share one masked image although they are on different processes; the
gradients are averaged through DDP (both processes end with the same weights, which moved, although they
trained on different responses); the logged metrics are the token-weighted means of both processes' local ones.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from trl_setup import NUM_GENERATIONS, build_processor_and_model_folder

WORKER = Path(__file__).with_name("trl_ddp_worker.py")
REPOSITORY = Path(__file__).parents[2]


def test_two_processes_share_masks_and_average_gradients(tmp_path):
    build_processor_and_model_folder(tmp_path / "model")
    path = os.pathsep.join(filter(None, [str(REPOSITORY), str(WORKER.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", str(WORKER),
               str(tmp_path / "model"), str(tmp_path)]
    completed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [result["processes"] for result in ranks] == [2, 2]

    # One prompt's four responses per rollout: two on each process, one masked image for all four.
    assert len(ranks[0]["rollouts"]) == len(ranks[1]["rollouts"]) == 2
    for first, second in zip(ranks[0]["rollouts"], ranks[1]["rollouts"]):
        assert (first["positions"], second["positions"]) == ([0, 1], [2, 3])
        assert {position // NUM_GENERATIONS for position in first["positions"] + second["positions"]} == {0}
        torch.testing.assert_close(second["clean"], first["clean"], rtol=0, atol=0)
        for masked in first["masked"][1:] + second["masked"]:
            torch.testing.assert_close(masked, first["masked"][0], rtol=0, atol=0)
        assert not torch.equal(first["masked"][0], first["clean"][: first["masked"][0].shape[0]])

    # DDP averaged the gradients: different responses, the same update on both processes.
    steps = [[metrics["entropy"] for metrics in result["local_metrics"]] for result in ranks]
    assert steps[0] != steps[1], "the processes must train on different responses"
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], weight, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(weight, ranks[0]["initial"][name]) for name, weight in ranks[0]["weights"].items())

    # Logged metrics: sum over processes of (local mean * local tokens) / sum of tokens.
    def loss_metrics(logs):
        return [{name: value for name, value in entry.items()
                 if name.startswith(("papo/", "clip_ratio/")) or name == "entropy"} for entry in logs]

    assert loss_metrics(ranks[0]["logs"]) == loss_metrics(ranks[1]["logs"])
    for step, logged in enumerate(ranks[0]["logs"]):
        local = [result["local_metrics"][step] for result in ranks]
        tokens = sum(metrics["tokens"] for metrics in local)
        for name in ("perception_kl", "entropy", "entropy_masked", "policy_loss", "ratio_mean"):
            expected = sum(metrics[name] * metrics["tokens"] for metrics in local) / tokens
            assert abs(logged[f"papo/{name}"] - expected) <= 1e-6 * max(1.0, abs(expected)), (step, name)
        assert logged["entropy"] == logged["papo/entropy"]
