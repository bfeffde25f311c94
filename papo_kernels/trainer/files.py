"""The output directory's files: checked writable before any work, written atomically, orphans removed.

A file is written beside its final name (``.NAME.<random>.tmp``), flushed to disk, then
renamed over ``NAME`` (``os.replace`` is atomic on POSIX), so a kill at any moment leaves
either the old file or the new one, never half of one. A kill between creating the
temporary file and the rename leaves that temporary file behind: ``remove_orphans``
deletes such files when the next run starts. A write that fails (a full disk, a file size
limit) removes its temporary file and is a ``TrainerOutputError`` naming the file and the
error number; the file is left as it was.
"""

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Optional, Tuple

from .errors import TrainerInputError, TrainerOutputError

PROBE_NAME = "write-probe"  # the empty file that proves the output directory writable


def _create_temporary(directory: Path, name: str) -> Tuple[Path, int]:
    """A new file ``directory/.name.<random>.tmp`` and its descriptor, with the mode any new file gets
    (0o666 less the umask, as ``open`` gives; ``tempfile.mkstemp`` would give 0o600)."""
    temporary = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def os_error(error: BaseException) -> Optional[OSError]:
    """The OSError behind ``error``: itself, or one in the chain of exceptions it was raised from or while handling
    (``torch.save`` reports a failed write of its file as a RuntimeError raised while handling the OSError)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def failed_write(path: Path, error: OSError, kept: str) -> TrainerOutputError:
    """The one-line error of a write of ``path`` that failed with ``error``; ``kept`` says what is left."""
    return TrainerOutputError(f"cannot write {path} ([Errno {error.errno}] {error.strerror}); {kept}", error.errno)


def write_atomically(path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` with ``write(handle)`` (a binary file): beside it, fsync, then ``os.replace``.

    A failed write (an OSError, or an error raised while handling one) is a ``TrainerOutputError`` naming
    ``path`` and the error number; ``path`` is left as it was."""
    path = Path(path)
    temporary = None
    try:
        temporary, descriptor = _create_temporary(path.parent, path.name)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        cause = os_error(error) if isinstance(error, Exception) else None
        if cause is None or isinstance(error, TrainerOutputError):
            raise
        raise failed_write(path, cause, "the file was left as it was") from error
    return path


def prepare_output_dir(path, outputs: Iterable[str] = ()) -> Path:
    """Create ``path`` if needed and prove it writable, and check that each of the file names ``outputs`` in it
    is free or a regular file (so it can be replaced); ``TrainerInputError`` naming the path otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainerInputError(f"output_dir: {path} is a file, expected a directory (or a path to create one at)")
    for name in outputs:
        output = path / name
        if output.exists() and not output.is_file():
            raise TrainerInputError(f"output_dir: {output} is not a regular file; the run writes its {name} there "
                                    "(move it away or choose another --output-dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Write access as the OS grants it (os.access answers yes to root even on a read-only mount).
        probe, descriptor = _create_temporary(path, PROBE_NAME)
        os.close(descriptor)
        probe.unlink(missing_ok=True)
    except OSError as error:
        raise TrainerInputError(f"output_dir: cannot write in {path} ({error.strerror})") from None
    return path


def remove_orphans(directory, names: Iterable[str]) -> List[Path]:
    """Delete the temporary files that killed writes of ``names`` (and write probes) left in ``directory``."""
    removed = []
    for name in (*names, PROBE_NAME):
        for orphan in Path(directory).glob(f".{name}.*.tmp"):
            orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed
