"""One writer per output directory (papo_kernels/trainer/lock.py): a second run, new or --resume, is refused in one
line naming the run that holds the directory; a lock left by a killed run is taken over with one warning; where the
file system refuses flock, the lock file alone decides, by its owner's pid."""

import errno
import os
import socket
import subprocess
import sys
import warnings

import pytest

from papo_kernels.train import main
from papo_kernels.trainer import Trainer, lock
from papo_kernels.trainer.checkpoint import CHECKPOINT_NAME
from papo_kernels.trainer.errors import TrainerInputError, TrainerWarning
from papo_kernels.trainer.lock import LOCK_NAME, OutputDirectoryLock
from papo_kernels.trainer.metrics_log import METRICS_NAME, read_metrics

from cli_helpers import SMALL_FLAGS, cli_error
from trainer_helpers import REPOSITORY, small_config

HOST = socket.gethostname()


def in_use(directory, owner: str) -> str:
    return (f"output_dir: {directory} is in use by another papo-train run ({owner}, its lock file "
            f"{directory / LOCK_NAME}); wait for that run to end or give another --output-dir")


HOLD = """
import sys, time
from papo_kernels.trainer.lock import OutputDirectoryLock
held = OutputDirectoryLock(sys.argv[1])
held.acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(directory) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock, as a run does, until it is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                               env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_run_and_a_resume_during_a_run_are_refused_then_a_killed_runs_lock_is_taken_over(run_dir, capsys):
    before = {name: (run_dir / name).read_bytes() for name in (CHECKPOINT_NAME, METRICS_NAME)}
    running = holder(run_dir)
    try:
        owner = f"pid {running.pid} on host {HOST}"
        assert cli_error(capsys, ["--output-dir", str(run_dir), "--resume", "--steps", "3"]) == in_use(run_dir, owner)
        assert cli_error(capsys, ["--output-dir", str(run_dir), "--overwrite-output-dir", "--steps", "1"]
                         + SMALL_FLAGS) == in_use(run_dir, owner)
        assert {name: (run_dir / name).read_bytes() for name in before} == before, "refused before any write"
    finally:
        running.kill()  # SIGKILL: the lock file stays, naming the dead process
        running.wait()
        running.stdout.close()
    assert main(["--output-dir", str(run_dir), "--resume", "--steps", "3"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("papo-train: warning: ")]
    assert warned == [f"papo-train: warning: {run_dir / LOCK_NAME} named pid {running.pid} on host {HOST}, a run "
                      "that ended without removing it (killed, or its machine went down); this run takes the output "
                      "directory over"]
    assert [record["step"] for record in read_metrics(run_dir)] == [0, 1, 2]
    assert not (run_dir / LOCK_NAME).exists(), "a run that ends removes its lock file"


def test_two_runs_started_together_one_writes_the_other_is_refused(tmp_path):
    """Both used to succeed and interleave their records in one metrics.jsonl."""
    command = [sys.executable, "-m", "papo_kernels.train", "--output-dir", str(tmp_path / "run"), "--steps", "6",
               "--eval-every", "0", "--save-every", "0"] + SMALL_FLAGS
    runs = [subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.pid, run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for _, code, _ in results) == [0, 2], results
    (winner, *_), (_, _, refused) = sorted(results, key=lambda result: result[1])
    assert refused.splitlines()[-1] == "papo-train: error: " + in_use(tmp_path / "run", f"pid {winner} on host "
                                                                                       f"{HOST}")
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == list(range(6))


def test_a_run_holds_its_directory_until_it_ends(tmp_path):
    first = Trainer(small_config(tmp_path, steps=1))
    with pytest.raises(TrainerInputError) as refused:
        Trainer(small_config(tmp_path, steps=1))
    assert str(refused.value) == in_use(tmp_path, f"pid {os.getpid()} on host {HOST}")
    assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()} on host {HOST}\n"
    first.train()
    assert not (tmp_path / LOCK_NAME).exists()
    # a set-up that fails gives the directory back: a resume without a checkpoint, then a run that works
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(TrainerInputError, match="no checkpoint at"):
        Trainer(small_config(tmp_path, steps=1), resume=True)
    assert not (tmp_path / LOCK_NAME).exists()
    Trainer(small_config(tmp_path, steps=1)).train()


@pytest.fixture
def no_flock(monkeypatch):
    """A file system that refuses flock, as Lustre mounted without it does."""
    def refuse(*args):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(lock.fcntl, "flock", refuse)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_without_flock_the_file_alone_is_the_lock(tmp_path, no_flock):
    first = OutputDirectoryLock(tmp_path)
    with pytest.warns(TrainerWarning, match="on a file system that refuses file locks \\(Function not implemented\\)"):
        first.acquire()
    with pytest.warns(TrainerWarning, match="refuses file locks"), pytest.raises(TrainerInputError) as refused:
        OutputDirectoryLock(tmp_path).acquire()
    assert str(refused.value) == in_use(tmp_path, f"pid {os.getpid()} on host {HOST}")
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_flock_a_stale_file_is_taken_over_and_another_hosts_is_refused(tmp_path, no_flock):
    path = tmp_path / LOCK_NAME
    dead = dead_pid()
    path.write_text(f"pid {dead} on host {HOST}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        taken = OutputDirectoryLock(tmp_path)
        taken.acquire()
    assert any(f"named pid {dead} on host {HOST}, a run that ended without removing it" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    assert path.read_text() == f"pid {os.getpid()} on host {HOST}\n"
    taken.release()
    path.write_text("pid 1 on host another-machine\n")  # its process cannot be checked from here
    with pytest.warns(TrainerWarning), pytest.raises(TrainerInputError) as refused:
        OutputDirectoryLock(tmp_path).acquire()
    assert str(refused.value) == in_use(tmp_path, "pid 1 on host another-machine")
