"""Checkpoints: resuming gives the steps of an uninterrupted run, the random generators (a CUDA device's included)
come back, a kill while saving loses nothing, and a new run cannot start over an earlier run's checkpoint."""

import random

import numpy as np
import pytest
import torch

from papo_kernels.trainer import Trainer, checkpoint
from papo_kernels.trainer.errors import TrainerInputError
from papo_kernels.trainer.metrics_log import read_metrics

from trainer_helpers import small_config

COMPARED = ("reward", "accuracy", "response_length", "policy_loss", "perception_kl", "entropy", "grad_norm", "loss")


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = Trainer(small_config(tmp_path / "straight", steps=4, save_every=2))
    straight_records = straight.train()

    # The same run, killed when step 2 starts (after the checkpoint of steps 0-1), then resumed.
    interrupted = Trainer(small_config(tmp_path / "split", steps=4, save_every=2))
    run_step = Trainer.train_step

    def killed_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return run_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.undo()
    resumed = Trainer(small_config(tmp_path / "split", steps=4), resume=True)
    assert resumed.start_step == 2
    resumed_records = resumed.train()

    assert [r["step"] for r in resumed_records] == [2, 3]
    for expected, got in zip(straight_records[2:], resumed_records):
        assert all(expected[key] == got[key] for key in COMPARED), (expected, got)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [0, 1, 2, 3]


def draws(device):
    return random.random(), np.random.rand(), torch.rand(3, device=device).tolist()


def test_the_random_state_of_a_cpu_run_round_trips_without_cuda():
    cpu = torch.device("cpu")
    state = checkpoint.rng_state(cpu)
    assert "cuda" not in state
    expected = draws(cpu)
    checkpoint.set_rng_state(state, cpu)
    assert draws(cpu) == expected


def test_the_generator_of_the_run_s_cuda_device_is_saved_and_restored(monkeypatch):
    # CPU stand-ins for torch.cuda's calls: what is saved for the run's device goes back to that device.
    device, device_state = torch.device("cuda", 1), torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda where: device_state if where == device else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, where: restored.append((state, where)))
    state = checkpoint.rng_state(device)
    assert state["cuda"] is device_state
    checkpoint.set_rng_state(state, device)
    assert restored == [(device_state, device)]
    checkpoint.set_rng_state(state, torch.device("cpu"))  # resumed on a CPU: no CUDA generator to restore
    assert len(restored) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_generator_round_trips():
    device = torch.device("cuda", torch.cuda.current_device())
    state = checkpoint.rng_state(device)
    expected = draws(device)
    checkpoint.set_rng_state(state, device)
    assert draws(device) == expected


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    state = dict(model_state={"w": torch.ones(3)}, optimizer_state={}, scheduler_state={}, rng_states=[{}],
                 config={"steps": 1}, vocabulary={"red": 0})
    checkpoint.save_checkpoint(tmp_path, next_step=5, **state)

    def killed_mid_write(payload, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, next_step=9, **{**state, "model_state": {"w": torch.zeros(3)}})
    monkeypatch.undo()

    loaded = checkpoint.load_checkpoint(tmp_path)
    assert loaded["next_step"] == 5 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "no temporary file is left behind"


def test_a_new_run_over_an_earlier_checkpoint_is_refused_and_loses_nothing(tmp_path):
    Trainer(small_config(tmp_path, steps=1)).train()
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(TrainerInputError) as refusal:
        Trainer(small_config(tmp_path, steps=1, learning_rate=1e-2))
    assert str(refusal.value) == (f"output_dir: {tmp_path} holds the checkpoint of an earlier run; pass --resume to "
                                  "continue it, or --overwrite-output-dir to start a new run there (or choose another "
                                  "--output-dir)")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files


def test_overwrite_output_dir_starts_a_new_run_over_an_earlier_checkpoint(tmp_path):
    Trainer(small_config(tmp_path, steps=2)).train()
    new_run = Trainer(small_config(tmp_path, steps=1, learning_rate=1e-2), overwrite_output_dir=True)
    assert not (tmp_path / "checkpoint.pt").exists(), "deleted before the new run writes its first record"
    new_run.train()
    assert [record["step"] for record in read_metrics(tmp_path)] == [0], "only the new run's records"
    saved = checkpoint.load_checkpoint(tmp_path)
    assert (saved["next_step"], saved["config"]["learning_rate"]) == (1, 1e-2)
    with pytest.raises(TrainerInputError, match="cannot be given with --resume"):
        Trainer(small_config(tmp_path, steps=1), resume=True, overwrite_output_dir=True)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainerInputError, match="no checkpoint at"):
        Trainer(small_config(tmp_path), resume=True)
