"""The fast path's ``autograd.Function``: the chunk loop runs in forward, backward only scales.

Forward computes the loss and, when a gradient is wanted, the gradients of hidden,
hidden_masked, weight and bias (``chunk_loop.run_chunks``). Backward multiplies them
by the incoming gradient of the scalar loss, so any use of the loss downstream
(a scale, a sum with other losses) stays exact. The gradients are handed over, not
copied: a second backward through the same graph raises.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._guards import fused_backward, no_autocast
from ..objective import Objective, TokenBatch
from ..vocab_parallel import VocabShard
from .chunk_loop import FastPathOptions, run_chunks


@dataclass(frozen=True)
class FastPathCall:
    """Everything but the differentiable inputs: token ids (n,), the tokens' inputs and the settings."""

    tokens: Tensor
    batch: TokenBatch
    objective: Objective
    options: FastPathOptions
    epilogue: object  # a module of fast_path/epilogues
    wants_grad: bool  # grad mode was on at the call
    shard: Optional[VocabShard] = None  # this rank's block of a vocabulary-parallel head


class FastPAPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, bias, call: FastPathCall):
        needs_grad = tuple(call.wants_grad and flag for flag in ctx.needs_input_grad[:4])
        with no_autocast(hidden.device):
            result = run_chunks(hidden, hidden_masked, weight, bias, call.tokens, call.batch, call.objective,
                                call.options, call.epilogue, needs_grad, call.shard)
        ctx.gradients = (result.grad_hidden, result.grad_hidden_masked, result.grad_weight, result.grad_bias)
        ctx.save_for_backward(hidden, hidden_masked, weight, bias)  # references only, for the second-order guard
        terms = [term for term in result.terms if term is not None]
        ctx.mark_non_differentiable(*terms)
        return (result.loss, *result.terms)

    @staticmethod
    @fused_backward("papo_loss (fast path)")
    def backward(ctx, loss_grad, *_):
        if ctx.gradients is None:
            raise RuntimeError("papo_loss's fast path hands its gradients to the first backward; for a second "
                               "backward through the same graph use path='per_token'")
        gradients, ctx.gradients = ctx.gradients, None
        for grad in gradients:  # in place: the gradients are this call's own; no host sync to test for 1
            if grad is not None:
                grad.mul_(loss_grad.to(grad.dtype))
        return (*gradients, None)
