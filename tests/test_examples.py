"""The README's usage example runs and prints a finite loss."""

import math
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_prints_a_finite_loss():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=True)
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("loss ")
    assert math.isfinite(float(first_line.split()[1]))
    assert "perception_kl" in result.stdout and "entropy_masked" in result.stdout
