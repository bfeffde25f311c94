"""``papo-train`` end to end on the offline default (a few steps), a local model folder, and bad input."""

import json

import pytest

from papo_kernels.train import main
from papo_kernels.trainer.data import synthetic_words
from papo_kernels.trainer.tiny_model import build_model, build_processor

from cli_helpers import cli_error

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
    assert "mean reward of the first" in capsys.readouterr().out

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
