"""Resume rules: a resume continues the checkpointed run or is refused before any work, naming what it would change.

Each test resumes a copy of a real finished run (2 steps, a checkpoint at each step).
"""

import json
import shutil

import pytest
import torch

from papo_kernels.train import main
from papo_kernels.trainer import Trainer
from papo_kernels.trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from papo_kernels.trainer.errors import TrainerInputError
from papo_kernels.trainer.metrics_log import read_metrics
from papo_kernels.trainer.resume import RESUMABLE_FIELDS

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import small_config

RUNS = {
    "cosine": {},  # the default lr_schedule
    "constant": dict(lr_schedule="constant"),
    "linear_gamma": dict(lr_schedule="constant", gamma_schedule="linear"),
}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("finished")
    for name, overrides in RUNS.items():
        Trainer(small_config(root / name, steps=2, save_every=1, **overrides)).train()
    torch.set_num_threads(threads)
    return root


@pytest.fixture
def run_copy(finished_runs, tmp_path):
    """``run_copy(name)``: a fresh copy of the finished run ``name``."""
    def copy(name):
        return shutil.copytree(finished_runs / name, tmp_path / name)
    return copy


def resume(run_dir, **overrides):
    values = dict(steps=2, save_every=1, **RUNS[run_dir.name])
    return Trainer(small_config(run_dir, **{**values, **overrides}), resume=True)


def files_of(run_dir):
    return {path.name: path.read_bytes() for path in run_dir.iterdir()}


def drop_first_weight(payload):
    del payload["model"][next(iter(payload["model"]))]


@pytest.mark.parametrize("change, message", [
    (lambda payload: payload.update(next_step="2"), "is not a papo-train checkpoint: next_step: got str, expected "
                                                    "int"),
    (lambda payload: payload.update(vocabulary=None), "is not a papo-train checkpoint: vocabulary: got NoneType, "
                                                      "expected dict"),
    (lambda payload: payload.update(scheduler={"x": 1}), "the checkpoint's learning-rate schedule cannot be loaded "
                                                         "(KeyError"),
    (drop_first_weight, "the checkpoint's weights do not fit the model of the tiny default (Missing key(s) in "
                        "state_dict: model."),
], ids=["next_step", "vocabulary", "scheduler", "missing_weight"])
def test_a_checkpoint_with_the_right_keys_but_wrong_contents_is_refused(run_copy, capsys, change, message):
    """A missing weight used to resume silently with that weight freshly initialised."""
    run_dir = run_copy("constant")
    payload = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    change(payload)
    torch.save(payload, run_dir / CHECKPOINT_NAME)
    assert message in cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"])


@pytest.mark.parametrize("name", ["metrics.jsonl", "training_curves.png"])
def test_an_output_file_that_became_a_directory_is_refused_before_the_resume(run_copy, capsys, name):
    run_dir = run_copy("constant")
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    assert cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"]) == \
        f"output_dir: {run_dir / name} is not a regular file; the run writes its {name} there (move it away or " \
        "choose another --output-dir)"
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("run", ["cosine", "constant"])
def test_steps_below_the_checkpoint_are_refused_and_nothing_is_rewritten(run_copy, capsys, run):
    run_dir = run_copy(run)
    before = files_of(run_dir)
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "1"])
    assert message == "--resume: steps 1 is below the checkpoint's next step 2 (steps 0-1 are done); give steps >= 2"
    assert files_of(run_dir) == before


@pytest.mark.parametrize("run, schedule", [("cosine", "lr_schedule 'cosine'"),
                                           ("linear_gamma", "gamma_schedule 'linear'")])
@pytest.mark.parametrize("steps", [3, 10])
def test_changing_the_length_of_a_schedule_laid_out_over_steps_is_refused(run_copy, capsys, run, schedule, steps):
    run_dir = run_copy(run)
    before = files_of(run_dir)
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", str(steps)])
    assert message.startswith(f"--resume: steps {steps} differs from the checkpoint's 2, but {schedule} is laid out "
                              "over steps"), message
    assert "lr_schedule 'constant' and gamma_schedule 'fixed'" in message, "says what to do instead"
    assert files_of(run_dir) == before


def test_a_run_without_a_schedule_over_steps_extends(run_copy, capsys):
    run_dir = run_copy("constant")
    assert main(["--output-dir", str(run_dir), "--resume", "--steps", "3"]) == 0
    assert [record["step"] for record in read_metrics(run_dir)] == [0, 1, 2]
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["next_step"] == 3 and checkpoint["config"]["steps"] == 3


def test_a_finished_run_resumed_with_its_own_length_runs_no_step(run_copy):
    run_dir = run_copy("cosine")
    assert resume(run_dir).train() == []
    assert [record["step"] for record in read_metrics(run_dir)] == [0, 1]
    assert load_checkpoint(run_dir)["next_step"] == 2


@pytest.mark.parametrize("name, value", [("learning_rate", 1e-4), ("weight_decay", 0.1), ("preset", "dapo"),
                                         ("tasks", ["count"]), ("seed", 1), ("temperature", 0.7), ("gamma", 0.05),
                                         ("lr_schedule", "constant"), ("torch_dtype", "bfloat16"),
                                         ("mixed_precision", "bf16"), ("model_type", "qwen2_5_vl")])
def test_changing_what_is_trained_is_refused_naming_the_field(run_copy, name, value):
    run_dir = run_copy("cosine")
    saved = load_checkpoint(run_dir)["config"][name]
    with pytest.raises(TrainerInputError) as error:
        resume(run_dir, **{name: value})
    assert str(error.value).startswith(f"--resume: cannot change {name} {saved!r} -> {value!r}: "), error.value


def test_the_cli_names_every_changed_field(run_copy, capsys):
    run_dir = run_copy("cosine")
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--learning-rate", "1e-4",
                                 "--preset", "dapo"])
    assert message.startswith("--resume: cannot change preset 'papo_d' -> 'dapo', learning_rate 0.0003 -> 0.0001: "
                              "a resumed run keeps its checkpoint's config except"), message


def test_fields_that_change_neither_the_training_nor_its_data_may_change(run_copy):
    assert set(RESUMABLE_FIELDS) == {"output_dir", "steps", "num_threads", "micro_batch_size", "eval_every",
                                     "eval_prompts", "save_every", "attn_implementation", "gradient_checkpointing"}
    run_dir = run_copy("constant")
    resumed = resume(run_dir, steps=3, micro_batch_size=4, eval_every=1, eval_prompts=4, save_every=0,
                     attn_implementation="eager", gradient_checkpointing=True)
    [record] = resumed.train()
    assert record["step"] == 2 and "eval_accuracy" in record


def test_a_moved_run_resumes_where_it_now_is(run_copy, tmp_path, capsys):
    original = run_copy("constant")
    moved = tmp_path / "moved"
    original.rename(moved)
    assert main(["--output-dir", str(moved), "--resume", "--steps", "3"]) == 0
    assert load_checkpoint(moved)["config"]["output_dir"] == str(moved)
    assert not original.exists()


def test_another_number_of_processes_is_refused_before_the_model_is_built(run_copy):
    run_dir = run_copy("cosine")
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)
    checkpoint["rng_states"] = checkpoint["rng_states"] * 2  # as two processes write it
    torch.save(checkpoint, run_dir / CHECKPOINT_NAME)
    with pytest.raises(TrainerInputError, match=r"written by 2 process\(es\), this run has 1"):
        resume(run_dir)


def write_jsonl(path, answers):
    from PIL import Image
    Image.new("RGB", (56, 56), (230, 40, 40)).save(path.parent / "red.png")
    path.write_text("".join(json.dumps({"image": "red.png", "question": "what color is it ?", "answer": answer})
                            + "\n" for answer in answers))


def test_a_tokenizer_that_changed_on_disk_is_refused(tmp_path):
    # The tiny model's tokenizer is made of the data's words: the same --data path with other words gives other ids.
    data = tmp_path / "train.jsonl"
    write_jsonl(data, ["red", "blue"])
    Trainer(small_config(tmp_path / "run", steps=1, data=str(data))).train()
    write_jsonl(data, ["crimson", "blue"])
    with pytest.raises(TrainerInputError) as error:
        Trainer(small_config(tmp_path / "run", steps=1, data=str(data)), resume=True)
    assert str(error.value) == ("--resume: the tokenizer's vocabulary differs from the checkpoint's: 1 token(s) new or "
                                "with another id (e.g. ['crimson']); 1 token(s) of the checkpoint missing (e.g. "
                                "['red']); resume with the model, data and tasks the run was trained with")


def test_weights_that_do_not_fit_the_model_folder_are_refused(tmp_path, capsys):
    from papo_kernels.trainer.data import synthetic_words
    from papo_kernels.trainer.tiny_model import build_model, build_processor

    processor = build_processor(synthetic_words(["color"]), 56)
    model_dir = tmp_path / "model"

    def save_model(model):
        model.save_pretrained(model_dir)
        processor.tokenizer.save_pretrained(model_dir)
        processor.image_processor.save_pretrained(model_dir)
        (model_dir / "chat_template.jinja").write_text(processor.chat_template)

    model = build_model(processor.tokenizer, seed=1)
    save_model(model)
    run = ["--model", str(model_dir), "--output-dir", str(tmp_path / "run"), "--lr-schedule", "constant"]
    assert main(run + ["--steps", "1"] + SMALL_FLAGS) == 0
    model.config.text_config.intermediate_size = 96  # the folder now holds another size of the same family
    save_model(type(model)(model.config))
    message = cli_error(capsys, ["--output-dir", str(tmp_path / "run"), "--resume", "--steps", "2"])
    assert message.startswith(f"--resume: the checkpoint's weights do not fit the model of {model_dir} "
                              "(Error(s) in loading state_dict"), message


def test_an_optimizer_state_keyed_by_position_is_refused(run_copy):
    # Checkpoints written before the optimizer state was keyed by parameter name held torch's own state_dict().
    run_dir = run_copy("constant")
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    group = checkpoint["optimizer"]["param_groups"][0]
    state = checkpoint["optimizer"]["state"]
    checkpoint["optimizer"] = {"state": {position: state[name] for position, name in enumerate(group["params"])},
                               "param_groups": [{**group, "params": list(range(len(group["params"])))}]}
    torch.save(checkpoint, run_dir / CHECKPOINT_NAME)
    with pytest.raises(TrainerInputError) as error:
        resume(run_dir, steps=3)
    message = str(error.value)
    assert message.startswith("--resume: the checkpoint's optimizer state does not fit the parameters of the tiny "
                              "default ("), message
    assert message.endswith("checkpoints written before the state was keyed by parameter name cannot be resumed")
