"""The output files after kills and damage: metrics.jsonl stays readable, checkpoints are written with the umask's
mode, orphans of killed saves are removed, and a damaged checkpoint (its bytes fail their CRC-32, or it is no
checkpoint) is a one-line error naming it, before any work."""

import os
import pickletools
import random
import resource
import signal
import warnings
import zipfile

import pytest
import torch

from papo_kernels.trainer import Trainer, checkpoint, metrics_log
from papo_kernels.trainer.checkpoint import CHECKPOINT_NAME, PAYLOAD_KEYS, load_checkpoint
from papo_kernels.trainer.errors import TrainerInputError, TrainerWarning
from papo_kernels.trainer.files import write_atomically
from papo_kernels.trainer.metrics_log import METRICS_NAME, read_metrics

from cli_helpers import cli_error
from trainer_helpers import small_config

MEMORY_CAP = 8 << 30


def resume(run_dir, steps=3):
    return Trainer(small_config(run_dir, steps=steps, save_every=1, lr_schedule="constant"), resume=True)


# metrics.jsonl


def test_an_incomplete_last_record_is_dropped_with_one_warning(run_dir):
    metrics = run_dir / METRICS_NAME
    complete = metrics.read_bytes()
    metrics.write_bytes(complete + b'{"step": 2, "reward": 0.3')  # a kill while step 2's record was written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume(run_dir).train()
    assert [str(w.message) for w in caught if w.category is TrainerWarning] == [
        f"{metrics}, line 3: dropped an incomplete last record (the run was killed while writing it)"]
    assert [record["step"] for record in read_metrics(run_dir)] == [0, 1, 2]
    assert metrics.read_bytes().startswith(complete) and metrics.read_bytes().endswith(b"}\n")


def test_a_complete_last_record_that_lost_only_its_newline_is_kept(run_dir):
    metrics = run_dir / METRICS_NAME
    metrics.write_bytes(metrics.read_bytes().rstrip(b"\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [record["step"] for record in read_metrics(run_dir)] == [0, 1]


@pytest.mark.parametrize("line, reason", [
    (b'{"step": 0, oops', "not a JSON record (Expecting property name enclosed in double quotes"),
    (b'{"step": 0, "reward": 0.', "not a JSON record"),  # incomplete, but not the last line
    (b"[0, 1]", "expected a JSON object with an integer 'step'"),
    (b'{"reward": 0.5}', "expected a JSON object with an integer 'step'"),
    (b'{"step": "0"}', "expected a JSON object with an integer 'step'"),
    (b'{"step": 0, "x": "\xff"}', "not a JSON record ('utf-8' codec can't decode byte 0xff"),
])
def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(run_dir, capsys, line, reason):
    metrics = run_dir / METRICS_NAME
    lines = metrics.read_bytes().split(b"\n")
    metrics.write_bytes(b"\n".join([line] + lines[1:]))
    before = metrics.read_bytes()
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"])
    assert message.startswith(f"{metrics}, line 1: {reason}"), message
    assert metrics.read_bytes() == before, "left as it was"


def test_a_fresh_run_does_not_read_the_metrics_it_replaces(run_dir):
    # The folder of a run killed before its first checkpoint: nothing to resume, so a new run may replace its metrics.
    (run_dir / CHECKPOINT_NAME).unlink()
    (run_dir / METRICS_NAME).write_bytes(b"not json\n")
    Trainer(small_config(run_dir, steps=1)).train()
    assert [record["step"] for record in read_metrics(run_dir)] == [0]


def test_a_kill_while_the_metrics_are_rewritten_leaves_them_whole(run_dir, monkeypatch):
    metrics = run_dir / METRICS_NAME
    before = metrics.read_bytes()
    trainer = resume(run_dir)
    encode = metrics_log._encode
    calls = []

    def killed_on_the_second_record(record):
        calls.append(record["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(record)

    monkeypatch.setattr(metrics_log, "_encode", killed_on_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert calls == [0, 1] and metrics.read_bytes() == before
    assert sorted(path.name for path in run_dir.iterdir()) == [CHECKPOINT_NAME, METRICS_NAME, "training_curves.png"]


# checkpoint.pt


def sigkilled_while_writing(path):
    """Fork a process that starts an atomic write of ``path`` and is SIGKILLed half-way through it."""
    def write_half_then_die(handle):
        handle.write(b"half a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        try:
            write_atomically(path, write_half_then_die)
        finally:
            os._exit(1)  # not reached: the kill ends the process inside write_half_then_die
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_orphans_of_killed_saves_are_removed_when_a_run_starts(run_dir):
    sigkilled_while_writing(run_dir / CHECKPOINT_NAME)
    sigkilled_while_writing(run_dir / METRICS_NAME)
    orphans = sorted(path.name for path in run_dir.glob(".*.tmp"))
    assert len(orphans) == 2 and orphans[0].startswith(f".{CHECKPOINT_NAME}."), orphans
    unrelated = [run_dir / ".notes.tmp", run_dir / f"{CHECKPOINT_NAME}.tmp", run_dir / f".{CHECKPOINT_NAME}.bak"]
    for path in unrelated:
        path.write_text("keep me")
    checkpoint = (run_dir / CHECKPOINT_NAME).read_bytes()

    resume(run_dir, steps=2)
    assert not list(run_dir.glob(f".{CHECKPOINT_NAME}.*.tmp")) and not list(run_dir.glob(f".{METRICS_NAME}.*.tmp"))
    assert all(path.read_text() == "keep me" for path in unrelated)
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == checkpoint, "the kill left the previous checkpoint"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_every_output_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        Trainer(small_config(tmp_path, steps=1)).train()
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {name: 0o666 & ~umask for name in (CHECKPOINT_NAME, METRICS_NAME, "training_curves.png")}


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "first_bytes":
        path.write_bytes(data[:10])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a checkpoint\n")
    elif how == "pickle_data_overwritten":  # the zip index is intact, the pickled payload is not
        start = data.index(b"data.pkl") + 200
        path.write_bytes(data[:start] + b"\x00" * 64 + data[start + 64:])


@pytest.mark.parametrize("how", ["truncated", "first_bytes", "empty", "text", "pickle_data_overwritten"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(run_dir, capsys, how):
    path = run_dir / CHECKPOINT_NAME
    damage(path, how)
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume"])
    assert message.startswith(f"--resume: {path} cannot be read as a checkpoint: damaged, truncated or not written "
                              "by papo-train ("), message
    with pytest.raises(TrainerInputError, match="cannot be read as a checkpoint"):
        resume(run_dir)


def in_a_child_with_capped_memory(function):
    """``function()``'s result (a string) from a forked process whose address space is capped at MEMORY_CAP, so a
    damaged file that makes a loader reserve huge memory fails there instead of taking the machine down."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork (test_trainer_writes.py)
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
            try:
                result = function()
            except BaseException as error:  # the parent reports it
                result = f"{type(error).__name__} in the child: {error}"
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def pickled_payload(path):
    """``(offset, bytes)`` of the pickle inside the checkpoint's zip archive (stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith("/data.pkl"))
        pickled = archive.read(info)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)  # the local file header: its name and extra field lengths are at 26 and 28
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return start, pickled


def load_outcome(run_dir) -> str:
    try:
        # PAYLOAD_KEYS are the keys every checkpoint has; "scaler" is fp16's, absent from checkpoints written before it
        return "loaded" if set(load_checkpoint(run_dir)) >= set(PAYLOAD_KEYS) else "loaded without all keys"
    except TrainerInputError as error:
        return f"TrainerInputError: {error}"


def largest_member(path):
    """``(name, offset, size)`` of the archive's largest member, a tensor's bytes (stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda member: member.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return info.filename, start, info.file_size


@pytest.mark.parametrize("count", [1, 200])
def test_flipped_bytes_in_tensor_data_are_an_error_naming_the_file_before_any_work(run_dir, capsys, count):
    """torch.load reads such a file without complaint (one weight is another number); its CRC-32 does not hold."""
    path = run_dir / CHECKPOINT_NAME
    name, start, size = largest_member(path)
    data = bytearray(path.read_bytes())
    for position in range(start + size // 2, start + size // 2 + count):
        data[position] ^= 0x10
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    message = cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"])
    assert message == (f"--resume: {path} cannot be read as a checkpoint: damaged, truncated or not written by "
                       f"papo-train (the bytes of its member {name} fail their CRC-32)")
    assert path.read_bytes() == before, "never trained on, nor overwritten by a sound-looking checkpoint"
    assert [record["step"] for record in read_metrics(run_dir)] == [0, 1]


def without_the_crc_check(monkeypatch):
    """What torch's reader meets behind the CRC-32s: a damage they do not catch (a file written whole that is no
    checkpoint, or a damage with its CRC rewritten to match)."""
    monkeypatch.setattr(checkpoint, "_damage", lambda path: None)


def test_a_huge_memo_index_in_the_payload_does_not_reserve_huge_memory(run_dir, monkeypatch):
    # The full unpickler (weights_only=False) keeps its memo in an array as long as the largest index: with this
    # damage it failed with MemoryError under the 8 GiB cap (a randomly damaged checkpoint, loaded that way without a
    # cap, grew to 22 GB before the kernel killed it). The weights-only unpickler keeps a dict: the damaged index is
    # just another key.
    without_the_crc_check(monkeypatch)
    path = run_dir / CHECKPOINT_NAME
    start, pickled = pickled_payload(path)
    put = next(position for opcode, _, position in pickletools.genops(pickled) if opcode.name == "LONG_BINPUT")
    data = path.read_bytes()
    index_at = start + put + 1  # the opcode's 4-byte little-endian memo index
    path.write_bytes(data[:index_at] + (2**31 - 1).to_bytes(4, "little") + data[index_at + 4:])
    outcome = in_a_child_with_capped_memory(lambda: load_outcome(run_dir))
    assert outcome == "loaded" or outcome.startswith(f"TrainerInputError: --resume: {path} cannot be read"), outcome


def damaged_loads(run_dir, count: int) -> list:
    """The outcomes of ``count`` random damages (1, 8 or 64 random bytes) in the pickled payload, each loaded in a
    forked child with capped memory."""
    path = run_dir / CHECKPOINT_NAME
    data = path.read_bytes()
    offset, pickled = pickled_payload(path)
    start, end = offset, offset + len(pickled)

    def outcomes() -> str:
        rng = random.Random(0)
        results = []
        for _ in range(count):
            offset, size = rng.randrange(start, end), rng.choice([1, 8, 64])
            path.write_bytes(data[:offset] + rng.randbytes(size) + data[offset + size:])
            results.append(load_outcome(run_dir))
        return "\n".join(results)

    results = in_a_child_with_capped_memory(outcomes).split("\n")
    assert len(results) == count
    return results


def test_damage_anywhere_in_the_pickled_payload_fails_its_crc(run_dir):
    path = run_dir / CHECKPOINT_NAME
    for result in damaged_loads(run_dir, 20):
        assert result.startswith(f"TrainerInputError: --resume: {path} cannot be read as a checkpoint") and \
            result.endswith("fail their CRC-32)"), result


def test_damage_the_crcs_miss_is_the_error_naming_the_file(run_dir, monkeypatch):
    """Damaged pickle bytes raise many exception types in torch's reader; each becomes the one error naming the file
    (or the damage hit a value and the file still loads)."""
    without_the_crc_check(monkeypatch)
    path = run_dir / CHECKPOINT_NAME
    # 60 damages: the pickle is mostly parameter names (model and optimizer state are keyed by them), so fewer
    # damages meet fewer exception types (40 met two kinds).
    results = damaged_loads(run_dir, 60)
    for result in results:
        assert result == "loaded" or result.startswith(
            f"TrainerInputError: --resume: {path} cannot be read as a checkpoint"), result
    kinds = {result.rsplit("(", 1)[-1].split(":")[0] for result in results if result != "loaded"}
    assert len(kinds) >= 3, kinds  # several exception types were met, and each became the same error


@pytest.mark.parametrize("payload, missing", [
    ([1, 2], "['model', 'optimizer', 'scheduler', 'next_step', 'rng_states', 'config', 'vocabulary']"),
    ({"model": {}, "config": {}}, "['optimizer', 'scheduler', 'next_step', 'rng_states', 'vocabulary']"),
])
def test_a_torch_file_that_is_no_checkpoint_is_named(tmp_path, capsys, payload, missing):
    torch.save(payload, tmp_path / CHECKPOINT_NAME)
    assert cli_error(capsys, ["--output-dir", str(tmp_path), "--resume"]) == \
        f"--resume: {tmp_path / CHECKPOINT_NAME} is not a papo-train checkpoint of this version: it lacks {missing}"
