"""Fused Triton log-probs and exact entropy of one pass, from hidden states.

The kernels of ``triton_perception_kl.py`` with the masked pass off (``PAIRED=False``):
one sweep over the vocabulary per block of rows, an online softmax, and a backward that
recomputes logit tiles from the saved logsumexp. The logits never reach memory.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._guards import fused_backward
from .triton_perception_kl import TritonOptions, check_triton_dtype, in_dtype, linear_perception_kl_backward
from .triton_perception_kl import linear_perception_kl_forward


class TritonLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, options: TritonOptions):
        (logprobs, entropy, lse), _ = linear_perception_kl_forward(hidden, None, weight, bias, tokens,
                                                                   options.temperature)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.options = options
        return logprobs, entropy

    @staticmethod
    @fused_backward("linear_logprobs (triton backend)")
    def backward(ctx, logprobs_grad, entropy_grad):
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden, _, grad_weight, grad_bias = linear_perception_kl_backward(
            (hidden, None, weight, bias, tokens, lse, None, entropy, None, None),
            (logprobs_grad, None, entropy_grad, None, None),
            (needs_hidden, False, needs_weight, needs_bias),
            ctx.options.temperature,
        )
        return in_dtype(grad_hidden, hidden), in_dtype(grad_weight, weight), in_dtype(grad_bias, bias), None, None


def linear_logprobs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float
) -> Tuple[Tensor, Tensor]:
    """Same as ``reference.linear_logprobs``, fused: the logits never reach memory."""
    check_triton_dtype(hidden)
    return TritonLinearLogprobsFunction.apply(hidden, weight, bias, tokens, TritonOptions(float(temperature)))
