"""The output directory's files: checked writable before any work, written atomically, orphans removed.

A file is written beside its final name (``.NAME.<random>.tmp``), flushed to disk, then
renamed over ``NAME`` (``os.replace`` is atomic on POSIX), so a kill at any moment leaves
either the old file or the new one, never half of one. A kill between creating the
temporary file and the rename leaves that temporary file behind: ``remove_orphans``
deletes such files when the next run starts.
"""

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Tuple

from .errors import TrainerInputError

PROBE_NAME = "write-probe"  # the empty file that proves the output directory writable


def _create_temporary(directory: Path, name: str) -> Tuple[Path, int]:
    """A new file ``directory/.name.<random>.tmp`` and its descriptor, with the mode any new file gets
    (0o666 less the umask, as ``open`` gives; ``tempfile.mkstemp`` would give 0o600)."""
    temporary = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def write_atomically(path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` with ``write(handle)`` (a binary file): beside it, fsync, then ``os.replace``."""
    path = Path(path)
    temporary, descriptor = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
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
