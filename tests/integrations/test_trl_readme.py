"""The README's TRL script runs as written (extracted from the README, run in a fresh folder) and leaves a checkpoint
that loads back."""

import json
import re
import subprocess
import sys
from pathlib import Path

from papo_kernels.trainer.local_model import load_local_model

README = Path(__file__).resolve().parents[2] / "README.md"


def trl_script() -> str:
    """The first Python block of the README's "PAPO in TRL" section."""
    section = README.read_text(encoding="utf-8").split("\n## PAPO in TRL\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_trl_script_runs_as_written(tmp_path):
    (tmp_path / "script.py").write_text(trl_script(), encoding="utf-8")
    result = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "papo" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    model, processor = load_local_model(checkpoint)
    assert processor.tokenizer.eos_token == "<|im_end|>" and model.config.model_type == "qwen2_vl"
