"""What the GPU script runs on: package versions, the device, the peers' imports, and two measured ceilings.

The ceilings (METHOD.md of the device notes: measure them once per machine) are the rate of a
large bf16 matrix product on random data and the bandwidth of a large device-to-device copy,
counting the bytes read and the bytes written.
"""

import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Dict, List, Tuple

import torch

import papo_kernels

from .implementations import implementations, import_failure
from .stages import Ceilings, Timer

# distribution name -> how the summary names it
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "trl", "datasets", "accelerate",
            "huggingface-hub", "numpy", "pandas", "pyarrow", "matplotlib")
GPU_CEILING_SIZES = (8192, 2**30)  # matrix side; bytes copied
CPU_CEILING_SIZES = (256, 2**24)


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version(), "papo_kernels": papo_kernels.__version__}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def out_dtype_support(device: torch.device) -> str:
    """Whether torch multiplies half inputs into float32 results (``torch.mm(..., out_dtype=torch.float32)``)."""
    declared = hasattr(torch.ops.aten.mm, "dtype_out")
    if device.type != "cuda":
        return f"aten.mm.dtype_out {'exists' if declared else 'missing'} (used on CUDA only)"
    if not declared:
        return "aten.mm.dtype_out missing: the fast path multiplies half inputs in float32 copies"
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    b = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    try:
        result = torch.mm(a, b, out_dtype=torch.float32)
    except Exception as error:  # an old torch declares it but refuses the call
        return f"aten.mm.dtype_out exists but the call failed: {type(error).__name__}: {error}"
    error = float((result - a.float() @ b.float()).abs().max())
    return f"torch.mm(bf16, bf16, out_dtype=float32) -> {result.dtype}, max |difference| to a float32 product {error:.3g}"


def nvidia_smi_reading() -> str:
    """Clocks, power and temperature as nvidia-smi reads them (a query: it changes no setting)."""
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found"
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.draw,power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi failed: {error}"
    return query.stdout.strip() or query.stderr.strip()


def device_facts(device: torch.device) -> Dict[str, str]:
    facts = {"device": str(device), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset")}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts.update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                     multiprocessors=str(properties.multi_processor_count),
                     memory_gib=f"{properties.total_memory / 2**30:.1f}",
                     l2_mib=f"{getattr(properties, 'L2_cache_size', 0) / 2**20:.0f}", cuda=str(torch.version.cuda))
        facts["nvidia-smi (driver, sm MHz, max sm MHz, mem MHz, W, W limit, C)"] = nvidia_smi_reading()
    else:
        facts.update(name=platform.processor() or platform.machine(), threads=str(torch.get_num_threads()))
    facts["out_dtype"] = out_dtype_support(device)
    return facts


def peer_imports() -> Dict[str, str]:
    """Each implementation's needed imports: 'ok' or why not."""
    found = {}
    for impl in implementations():
        needs = ((impl.module,) if impl.module else ()) + impl.imports
        if needs:
            failures = [failure for failure in map(import_failure, needs) if failure]
            found[impl.name] = "; ".join(failures) or "ok"
    return found


def measure_ceilings(device: torch.device, timer: Timer) -> Tuple[Ceilings, List[str]]:
    """The matrix-product rate (bf16 on CUDA, float32 on CPU) and the copy bandwidth, with one line on each."""
    side, copy_bytes = GPU_CEILING_SIZES if device.type == "cuda" else CPU_CEILING_SIZES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    out = torch.empty(side, side, device=device, dtype=dtype)
    matmul_ms = timer(lambda: torch.mm(a, b, out=out))[0]
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = timer(lambda: target.copy_(source))[0]
    ceilings = Ceilings(matmul_tflops=2 * side**3 / (matmul_ms * 1e9), copy_gb_per_s=2 * copy_bytes / (copy_ms * 1e6))
    lines = [f"matrix product {side}^3 {str(dtype).removeprefix('torch.')} (random data): {matmul_ms:.3f} ms, "
             f"{ceilings.matmul_tflops:.1f} TFLOP/s",
             f"device copy of {copy_bytes / 2**20:.0f} MiB: {copy_ms:.3f} ms, {ceilings.copy_gb_per_s:.0f} GB/s "
             "(read + written)"]
    return ceilings, lines
