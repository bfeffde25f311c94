"""Test setup shared by every test module.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any
test module imports it: with no NVIDIA device the kernels run on the CPU through
Triton's interpreter. The device is probed by its files, not through torch.cuda.
"""

import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
