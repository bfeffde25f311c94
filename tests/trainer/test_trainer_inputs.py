"""Trainer inputs: an unusable output directory, data file, image or model folder is a one-line
``papo-train: error: ...`` naming it, raised before the work that does not need it."""

import json
import shutil

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from papo_kernels.train import main
from papo_kernels.trainer import Trainer
from papo_kernels.trainer.data import JsonlDataset
from papo_kernels.trainer.errors import TrainerInputError
from papo_kernels.trainer.metrics_log import METRICS_NAME, read_metrics
from papo_kernels.trainer.tiny_model import build_processor

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import save_model_folder, small_config

# Checked after the output directory, before the data is read or the model built: an error about it proves the order.
MISSING_MODEL = ["--model", "/nonexistent/model"]


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    assert cli_error(capsys, ["--output-dir", str(tmp_path / "run")] + MISSING_MODEL) == \
        f"output_dir: {tmp_path / 'run'} is a file, expected a directory (or a path to create one at)"


@pytest.mark.parametrize("flags", [[], ["--overwrite-output-dir"]], ids=["new", "overwrite"])
@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint.pt", "training_curves.png"])
def test_an_output_file_that_is_a_directory(tmp_path, capsys, name, flags):
    (tmp_path / "run" / name).mkdir(parents=True)
    assert cli_error(capsys, ["--output-dir", str(tmp_path / "run")] + flags + MISSING_MODEL) == \
        f"output_dir: {tmp_path / 'run' / name} is not a regular file; the run writes its {name} there (move it " \
        "away or choose another --output-dir)"
    assert (tmp_path / "run" / name).is_dir()


def test_resume_from_a_checkpoint_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    assert cli_error(capsys, ["--output-dir", str(tmp_path / "run"), "--resume"]) == \
        f"--resume: {tmp_path / 'run' / 'checkpoint.pt'} is not a regular file, so it holds no checkpoint"


@pytest.mark.parametrize("where, reason", [("file/run", "Not a directory"),
                                           ("/sys", "Permission denied"),  # unwritable, even for root
                                           ("/sys/papo-run", "Operation not permitted")])
def test_an_output_dir_that_cannot_be_written(tmp_path, capsys, where, reason):
    (tmp_path / "file").write_text("a file")
    output_dir = tmp_path / where  # an absolute `where` replaces tmp_path
    assert cli_error(capsys, ["--output-dir", str(output_dir)] + MISSING_MODEL) == \
        f"output_dir: cannot write in {output_dir} ({reason})"


def write_jsonl(directory, images, question="what color is the square ?"):
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps({"image": image, "question": question, "answer": "red"}) + "\n"
                            for image in images))
    return path


def red_png(path):
    Image.new("RGB", (56, 56), (230, 40, 40)).save(path)
    return path


@pytest.mark.parametrize("content", [b"", b"not an image\n", b"\x89PNG\r\n\x1a\n\x00\x00"],
                         ids=["empty", "text", "png-signature-only"])
def test_a_jsonl_image_that_is_no_image_fails_when_the_data_loads(tmp_path, capsys, content):
    red_png(tmp_path / "red.png")
    (tmp_path / "bad.png").write_bytes(content)
    data = write_jsonl(tmp_path, ["red.png", "bad.png"])
    message = cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run")] + MISSING_MODEL)
    assert message.startswith(f"--data: {data}, line 2: {tmp_path / 'bad.png'} is not an image PIL can read ("), \
        message


@pytest.mark.parametrize("size", [(56, 11201), (11201, 56)], ids=["tall", "wide"])
def test_a_jsonl_image_too_long_for_the_image_processor_fails_when_the_data_loads(tmp_path, capsys, size):
    red_png(tmp_path / "red.png")
    Image.new("RGB", size).save(tmp_path / "long.png")
    data = write_jsonl(tmp_path, ["red.png", "long.png"])
    message = cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run")] + MISSING_MODEL)
    assert message == (f"--data: {data}, line 2: the image {tmp_path / 'long.png'} is {size[0]} x {size[1]} pixels; "
                       "Qwen2-VL's image processor takes a longer side of at most 200 times the shorter")


def test_a_jsonl_image_of_aspect_ratio_200_loads_and_the_image_processor_takes_it(tmp_path):
    image = Image.new("RGB", (11200, 56))
    image.save(tmp_path / "long.png")
    JsonlDataset(write_jsonl(tmp_path, ["long.png"]), seed=0)
    grid = build_processor(["red"], 56).image_processor(image, return_tensors="pt")["image_grid_thw"]
    assert grid.prod() > 0


def test_a_jsonl_image_path_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    data = write_jsonl(tmp_path, ["images"])
    assert cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run")]) == \
        f"--data: {data}, line 1: image file not found: {tmp_path / 'images'}"


def test_an_image_that_fails_to_decode_stops_before_its_step_does_work(tmp_path, capsys):
    # The header reads, the pixels do not: found when a step samples the prompt, before it generates anything.
    png = red_png(tmp_path / "red.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:len(png) // 2])
    data = write_jsonl(tmp_path, ["truncated.png"])
    message = cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run"), "--steps", "2"]
                        + SMALL_FLAGS)
    assert message == (f"--data: {data}, line 1: the image {tmp_path / 'truncated.png'} cannot be decoded (image file "
                       "is truncated)")
    assert read_metrics(tmp_path / "run") == []


def test_jsonl_bytes_that_are_not_utf8_name_the_line(tmp_path, capsys):
    red_png(tmp_path / "red.png")
    data = write_jsonl(tmp_path, ["red.png"])
    data.write_bytes(data.read_bytes() + b'{"image": "red.png", "question": "\xff", "answer": "red"}\n')
    assert cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run")]) == \
        f"--data: {data}, line 2 is not UTF-8 (invalid start byte at byte 35)"


def test_a_line_separator_inside_a_json_string_does_not_split_the_record(tmp_path):
    red_png(tmp_path / "red.png")
    data = write_jsonl(tmp_path, ["red.png", "red.png"], question="what color\u2028is the square ?")
    data.write_text(data.read_text().replace("\\u2028", "\u2028"))  # the raw character, as JSON allows
    dataset = JsonlDataset(data, seed=0)
    assert len(dataset) == 2 and dataset.records[1]["line"] == 2


def write_records(directory, records):
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("field", ["question", "answer"])
@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|box_start|>"])
def test_special_token_text_in_the_data_is_refused_when_the_file_is_read(tmp_path, capsys, field, token):
    """Qwen-formatted data sets carry <|image_pad|> in their questions; read as the control token it asks for image
    features no image provides (the first step died in transformers). Refused before the model is built."""
    red_png(tmp_path / "red.png")
    plain = {"image": "red.png", "question": "what color is the square ?", "answer": "red"}
    data = write_records(tmp_path, [plain, {**plain, field: f"{token} {plain[field]}"}])
    message = cli_error(capsys, ["--data", str(data), "--output-dir", str(tmp_path / "run")] + MISSING_MODEL)
    assert message.startswith(f"--data: {data}, line 2: field {field!r} holds the special-token text {token!r}, "
                              "which the processor would read as that control token"), message


def test_the_tokenizers_own_special_tokens_are_refused_naming_the_line(tmp_path):
    red_png(tmp_path / "red.png")
    plain = {"image": "red.png", "question": "what color is the square ?", "answer": "red"}
    dataset = JsonlDataset(write_records(tmp_path, [plain, plain, {**plain, "answer": "red <obj>"}]), seed=0)
    tokenizer = build_processor(["red"], 56).tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<obj>"]}, replace_extra_special_tokens=False)
    assert "<obj>" in tokenizer.all_special_tokens
    with pytest.raises(TrainerInputError, match=f"^--data: {dataset.path}, line 3: field 'answer' holds the "
                                                "special-token text '<obj>'"):
        dataset.check_special_tokens(tokenizer.all_special_tokens)


def test_tasks_with_data_is_an_error(tmp_path, capsys):
    red_png(tmp_path / "red.png")
    data = write_jsonl(tmp_path, ["red.png"])
    for tasks in (["count"], ["color"]):  # the default too, when given as a flag
        assert cli_error(capsys, ["--data", str(data), "--tasks", *tasks, "--output-dir", str(tmp_path / "run")]) \
            == "--tasks picks the synthetic tasks, which --data replaces; give one of them"
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\ntasks: [count]\n")
    assert cli_error(capsys, ["--config", str(config), "--output-dir", str(tmp_path / "run")]) == (
        "config field 'tasks': got ['count'], expected the default ['color'] with data (the synthetic tasks are not "
        "drawn when data is given); give data or tasks, not both")
    assert not (tmp_path / "run").exists()


def test_a_model_folder_with_a_broken_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_vl", ')
    message = cli_error(capsys, ["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run")])
    assert message.startswith("--model: ") and "config.json" in message and "not a valid JSON file" in message, message


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("model") / "qwen2_vl", "qwen2_vl")


def drop_a_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]  # saved under Qwen2-VL's original names
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def truncate_the_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def remove(*names):
    def remove_files(folder):
        for name in names:
            (folder / name).unlink()
    return remove_files


@pytest.mark.parametrize("damage, message", [
    (remove("model.safetensors"), "cannot load the weights (no weight file) of {folder} (OSError: Error no file "
                                  "named model.safetensors"),
    (truncate_the_weights, "cannot load the weights (model.safetensors) of {folder} (SafetensorError: "),
    (drop_a_tensor, "the weights of {folder} (model.safetensors) do not fit the model of its config.json: 1 tensor(s) "
                    "of the model are missing (e.g. ['model.language_model.layers.0.mlp.down_proj.weight'])"),
    (remove("tokenizer.json", "tokenizer_config.json"), "the tokenizer of {folder} gives the image token "
                                                        "'<|image_pad|>' the id 0, the model expects 5; "),
    (remove("preprocessor_config.json"), "cannot load the image processor (preprocessor_config.json) of {folder} "
                                         "(OSError: "),
], ids=["no-weights", "truncated-weights", "a-tensor-missing", "no-tokenizer", "no-image-processor"])
def test_a_model_folder_with_a_missing_or_damaged_part(model_folder, tmp_path, capsys, damage, message):
    folder = shutil.copytree(model_folder, tmp_path / "model")
    damage(folder)
    got = cli_error(capsys, ["--model", str(folder), "--output-dir", str(tmp_path / "run")])
    assert got.startswith("--model: " + message.format(folder=folder)), got
    assert not (tmp_path / "run" / METRICS_NAME).exists()


@pytest.mark.parametrize("argv, message", [
    (["--prompts-per-step", "4", "--group-size", "2", "--minibatches", "9"],
     "config field 'minibatches': got 9, expected at most the responses per process (8)"),
    (["--resume", "--config", "run.yaml"],
     "--resume takes the config saved in the checkpoint; give flags, not --config"),
])
def test_other_setup_errors_are_one_line(tmp_path, capsys, argv, message):
    assert cli_error(capsys, ["--output-dir", str(tmp_path)] + argv) == message


def test_the_python_api_raises_the_same_error_type(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(TrainerInputError, match="is a file, expected a directory"):
        Trainer(small_config(tmp_path / "run"))
    assert issubclass(TrainerInputError, ValueError)


def test_a_bug_is_not_turned_into_a_one_line_error(tmp_path, monkeypatch):
    # Only TrainerInputError becomes `papo-train: error:`; any other exception keeps its traceback.
    def broken_step(self, step):
        raise ValueError("a bug inside a step")

    monkeypatch.setattr(Trainer, "train_step", broken_step)
    with pytest.raises(ValueError, match="a bug inside a step"):
        main(["--output-dir", str(tmp_path), "--steps", "1"] + SMALL_FLAGS)
    assert (tmp_path / METRICS_NAME).read_text() == ""
