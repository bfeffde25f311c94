"""PAPOTrainer in two CPU processes under ``accelerate launch`` (DDP, gloo), every prompt's group split across them.

Checks: the responses of one prompt share one masked image although they are on different processes; the
gradients are averaged through DDP (both processes end with the same weights, which moved, although they
trained on different responses); the logged metrics are the token-weighted means of both processes' local ones.
"""

from pathlib import Path

import torch

from trl_setup import NUM_GENERATIONS, build_processor_and_model_folder, run_in_two_processes

WORKER = Path(__file__).with_name("trl_ddp_worker.py")


def test_two_processes_share_masks_and_average_gradients(tmp_path):
    build_processor_and_model_folder(tmp_path / "model")
    ranks = run_in_two_processes(WORKER, tmp_path / "model", tmp_path, "bf16")

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
