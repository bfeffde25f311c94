"""masked_forward="sequential": the joint form's loss and gradients in one and in two processes (DDP over gloo, one
all-reduce), the masked pass's random draws replayed, and a lower peak memory than "joint"."""

from pathlib import Path

import pytest
import torch

from masked_forward_memory import measure, tiny_trainer_and_batch
from papo_kernels.integrations.trl import PAPOTrainer
from trl_setup import build_processor_and_model_folder, parameter_gradients, run_in_two_processes

WORKER = Path(__file__).with_name("trl_masked_forward_worker.py")
NUM_PROMPTS = 2


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    build_processor_and_model_folder(folder / "model")
    return run_in_two_processes(WORKER, folder / "model", folder, "no")


def assert_same_gradients(got: dict, want: dict) -> None:
    """Every gradient tensor within 1e-6 of the largest entry (float32; the joint form's batch of 2B against two of
    B changes the order of some sums)."""
    assert got.keys() == want.keys()
    scale = max(value.abs().max().item() for value in want.values())
    assert scale > 1e-4, "the batch must carry a gradient"
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6 * scale, msg=name)


def loss_and_gradients(trainer: PAPOTrainer, batch: dict, mode: str):
    trainer.args.masked_forward = mode
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), parameter_gradients(trainer.model), trainer._metrics["train"]["papo/perception_kl"][-1]


def test_sequential_equals_joint_in_one_process(tmp_path):
    """With gradient checkpointing (TRL's default); test_sequential_lowers_the_peak_memory checks it without."""
    trainer, batch = tiny_trainer_and_batch(tmp_path, NUM_PROMPTS, gamma=0.5, eta_clean=0.05, eta_masked=0.05,
                                            gradient_checkpointing=True)
    joint_loss, joint_gradients, joint_kl = loss_and_gradients(trainer, batch, "joint")
    loss, gradients, kl = loss_and_gradients(trainer, batch, "sequential")
    torch.testing.assert_close(loss, joint_loss, rtol=1e-6, atol=1e-8)
    assert joint_kl > 0 and kl == pytest.approx(joint_kl, rel=1e-5)
    assert_same_gradients(gradients, joint_gradients)
    with torch.no_grad():  # evaluation: the two forwards, no backward
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), joint_loss, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("find_unused_parameters", [True, False])
def test_sequential_equals_joint_in_two_processes(two_process_results, find_unused_parameters):
    """Gradient checkpointing on; DDP looking for unused parameters (TRL's setting for vision-language models) or
    not (every parameter must then get its gradient in each synchronised backward)."""
    ranks = [result[find_unused_parameters] for result in two_process_results]
    for result in ranks:
        torch.testing.assert_close(torch.tensor(result["sequential"]["loss"]), torch.tensor(result["joint"]["loss"]),
                                   rtol=1e-6, atol=1e-8)
        assert_same_gradients(result["sequential"]["gradients"], result["joint"]["gradients"])
        # One all-reduce of every bucket, not two and not none.
        buckets = result["joint"]["all_reduces"]
        assert buckets and sorted(result["sequential"]["all_reduces"]) == sorted(buckets) == sorted(set(buckets))
    # The all-reduce averaged the processes' own gradients (which differ: different responses).
    local = [result["local"] for result in ranks]
    assert any(not torch.allclose(local[0][name], local[1][name]) for name in local[0])
    for mode in ("joint", "sequential"):
        for name in local[0]:
            torch.testing.assert_close(ranks[1][mode]["gradients"][name], ranks[0][mode]["gradients"][name],
                                       rtol=0, atol=0)
        assert_same_gradients(ranks[0][mode]["gradients"],
                              {name: (local[0][name] + local[1][name]) / 2 for name in local[0]})


def test_the_masked_pass_runs_again_with_its_random_draws(tmp_path, monkeypatch):
    """With dropout on, the masked pass's second run (with gradient) sees the first run's draws: the same hidden
    states, so the loss's gradient on them fits the pass that is differentiated."""
    trainer, batch = tiny_trainer_and_batch(tmp_path, 1, masked_forward="sequential")
    dropout_layers = [module for module in trainer.model.modules() if hasattr(module, "attention_dropout")]
    assert dropout_layers
    for module in dropout_layers:
        module.attention_dropout = 0.5
    calls = []
    hidden_states = trainer._hidden_states

    def keep_hidden_states(model, inputs, completion_length):
        hidden = hidden_states(model, inputs, completion_length)
        calls.append((inputs, hidden.detach().clone()))
        return hidden

    monkeypatch.setattr(trainer, "_hidden_states", keep_hidden_states)
    trainer.compute_loss(trainer.model, batch).backward()
    (masked_inputs, masked_first), _, (_, masked_again) = calls
    torch.testing.assert_close(masked_again, masked_first, rtol=0, atol=0)
    with torch.no_grad():
        other_draws = [hidden_states(trainer.model, masked_inputs, batch["completion_ids"].size(1))
                       for _ in range(2)]
    assert not torch.equal(*other_draws), "dropout is on: other draws give other hidden states"


def test_sequential_lowers_the_peak_memory(tmp_path):
    """The process's peak over one loss and backward of 32 responses, in the second of two alternating rounds:
    sequential holds one pass's activations (0.49 and 0.57 of joint's peak, measured the same way at this size on
    the project's CPU machine), with the joint form's gradients."""
    trainer, batch = tiny_trainer_and_batch(tmp_path, 8)
    peaks, gradients = {}, {}
    for _ in range(2):
        for mode in ("joint", "sequential"):
            peaks[mode] = measure(trainer, batch, mode)["peak_mib"]
            gradients[mode] = parameter_gradients(trainer.model)
    assert peaks["sequential"] < 0.8 * peaks["joint"], peaks
    assert_same_gradients(gradients["sequential"], gradients["joint"])
