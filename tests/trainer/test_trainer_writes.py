"""Writes that fail: a full disk or a file size limit during a save, a metrics record written short or not at all,
each a one-line error naming the file (and the error number) that leaves the earlier files as they were; and a
metrics file that lost, repeated or reordered records, refused on --resume."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from papo_kernels.trainer.checkpoint import CHECKPOINT_NAME, save_checkpoint
from papo_kernels.trainer.errors import TrainerWarning
from papo_kernels.trainer.metrics_log import METRICS_NAME, MetricsLog, read_metrics

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import REPOSITORY


def with_file_size_limit(limit: int, function) -> str:
    """``function()``'s message (or what it raised) from a forked process that may write files up to ``limit``
    bytes: a write past it writes what fits and returns short, one at it fails with EFBIG (SIGXFSZ ignored)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            # The parent's OpenMP thread pool does not survive the fork: a parallel torch op in the child would wait
            # on it for ever. One thread runs every op inline.
            torch.set_num_threads(1)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try:
                result = f"returned {function()}"
            except BaseException as error:  # the parent reports it
                result = f"{type(error).__name__} (errno {getattr(error, 'errno', None)}): {error}"
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(result)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        result = pipe.read()
    os.waitpid(pid, 0)
    return result


def next_record(run_dir):
    return {**read_metrics(run_dir)[-1], "step": 2}


def test_a_short_metrics_write_raises_at_once_naming_the_file(run_dir):
    path = run_dir / METRICS_NAME
    size = path.stat().st_size
    line = (json.dumps(next_record(run_dir)) + "\n").encode()
    outcome = with_file_size_limit(size + 10, lambda: MetricsLog(run_dir, 2).write(next_record(run_dir)))
    assert outcome == (f"TrainerOutputError (errno None): cannot write {path}: 10 of the {len(line)} bytes of step "
                       "2's record were written (a full disk or a file size limit); a resume drops the incomplete "
                       "record")
    with pytest.warns(TrainerWarning, match="line 3: dropped an incomplete last record"):
        assert [record["step"] for record in read_metrics(run_dir)] == [0, 1]


def test_a_failed_metrics_write_raises_naming_the_file_and_errno(run_dir):
    path = run_dir / METRICS_NAME
    before = path.read_bytes()
    outcome = with_file_size_limit(len(before), lambda: MetricsLog(run_dir, 2).write(next_record(run_dir)))
    assert outcome == (f"TrainerOutputError (errno 27): cannot write {path} ([Errno 27] File too large); step 2's "
                       "record is not in it")
    assert path.read_bytes() == before


def test_a_save_past_the_file_size_limit_keeps_the_old_checkpoint(run_dir):
    path = run_dir / CHECKPOINT_NAME
    before = path.read_bytes()

    def save():
        return save_checkpoint(run_dir, model_state={"w": torch.zeros(200_000)}, optimizer_state={},
                               scheduler_state={}, next_step=3, rng_states=[], config={}, vocabulary={})

    outcome = with_file_size_limit(100_000, save)  # the 800 kB of weights do not fit
    assert outcome == (f"TrainerOutputError (errno 27): cannot write {path} ([Errno 27] File too large); the file "
                       "was left as it was")
    assert path.read_bytes() == before and not list(run_dir.glob(".*.tmp")), "old checkpoint kept, nothing left over"


# Mounts a tmpfs of SIZE on the folder "$0" in a mount namespace of `unshare --mount`, then runs the command "$@".
SMALL_DISK = 'mount -t tmpfs -o size=SIZE tmpfs "$0" && exec "$@"'


def on_a_small_disk(folder, size: str):
    """A command prefix under which ``folder`` is a file system of ``size``: a real full disk (root only)."""
    prefix = ["unshare", "--mount", "sh", "-c", SMALL_DISK.replace("SIZE", size), str(folder)]
    if os.geteuid() != 0 or shutil.which("unshare") is None or \
            subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("mounting a small file system needs root and unshare; the file size limit tests cover the rest")
    return prefix


def test_a_full_disk_during_a_save_is_one_line_naming_the_file_and_errno(tmp_path):
    """The tiny model's checkpoint is 1.8 MB: on a 1 MiB file system the metrics fit, the save does not."""
    output_dir = tmp_path / "disk"
    output_dir.mkdir()
    command = [sys.executable, "-m", "papo_kernels.train", "--output-dir", str(output_dir), "--steps", "2",
               "--eval-every", "0", "--save-every", "1"] + SMALL_FLAGS
    run = subprocess.run([*on_a_small_disk(output_dir, "1m"), *command], cwd=REPOSITORY, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"papo-train: error: cannot write {output_dir / CHECKPOINT_NAME} ([Errno 28] No space left on device); the "
        "file was left as it was")
    assert "Traceback" not in run.stderr


def test_metrics_that_lost_repeated_or_reordered_records_are_refused_on_resume(run_dir, capsys):
    path = run_dir / METRICS_NAME
    zero, one = path.read_bytes().splitlines(keepends=True)
    for lines, steps in (([one], "[1]"), ([zero, zero, one], "[0, 0, 1]"), ([one, zero], "[1, 0]")):
        path.write_bytes(b"".join(lines))
        assert cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"]) == (
            f"--resume: {path} must hold the records of steps 0-1 (the checkpoint's next step is 2) in order, once "
            f"each, got the steps {steps}: records were lost, repeated or reordered; restore the file or start a new "
            "run")
        assert path.read_bytes() == b"".join(lines), "left as it was"
