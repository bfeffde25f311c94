"""The fast path's workspace policy: how many bytes the chunk loop may use when ``workspace_bytes`` is None.

The workspace holds one chunk: its float32 logits of both passes, the half-precision dZ buffer
on CUDA, the epilogue's temporaries and the chunk's stacked hidden rows and their gradient rows
(``chunk_loop.bytes_per_token``). Its size sets the tokens per chunk, hence the number of chunks.

- **Explicit** ``workspace_bytes``: used as given.
- **CPU**: 256 MiB (``LOW_MEMORY_WORKSPACE_BYTES``), as before: the native epilogue reaches 93-96%
  of the CPU's matrix-product rate there (benchmarks/NOTES.md, issue 15).
- **CUDA, dW by** ``addmm`` (the default): min(4 GiB, 10% of the device's free memory). Each chunk's
  ``addmm`` reads and writes the float32 V x D accumulator in a read-modify-write that cuBLAS does
  not hide behind its arithmetic (H200, 2026-12-04: 0.975 ms a chunk at V = 152064, D = 3584), so
  fewer, larger chunks are faster: 256 MiB ran at 0.42-0.46 of the same-run head product, 4 GiB at 0.88.
- **CUDA, dW by the reduce-add kernel** (``PAPO_KERNELS_GRAD_WEIGHT=reduce_add``, ``grad_weight.py``):
  the read-modify-write runs in the background, so the chunk needs only enough rows for the dW
  product to stay compute-bound with it: 1024 tokens (2048 rows: intensity K / 4 = 512 FLOP/B,
  2.8x the H200's ridge of 181), capped at min(1 GiB, 10% of free memory); when the cap binds,
  the tokens go down in steps of 64.
- 256 MiB is the documented low-memory setting (``workspace_bytes=LOW_MEMORY_WORKSPACE_BYTES``).

"Free memory" is what the driver reports free plus what PyTorch's caching allocator holds
unused (reserved but not allocated): both are available to the next allocation.
"""

from typing import Optional

import torch

MiB = 2**20
GiB = 2**30
LOW_MEMORY_WORKSPACE_BYTES = 256 * MiB
FREE_MEMORY_FRACTION = 0.1
ADDMM_WORKSPACE_CAP_BYTES = 4 * GiB
REDUCE_ADD_TOKENS_PER_CHUNK = 1024
REDUCE_ADD_WORKSPACE_CAP_BYTES = 1 * GiB
TOKEN_STEP = 64


def policy_workspace_bytes(free_bytes: int, grad_weight_kernel: str, bytes_per_token: int) -> int:
    """The workspace for a CUDA device with ``free_bytes`` free, dW by ``grad_weight_kernel`` ("addmm" or
    "reduce_add"), ``bytes_per_token`` of workspace per token (a pure function: the policy above)."""
    if free_bytes < 0 or bytes_per_token < 1:
        raise ValueError(f"free_bytes must be >= 0 and bytes_per_token >= 1, got {free_bytes} and {bytes_per_token}")
    share = int(free_bytes * FREE_MEMORY_FRACTION)
    if grad_weight_kernel == "addmm":
        return max(1, min(ADDMM_WORKSPACE_CAP_BYTES, share))
    if grad_weight_kernel != "reduce_add":
        raise ValueError(f"grad_weight_kernel must be 'addmm' or 'reduce_add', got {grad_weight_kernel!r}")
    fitting = min(REDUCE_ADD_WORKSPACE_CAP_BYTES, share) // bytes_per_token
    if fitting >= TOKEN_STEP:
        fitting = fitting // TOKEN_STEP * TOKEN_STEP
    return max(1, min(REDUCE_ADD_TOKENS_PER_CHUNK, fitting)) * bytes_per_token


def free_device_bytes(device: torch.device) -> int:
    """Bytes the next allocation on a CUDA ``device`` can get: the driver's free memory plus the caching
    allocator's reserved but unallocated memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def resolve_workspace_bytes(requested: Optional[int], device: torch.device, grad_weight_kernel: str,
                            bytes_per_token: int) -> int:
    """``requested`` when given; else 256 MiB off CUDA and the policy on CUDA."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return LOW_MEMORY_WORKSPACE_BYTES
    return policy_workspace_bytes(free_device_bytes(device), grad_weight_kernel, bytes_per_token)
