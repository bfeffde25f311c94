"""examples/papo_trl.py, the README's TRL example, runs two steps and prints its PAPO metrics."""

import math
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "papo_trl.py"


def test_papo_trl_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "2"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("step")]
    assert [line[1] for line in lines] == ["2"]
    values = dict(zip(lines[0][2::2], map(float, lines[0][3::2])))
    assert set(values) == {"reward", "loss", "perception_kl", "entropy", "entropy_masked"}
    assert all(math.isfinite(value) for value in values.values()) and values["perception_kl"] >= 0
