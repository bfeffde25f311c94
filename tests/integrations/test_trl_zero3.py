"""PAPOTrainer under DeepSpeed ZeRO-3: two CPU processes under ``accelerate launch --use_deepspeed --zero_stage 3``
(DeepSpeed's CPU accelerator, gloo) train as one process without DeepSpeed on the same micro-batches.

The workers (trl_zero3_worker.py) run one step of PAPO-G (a reference model, the masked pass with gradient)
over two micro-batches each, with SGD and no clipping, and keep what each ``_compute_loss`` received and
returned. Here one process recomputes every loss from those inputs, the reference log-probs from the inputs'
sequences, and the step: the mean over processes of the summed micro-batch gradients, times the learning rate.
"""

from pathlib import Path

import pytest
import torch

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import build_processor_and_model_folder, colour_dataset, current_logprobs, length_reward
from zero3_setup import run_two_processes

pytest.importorskip("deepspeed", reason="the zero3 extra (DeepSpeed) is not installed")
from trl_zero3_worker import FIELDS, trainer_fields  # noqa: E402 (imports deepspeed)

WORKER = Path(__file__).with_name("trl_zero3_worker.py")
LAUNCH = ["accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true",
          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_a_zero3_step_equals_one_process(tmp_path):
    processor = build_processor_and_model_folder(tmp_path / "model")
    run_two_processes(LAUNCH, WORKER, str(tmp_path / "model"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in ranks:
        assert (result["processes"], result["distributed_type"], result["zero_stage"]) == \
            (2, "DistributedType.DEEPSPEED", 3)
        assert len(result["losses"]) == FIELDS["gradient_accumulation_steps"]
        # The reference model's log-probs (two chunks, no gradient), then the two micro-batches' losses. The first
        # of each found the head partitioned and gathered it; DeepSpeed keeps a head it will reuse gathered after
        # later forwards, and gathered_head then leaves it to DeepSpeed.
        assert [gather["grad"] for gather in result["gathers"]] == [False, False, True, True]
        assert result["gathers"][0]["partitioned"] and result["gathers"][2]["partitioned"]

    args = PAPOConfig.from_preset("papo_g", **trainer_fields(processor, tmp_path / "one"))
    trainer = PAPOTrainer(model=str(tmp_path / "model"), reward_funcs=length_reward, args=args,
                          train_dataset=colour_dataset(4), processing_class=processor)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = FIELDS["gradient_accumulation_steps"]
    initial = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    losses = []
    for rank, result in enumerate(ranks):
        for number, call in enumerate(result["losses"]):
            inputs = call["inputs"]
            expected_reference = current_logprobs(trainer, inputs, trainer.ref_model)
            torch.testing.assert_close(inputs["ref_per_token_logps"], expected_reference, rtol=0, atol=1e-6,
                                       msg=lambda text: f"rank {rank} micro-batch {number}: {text}")
            losses.append(trainer._compute_loss(trainer.model, inputs))
            torch.testing.assert_close(call["loss"], losses[-1].detach(), rtol=0, atol=1e-6)
    (sum(losses) / len(ranks)).backward()  # DeepSpeed averages the processes' gradients

    with torch.no_grad():
        expected = {name: value - FIELDS["learning_rate"] * value.grad
                    for name, value in trainer.model.named_parameters()}
    assert not torch.equal(expected["lm_head.weight"], initial["lm_head.weight"])
    for result in ranks:
        assert result["weights"].keys() == expected.keys()
        for name, weight in result["weights"].items():
            torch.testing.assert_close(weight, expected[name], rtol=1e-6, atol=1e-6, msg=lambda text: f"{name}: {text}")
