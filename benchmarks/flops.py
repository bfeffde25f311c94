"""Analytic FLOP counts: the floor of work every implementation must do.

Only the LM-head matrix products count. One pass over N tokens with a (V, D)
head costs 2NDV forward (the logits z = h W^T) and 4NDV backward (dh = dz W and
dW = dz^T h). Elementwise work (softmax, entropy, KL: O(NV)) is left out, and so
is the forward recomputation that fused kernels do in their backward: it is
work an implementation chooses to do, not work the op needs.
"""

PASSES = {"logprobs": 1, "perception_kl": 2, "papo_loss": 2}
FLOPS_PER_NDV = {"forward": 2, "backward": 4, "full": 6}


def lm_head_flops(op: str, mode: str, n: int, d: int, v: int) -> int:
    """FLOP floor of ``op`` (logprobs, perception_kl or papo_loss) in ``mode`` (forward, backward or full)."""
    return PASSES[op] * FLOPS_PER_NDV[mode] * n * d * v


def matmul_flops(n: int, d: int, v: int) -> int:
    """FLOPs of one (N, D) x (D, V) matrix product."""
    return 2 * n * d * v


def tflops(flops: int, milliseconds: float) -> float:
    """Achieved rate in TFLOP/s of ``flops`` done in ``milliseconds``."""
    return flops / (milliseconds * 1e-3) / 1e12
