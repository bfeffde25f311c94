"""The fast path of ``papo_loss``: the gradient computed inside the forward, one row chunk at a time.

The layers, top to bottom (shared STYLE.md):

1. ``chunk_loop.py``: sizes the chunk from the workspace budget (``workspace.py``: the policy when
   none is given), calls the matrix products of the device's library and the epilogue, accumulates
   the gradients; nothing device-specific. The weight gradient's product is ``addmm`` or, behind a
   flag, a Triton GEMM that adds its tiles by TMA reduce-add (``grad_weight.py``,
   ``triton_grad_weight.py``);
2. ``epilogues/``: one per device, one contract (``epilogues/contract.py``): a logits chunk
   in, per-row statistics and then dZ out (Triton on CUDA, native C++ from ``csrc/`` on CPU, plain
   torch everywhere as the second opinion);
3. ``function.py``: the ``autograd.Function`` that runs the loop in forward and scales the
   stored gradients in backward;
4. the public function stays ``papo_kernels.papo_loss``, which picks this path for training.

Matrix work is 12 N D V for N tokens and a vocabulary of V (2 N D V forward and 4 N D V
backward per pass, two passes), against 16 N D V for the per-token ops, whose backward
recomputes the logits.
"""

from .chunk_loop import FastPathOptions
from .epilogues import EPILOGUES, resolve_epilogue
from .function import FastPAPOLossFunction, FastPathCall
from .workspace import LOW_MEMORY_WORKSPACE_BYTES

__all__ = ["EPILOGUES", "FastPAPOLossFunction", "FastPathCall", "FastPathOptions", "LOW_MEMORY_WORKSPACE_BYTES",
           "resolve_epilogue"]
