"""Benchmarks of papo_kernels against its peers: a sweep runner (``python -m benchmarks.run``)
and a pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any
benchmark module imports papo_kernels or a peer: with no NVIDIA device the Triton
implementations can only run through Triton's interpreter. The device is probed by
its files, not through torch.cuda, as in tests/conftest.py.
"""

import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
