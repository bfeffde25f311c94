"""``metrics.jsonl``: one JSON object per training step, appended and flushed as the run goes."""

import json
from pathlib import Path
from typing import Any, Dict, List

METRICS_NAME = "metrics.jsonl"


def read_metrics(output_dir) -> List[Dict[str, Any]]:
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLog:
    """Appends step records; on resume keeps only the records of the steps before ``first_step``,
    so the steps redone after a resume are not logged twice."""

    def __init__(self, output_dir, first_step: int):
        self.path = Path(output_dir) / METRICS_NAME
        kept = [record for record in read_metrics(output_dir) if record["step"] < first_step]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
