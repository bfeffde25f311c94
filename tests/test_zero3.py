"""``gathered_head`` and ``papo_loss`` under DeepSpeed ZeRO-3: two CPU processes (DeepSpeed's CPU accelerator, gloo)
equal one process without DeepSpeed (zero3_worker.py says what runs)."""

from pathlib import Path

import pytest
import torch

from zero3_setup import run_two_processes

pytest.importorskip("deepspeed", reason="the zero3 extra (DeepSpeed) is not installed")

WORKER = Path(__file__).with_name("zero3_worker.py")


def test_the_gathered_head_trains_the_partitioned_model_as_one_process(tmp_path):
    run_two_processes(["torch.distributed.run", "--nproc_per_node", "2"], WORKER, str(tmp_path))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["world"] == 2
    qwen2_vl, qwen2_5_vl = result["results"]["qwen2_vl"], result["results"]["qwen2_5_vl"]
    assert (qwen2_vl["tied"], qwen2_5_vl["tied"]) == (False, True)
    # The untied head is partitioned again after each forward, so gathered_head gathers it. The tied one is
    # partitioned after the first forward; in the second, DeepSpeed has it gathered already (for the input
    # embeddings' backward), and gathered_head leaves it to DeepSpeed.
    assert [step["partitioned_after_forward"] for step in qwen2_vl["steps"]] == [True, True]
    assert qwen2_5_vl["steps"][0]["partitioned_after_forward"]

    for model_type, checked in result["results"].items():
        for number, step in enumerate(checked["steps"]):
            torch.testing.assert_close(step["loss"], step["expected_loss"], rtol=0, atol=1e-6)
            for name, grad in step["grads"].items():
                assert grad.abs().max() > 0, (model_type, number, name)
                torch.testing.assert_close(grad, step["expected_grads"][name], rtol=0, atol=1e-6,
                                           msg=lambda text: f"{model_type} step {number} {name}: {text}")
        # The weights after both steps: float32 rounding of w - g, a few units in the last place of weights of order 1.
        assert checked["after"].keys() == checked["expected_after"].keys()
        for name, weight in checked["after"].items():
            torch.testing.assert_close(weight, checked["expected_after"][name], rtol=1e-6, atol=1e-6,
                                       msg=lambda text: f"{model_type} {name}: {text}")

        assert checked["misuses"]["outside"].startswith("model: its LM head's weight (19, 64) is partitioned by "
                                                        "DeepSpeed ZeRO-3")
    assert qwen2_vl["misuses"]["released"].startswith("the backward reached the LM head's (19, 64) parameter "
                                                      "after its DeepSpeed ZeRO-3 gather ended")
