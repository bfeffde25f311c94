"""Triton is an extra, not a core dependency: without it the package imports and the loss runs on the CPU."""

import subprocess
import sys

CODE = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed: importing it raises ImportError
import torch, papo_kernels
hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
tokens = torch.randint(0, 11, (2, 3))
loss, _ = papo_kernels.papo_loss(hidden, weight, tokens, torch.ones(2, 3), torch.randn(2),
                                 hidden_masked=torch.randn(2, 3, 8))
print(bool(torch.isfinite(loss)), "triton" in sys.modules and sys.modules["triton"] is not None)
"""


def test_package_imports_and_computes_without_triton():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


WARNING_CODE = """
import sys, warnings
sys.modules["triton"] = None
import torch
from papo_kernels.backends import resolve_backend
from papo_kernels.fast_path import resolve_epilogue
cuda = torch.device("cuda")  # only resolved, never touched: this machine needs no GPU for it
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = [resolve_backend("auto", cuda, torch.bfloat16).__name__.rsplit(".", 1)[-1],
             resolve_epilogue("auto", cuda, torch.bfloat16).NAME,
             resolve_epilogue("auto", cuda, torch.float16).NAME,
             resolve_backend("auto", cuda, torch.float64).__name__.rsplit(".", 1)[-1]]
print(names, len(caught), caught[0].category.__name__, str(caught[0].message).split(",")[0])
"""


def test_auto_on_cuda_without_triton_warns_once_and_runs_torch():
    result = subprocess.run([sys.executable, "-c", WARNING_CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("['torch_chunked', 'torch', 'torch', 'torch_chunked'] 1 RuntimeWarning "
                                     "papo_kernels: triton does not import")
