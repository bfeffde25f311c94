"""``papo-train`` end to end on the offline default (a few steps), a local model folder, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest

from papo_kernels.train import main
from papo_kernels.trainer import Trainer
from papo_kernels.trainer.data import synthetic_words
from papo_kernels.trainer.tiny_model import build_model, build_processor

from cli_helpers import cli_error
from trainer_helpers import REPOSITORY, small_config

SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "3", "--num-threads", "1"]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run_writes_metrics_plot_and_checkpoint_then_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    # A constant learning rate, so the run can be extended on resume.
    assert main(["--output-dir", str(out), "--steps", "3", "--eval-every", "2", "--save-every", "2",
                 "--lr-schedule", "constant"] + SMALL) == 0
    records = read_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("reward", "accuracy", "response_length", "policy_loss", "clip_fraction_low", "clip_fraction_high",
                "perception_kl", "entropy", "entropy_masked", "grad_norm", "step_time", "tokens_per_s"):
        assert key in records[0], key
    assert "eval_accuracy" in records[0] and "eval_accuracy" in records[2]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mean reward of the first" in printed
    assert printed.startswith("papo-train: 1 process on cpu (for data parallelism: accelerate launch --multi_gpu "
                              "--num_processes N -m papo_kernels.train)\n"), printed

    assert main(["--output-dir", str(out), "--resume", "--steps", "4"]) == 0
    assert [r["step"] for r in read_lines(out / "metrics.jsonl")] == [0, 1, 2, 3]

    # Again without --resume: refused (the command's second run), then a new run with --overwrite-output-dir.
    again = ["--output-dir", str(out), "--steps", "1", "--eval-every", "0"] + SMALL
    assert "--overwrite-output-dir" in cli_error(capsys, again)
    assert main(again + ["--overwrite-output-dir"]) == 0
    assert [r["step"] for r in read_lines(out / "metrics.jsonl")] == [0]


def test_local_model_folder_and_jsonl_data(tmp_path):
    processor = build_processor(synthetic_words(["color"]) + ["a", "disc"], 56)
    model_dir = tmp_path / "model"
    build_model(processor.tokenizer, seed=1).save_pretrained(model_dir)
    processor.tokenizer.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(processor.chat_template)

    from PIL import Image
    Image.new("RGB", (56, 56), (230, 40, 40)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "what color is the square ?", "answer": "red"},
            {"image": str(tmp_path / "red.png"), "question": "what color is a disc ?", "answer": "red"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    out = tmp_path / "run"
    assert main(["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--output-dir", str(out),
                 "--steps", "1", "--eval-every", "0"] + SMALL) == 0
    assert len(read_lines(out / "metrics.jsonl")) == 1


@pytest.mark.parametrize("argv, message", [
    (["--mask-probability", "1.5"], "'mask_probability': got 1.5, expected a number in [0, 1]"),
    (["--preset", "ppo"], "'preset': got 'ppo', expected one of"),
    (["--group-size", "1"], "'group_size': got 1, expected an integer >= 2"),
    (["--model", "/nonexistent/model"], "not a local Hugging Face model folder"),
    (["--data", "/nonexistent/data.jsonl"], "no such JSONL file"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "question": "q", "answer": "a"}\n{"image": \n')
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--data", str(tmp_path / "bad.jsonl")])
    assert "line 1: image file not found" in capsys.readouterr().err
    from PIL import Image
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--data", str(tmp_path / "bad.jsonl")])
    assert "line 2 is not valid JSON" in capsys.readouterr().err


def test_yaml_config_with_an_unknown_field(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("steps: 3\ngama: 0.02\n")
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path)])
    assert "unknown config field(s) ['gama']" in capsys.readouterr().err


def test_the_logged_lr_is_the_rate_of_the_steps_own_updates(tmp_path):
    """Each record's lr is the rate its step's optimizer updates used: the cosine schedule's at that step (it was the
    next step's). Cosine over 3 steps: lr_k = 3e-4 (0.1 + 0.45 (1 + cos(pi k / 3)))."""
    trainer = Trainer(small_config(tmp_path, steps=3))
    used = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    records = trainer.train()
    expected = [3e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 3))) for k in range(3)]
    assert [record["lr"] for record in records] == pytest.approx(expected, rel=1e-12)
    assert [record["lr"] for record in records if not record["skipped"]] == used  # one optimizer step per step


def readme_command(comment: str):
    """The README's command line that ends with ``# comment``, split into words."""
    lines = (REPOSITORY / "README.md").read_text().splitlines()
    [line] = [line for line in lines if line.rstrip().endswith(f"# {comment}")]
    return line.split("#")[0].split()


def test_the_readmes_data_parallel_command_runs_the_processes_it_says(tmp_path):
    """`accelerate launch --num_processes 2` alone ran one process on a CPU machine; the README's command runs two,
    and the trainer's first line says how many."""
    command = readme_command("data parallel (gloo on CPU)")
    assert command[:2] == ["accelerate", "launch"] and "--num_processes" in command
    processes = int(command[command.index("--num_processes") + 1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *command[2:], "--output-dir",
                          str(tmp_path / "run"), "--steps", "1", "--eval-every", "0"] + SMALL, cwd=REPOSITORY, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"papo-train: {processes} processes on cpu, data parallel (MULTI_CPU)" in run.stdout.splitlines()
