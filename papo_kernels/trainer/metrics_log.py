"""``metrics.jsonl``: one JSON object per training step, appended as the run goes.

Each record is appended with one write of its whole line, so a kill leaves at worst the
last line incomplete (no newline, not valid JSON). Reading drops such a line with a
warning; any other line that is not a step record is an error naming the file and line.
On resume the file is rewritten atomically with the records of the steps before the
checkpoint's next step.
"""

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List

from .errors import TrainerInputError, TrainerWarning
from .files import write_atomically

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

    def start(self) -> None:
        write_atomically(self.path, lambda handle: handle.writelines(_encode(record) for record in self.kept))

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "ab", buffering=0) as handle:  # unbuffered: the line goes out in one write
            handle.write(_encode(record))


def _encode(record: Dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode("utf-8")
