"""One writer per output directory: a lock file held for the run's life, naming its owner.

``OUTPUT_DIR/.papo-train.lock`` holds the process id and host of the run that writes there,
and an exclusive ``flock`` on it decides who that is. A second run in the directory, new or
``--resume``, is refused with one line naming the owner: two writers would interleave their
records in ``metrics.jsonl``, rewrite it under each other and save over each other's
checkpoints. The kernel releases a ``flock`` when its holder's process ends, however it ends,
so the file a killed run leaves behind is stale by construction: the next run takes it over,
with one warning naming the run it came from. A run that ends removes the file.

Where the file system refuses ``flock`` (Lustre mounted without it, some network file systems:
ENOSYS, EOPNOTSUPP, ENOLCK), the file alone is the lock, with one warning: it is created
exclusively, and one that exists is the owner's unless the owner is a process of this host
that no longer runs (or one left empty for a second: its owner died before naming itself); such
a stale file is taken over. The owner of a file from another host cannot be checked from here,
so it counts as running (delete the file once that run is over).
"""

import errno
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path
from typing import IO, Optional, Tuple

from .errors import TrainerInputError, TrainerWarning

LOCK_NAME = ".papo-train.lock"
# What flock raises on a file system that does not implement it.
LOCKS_REFUSED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)
EMPTY_WAIT = 1.0  # seconds an empty lock file may take to name its owner (without flock)


def _this_run() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def _owner(text: str) -> Tuple[Optional[int], str]:
    """(pid, host) of a lock file's ``pid P on host H`` (None and the text itself when it is not that)."""
    words = text.split()
    if len(words) == 5 and words[0] == "pid" and words[1].isdigit() and words[2:4] == ["on", "host"]:
        return int(words[1]), words[4]
    return None, text.strip()


def _runs(pid: Optional[int], host: str) -> bool:
    """Whether the lock file's owner may still run: a process of this host that exists, or any other host's."""
    if pid is None or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputDirectoryLock:
    """The lock of one output directory: ``acquire()`` takes it or raises ``TrainerInputError``; ``release()`` gives
    it back (and removes the file)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._handle: Optional[IO] = None  # the open, flocked file
        self._file_only = False  # the lock is the file alone (no flock)

    def _refuse(self, owner: str) -> TrainerInputError:
        return TrainerInputError(f"output_dir: {self.directory} is in use by another papo-train run ({owner}, its "
                                 f"lock file {self.path}); wait for that run to end or give another --output-dir")

    def acquire(self) -> None:
        while True:
            try:
                handle, created = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), "r+"), True
            except FileExistsError:
                try:
                    handle, created = open(self.path, "r+"), False
                except FileNotFoundError:  # removed by the run that held it, just now
                    continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = handle.read().strip() or "a run starting now"
                handle.close()
                raise self._refuse(owner) from None
            except OSError as error:
                handle.close()
                if error.errno not in LOCKS_REFUSED:
                    raise
                if created:  # the empty file opened for flock is no lock without it
                    self.path.unlink(missing_ok=True)
                warnings.warn(f"{self.directory} is on a file system that refuses file locks ({error.strerror}); "
                              f"{self.path} alone marks the run that writes there", TrainerWarning, stacklevel=3)
                self._acquire_file_only()
                return
            # The file a run removed as it ended, opened just before: lock the one at the path now.
            if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(handle.fileno()).st_ino:
                handle.close()
                continue
            self._warn_taken_over(handle.read())
            handle.seek(0)
            handle.truncate()
            handle.write(_this_run() + "\n")
            handle.flush()
            self._handle = handle
            return

    def _acquire_file_only(self) -> None:
        """The lock without flock: the file created exclusively with this run's name; a stale one (its owner gone) is
        removed first. An empty file is one being written (an owner between creating and naming itself, for
        microseconds): it is read again until it names its owner, and counts as stale after EMPTY_WAIT seconds."""
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                previous = self._named_owner()
                if previous is None:
                    continue
                if previous and _runs(*_owner(previous)):
                    raise self._refuse(previous.strip()) from None
                if self._named_owner() == previous:  # still the stale file: nobody took it over meanwhile
                    self.path.unlink(missing_ok=True)
                    self._warn_taken_over(previous)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(_this_run() + "\n")
            self._file_only = True
            return
        raise self._refuse("a run that took the lock file over at the same time")

    def _named_owner(self) -> Optional[str]:
        """The lock file's text once it names an owner (or "" after EMPTY_WAIT seconds empty); None when it is gone."""
        deadline = time.monotonic() + EMPTY_WAIT
        while True:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            if text.strip() or time.monotonic() > deadline:
                return text
            time.sleep(0.01)

    def _warn_taken_over(self, previous: str) -> None:
        if previous.strip() and previous.strip() != _this_run():
            warnings.warn(f"{self.path} named {previous.strip()}, a run that ended without removing it (killed, or "
                          "its machine went down); this run takes the output directory over", TrainerWarning,
                          stacklevel=4)

    def release(self) -> None:
        """Remove the lock file and unlock (the file first: a run that opened it meanwhile sees it gone and retries
        on a new one)."""
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None
        elif self._file_only:
            self.path.unlink(missing_ok=True)
            self._file_only = False
