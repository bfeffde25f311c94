"""``metrics.jsonl``: one JSON object per training step, appended as the run goes.

Each record is appended with one write of its whole line, so a kill leaves at worst the
last line incomplete (no newline, not valid JSON). Reading drops such a line with a
warning; any other line that is not a step record is an error naming the file and line.
A write that fails or writes less than the whole line (a full disk, a file size limit) is
a ``TrainerOutputError`` naming the file at once, so the run never goes on with records
missing. On resume the records of the steps before the checkpoint's next step k must be
exactly those of steps 0 to k-1, in order, once each (a file that lost, repeated or
reordered records is an error naming it); the file is rewritten atomically with them.
"""

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List

from .errors import TrainerInputError, TrainerOutputError, TrainerWarning
from .files import failed_write, write_atomically

SHOWN_STEPS = 8  # step numbers named in an error

METRICS_NAME = "metrics.jsonl"


def _parse_record(path: Path, number: int, line: bytes) -> Dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as error:  # json.JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise TrainerInputError(f"{path}, line {number}: not a JSON record ({error})") from None
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"),
                                                                                               int):
        raise TrainerInputError(f"{path}, line {number}: expected a JSON object with an integer 'step', "
                                f"got {line[:80]!r}")
    return record


def read_metrics(output_dir) -> List[Dict[str, Any]]:
    """The step records of ``output_dir/metrics.jsonl`` ([] when there is none)."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail is b"" when the last line is complete
    records = [_parse_record(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if tail.strip():
        try:
            records.append(_parse_record(path, len(lines) + 1, tail))
        except TrainerInputError:
            warnings.warn(f"{path}, line {len(lines) + 1}: dropped an incomplete last record (the run was killed "
                          "while writing it)", TrainerWarning, stacklevel=2)
    return records


class MetricsLog:
    """The step records of a run: made, it reads and checks the records it keeps (those of the steps before
    ``first_step``; none when a run starts at step 0); ``start()`` rewrites the file with them atomically, so the
    steps redone after a resume are not logged twice; ``write`` appends a record."""

    def __init__(self, output_dir, first_step: int):
        self.path = Path(output_dir) / METRICS_NAME
        self.kept = [record for record in read_metrics(output_dir) if record["step"] < first_step] \
            if first_step > 0 else []
        steps = [record["step"] for record in self.kept]
        if steps != list(range(first_step)):
            shown = steps if len(steps) <= SHOWN_STEPS else steps[:SHOWN_STEPS // 2] + ["..."] + \
                steps[-SHOWN_STEPS // 2:]
            raise TrainerInputError(f"--resume: {self.path} must hold the records of steps 0-{first_step - 1} (the "
                                    f"checkpoint's next step is {first_step}) in order, once each, got the steps "
                                    f"{shown}: records were lost, repeated or reordered; restore the file or start "
                                    "a new run")

    def start(self) -> None:
        write_atomically(self.path, lambda handle: handle.writelines(_encode(record) for record in self.kept))

    def write(self, record: Dict[str, Any]) -> None:
        """Append ``record`` in one write; ``TrainerOutputError`` naming the file when that fails or is short."""
        line = _encode(record)
        try:
            with open(self.path, "ab", buffering=0) as handle:  # unbuffered: the line goes out in one write
                written = handle.write(line)
        except OSError as error:
            raise failed_write(self.path, error, f"step {record['step']}'s record is not in it") from None
        if written != len(line):
            raise TrainerOutputError(f"cannot write {self.path}: {written} of the {len(line)} bytes of step "
                                     f"{record['step']}'s record were written (a full disk or a file size limit); "
                                     "a resume drops the incomplete record")


def _encode(record: Dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode("utf-8")
