"""DeepSpeed on this project's CPU machines, shared by the ZeRO-3 tests and their workers.

DeepSpeed runs on the CPU through its CPU accelerator (``DS_ACCELERATOR=cpu``) with gloo. Its
CPU backend compiles a shared-memory all-reduce op (C++, minutes on two cores) the first time
the process group starts; gloo does every collective without it, so the workers skip that build.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPOSITORY = Path(__file__).parents[1]


def skip_shared_memory_op_build() -> None:
    """Before ``deepspeed.init_distributed``: no build of DeepSpeed's shared-memory op (gloo all-reduces).
    importlib: the attribute ``deepspeed.comm.torch`` is the torch package, not the module."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def run_two_processes(launcher: List[str], worker: Path, *arguments: str, timeout: int = 300) -> None:
    """``python -m <launcher...> worker arguments`` in two CPU processes on DeepSpeed's CPU accelerator; fails
    with the end of their output if a process failed. The workers import this checkout's package, this folder's
    modules and their own folder's."""
    folders = [REPOSITORY, Path(__file__).parent, worker.parent]
    path = os.pathsep.join(filter(None, [*map(str, folders), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", *launcher, str(worker), *arguments]
    completed = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
