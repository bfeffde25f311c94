"""Fused Triton kernels: log-probs, exact entropies and the exact perception KL from hidden states.

Forward: one program per block of rows sweeps the vocabulary once; each weight tile is
loaded once for both passes, logit tiles z = (W h + b)/tau and z~ live on chip only, and
per row an online softmax keeps m, s = sum exp(z - m), t = sum exp(z - m)(z - m) per pass
and u = sum exp(z - m)(z~ - m~) across them (PAPO_SPEC.md):

    lse = m + log s,   H = log s - t / s,   l = z_y - lse,   KL(p || q) = (t - u) / s - log s + log s~.

Backward: one program per (row block, vocabulary tile) recomputes the logit tiles, forms
dz and dz~ from the saved lse, entropies and KL and the upstream gradients (the gradient
table of PAPO_SPEC.md), and adds dh = dz W / tau, dW = dz^T h / tau and db = sum dz / tau
into float32 buffers with atomics. Nothing of size N x V is written to memory.

With ``PAIRED`` off the same kernels compute the clean pass alone; ``triton_logprobs.py``
uses them that way.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from .._guards import fused_backward
from . import TRITON_DTYPES
from ._triton_utils import absorb_pair, block_config, clean_logit_gradient, dot_precisions, last_dim_contiguous
from ._triton_utils import initial_pair_state, logit_tiles, masked_logit_gradient, row_column, store_statistics
from .torch_chunked import GradientPlan


@triton.jit
def _linear_perception_kl_fwd_kernel(
    # pointers
    hidden_ptr, hidden_masked_ptr, weight_ptr, bias_ptr, tokens_ptr,
    logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr, kl_ptr,
    # sizes
    n_rows, vocab_size, dim,
    # strides
    stride_hidden, stride_hidden_masked, stride_weight,
    # runtime scalars
    temperature,
    # constexpr flags
    HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)

    (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
     shifted_sum_masked, cross_sum) = initial_pair_state(BLOCK_N)

    for v_start in range(0, vocab_size, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < vocab_size
        z, z_masked = logit_tiles(
            hidden_ptr, hidden_masked_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
            dim, stride_hidden, stride_hidden_masked, stride_weight, temperature,
            HAS_BIAS, True, PAIRED, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        (token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
         shifted_sum_masked, cross_sum) = absorb_pair(
            token_logit, running_max, exp_sum, shifted_sum, token_logit_masked, running_max_masked, exp_sum_masked,
            shifted_sum_masked, cross_sum, z, z_masked, cols[None, :] == tokens[:, None], col_ok, PAIRED)

    store_statistics(logprobs_ptr, entropy_ptr, lse_ptr, logprobs_masked_ptr, entropy_masked_ptr, lse_masked_ptr,
                     kl_ptr, rows, row_ok, token_logit, running_max, exp_sum, shifted_sum, token_logit_masked,
                     running_max_masked, exp_sum_masked, shifted_sum_masked, cross_sum, PAIRED)


@triton.jit
def _linear_perception_kl_bwd_kernel(
    # pointers: inputs, saved statistics, upstream gradients, float32 gradient buffers
    hidden_ptr, hidden_masked_ptr, weight_ptr, bias_ptr, tokens_ptr,
    lse_ptr, entropy_ptr, lse_masked_ptr, entropy_masked_ptr, kl_ptr,
    logprobs_grad_ptr, logprobs_masked_grad_ptr, entropy_grad_ptr, entropy_masked_grad_ptr, kl_grad_ptr,
    grad_hidden_ptr, grad_hidden_masked_ptr, grad_weight_ptr, grad_bias_ptr,
    # sizes
    n_rows, vocab_size, dim,
    # strides (the gradient buffers are contiguous, row stride dim)
    stride_hidden, stride_hidden_masked, stride_weight,
    # runtime scalars
    temperature,
    # constexpr flags: upstream gradients present, what to compute, gradients wanted
    HAS_BIAS: tl.constexpr,
    LOGPROBS_GRAD: tl.constexpr, LOGPROBS_MASKED_GRAD: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    ENTROPY_MASKED_GRAD: tl.constexpr, KL_GRAD: tl.constexpr,
    CLEAN_LOGITS: tl.constexpr, MASKED_LOGITS: tl.constexpr, CLEAN_DZ: tl.constexpr, MASKED_DZ: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr, GRAD_HIDDEN_MASKED: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GRAD_DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < vocab_size
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    is_token = (cols[None, :] == tokens[:, None]).to(tl.float32)

    z, z_masked = logit_tiles(
        hidden_ptr, hidden_masked_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
        dim, stride_hidden, stride_hidden_masked, stride_weight, temperature,
        HAS_BIAS, CLEAN_LOGITS, MASKED_LOGITS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    # log p = z - lse; p = 0 outside the tile's valid rows and columns, so dz is 0 there
    log_p = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    p, log_q, q = log_p, log_p, log_p
    if CLEAN_LOGITS:
        log_p = tl.where(tile_ok, z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None], 0.0)
        p = tl.where(tile_ok, tl.exp(log_p), 0.0)
    if MASKED_LOGITS:
        log_q = tl.where(tile_ok, z_masked - tl.load(lse_masked_ptr + rows, mask=row_ok, other=0.0)[:, None], 0.0)
        q = tl.where(tile_ok, tl.exp(log_q), 0.0)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    kl_grad = row_column(kl_grad_ptr, rows, row_ok, KL_GRAD)
    if CLEAN_DZ:
        dz = clean_logit_gradient(
            p, log_p, log_q, is_token, row_column(logprobs_grad_ptr, rows, row_ok, LOGPROBS_GRAD),
            row_column(entropy_grad_ptr, rows, row_ok, ENTROPY_GRAD),
            row_column(entropy_ptr, rows, row_ok, ENTROPY_GRAD), kl_grad, row_column(kl_ptr, rows, row_ok, KL_GRAD),
            LOGPROBS_GRAD, ENTROPY_GRAD, KL_GRAD,
        ) / temperature
    dz_masked = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if MASKED_DZ:
        dz_masked = masked_logit_gradient(
            q, log_q, p, is_token, row_column(logprobs_masked_grad_ptr, rows, row_ok, LOGPROBS_MASKED_GRAD),
            row_column(entropy_masked_grad_ptr, rows, row_ok, ENTROPY_MASKED_GRAD),
            row_column(entropy_masked_ptr, rows, row_ok, ENTROPY_MASKED_GRAD), kl_grad,
            LOGPROBS_MASKED_GRAD, ENTROPY_MASKED_GRAD, KL_GRAD,
        ) / temperature

    # dz and dz~ already carry 1/tau: dh = dz W, dW = dz^T h + dz~^T h~, db = sum_rows (dz + dz~)
    if GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz + dz_masked, axis=0), mask=col_ok)
    if GRAD_HIDDEN or GRAD_HIDDEN_MASKED or GRAD_WEIGHT:
        for d_start in range(0, dim, BLOCK_D):
            ds = d_start + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            row_d_ok = row_ok[:, None] & d_ok[None, :]
            if GRAD_HIDDEN or GRAD_HIDDEN_MASKED:
                w = tl.load(weight_ptr + cols[:, None] * stride_weight + ds[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            if GRAD_HIDDEN:
                tl.atomic_add(grad_hidden_ptr + rows[:, None] * dim + ds[None, :],
                              tl.dot(dz, w, input_precision=GRAD_DOT_PRECISION), mask=row_d_ok)
            if GRAD_HIDDEN_MASKED:
                tl.atomic_add(grad_hidden_masked_ptr + rows[:, None] * dim + ds[None, :],
                              tl.dot(dz_masked, w, input_precision=GRAD_DOT_PRECISION), mask=row_d_ok)
            if GRAD_WEIGHT:
                grad_w = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
                if CLEAN_DZ:
                    h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + ds[None, :],
                                mask=row_d_ok, other=0.0).to(tl.float32)
                    grad_w = tl.dot(tl.trans(dz), h, grad_w, input_precision=GRAD_DOT_PRECISION)
                if MASKED_DZ:
                    h_masked = tl.load(hidden_masked_ptr + rows[:, None] * stride_hidden_masked + ds[None, :],
                                       mask=row_d_ok, other=0.0).to(tl.float32)
                    grad_w = tl.dot(tl.trans(dz_masked), h_masked, grad_w, input_precision=GRAD_DOT_PRECISION)
                tl.atomic_add(grad_weight_ptr + cols[:, None] * dim + ds[None, :], grad_w,
                              mask=col_ok[:, None] & d_ok[None, :])


def linear_perception_kl_forward(hidden, hidden_masked, weight, bias, tokens, temperature):
    """Launch the forward. Returns (logprobs, entropy, lse) and, with ``hidden_masked``,
    (logprobs~, entropy~, lse~, kl); all float32 of shape (N,)."""
    paired = hidden_masked is not None
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    hidden_masked = last_dim_contiguous(hidden_masked) if paired else hidden
    (n, dim), vocab_size = hidden.shape, weight.shape[0]
    assert tokens.dtype == torch.int64 and tokens.shape == (n,)
    outputs = torch.empty((7 if paired else 3, n), dtype=torch.float32, device=hidden.device)
    if n > 0:
        config = block_config(hidden.device)
        dot_precision, _ = dot_precisions(hidden.dtype)
        padded = (*outputs, *([outputs[0]] * 4)) if not paired else tuple(outputs)
        _linear_perception_kl_fwd_kernel[(triton.cdiv(n, config.block_n),)](
            hidden, hidden_masked, weight, weight if bias is None else bias, tokens.contiguous(),
            *padded,
            n, vocab_size, dim,
            hidden.stride(0), hidden_masked.stride(0), weight.stride(0),
            temperature,
            HAS_BIAS=bias is not None, PAIRED=paired, DOT_PRECISION=dot_precision,
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return tuple(outputs[:3]), (tuple(outputs[3:]) if paired else None)


def linear_perception_kl_backward(saved, grads, needs_input_grad, temperature):
    """Launch the backward; returns float32 gradients for (hidden, hidden_masked, weight, bias),
    None where not wanted or identically zero.

    saved: (hidden, hidden_masked, weight, bias, tokens, lse, lse~, entropy, entropy~, kl), the masked
    ones None for one pass; grads: (g_l, g_l~, g_H, g_H~, g_KL), None where absent; needs_input_grad:
    flags for (hidden, hidden_masked, weight, bias).
    """
    hidden, hidden_masked, weight, bias, tokens, lse, lse_masked, entropy, entropy_masked, kl = saved
    needs_hidden, needs_hidden_masked, needs_weight, needs_bias = needs_input_grad
    plan = GradientPlan.make(grads, needs_hidden, needs_hidden_masked, needs_weight or needs_bias)
    if not (plan.clean_dz or plan.masked_dz):
        return None, None, None, None
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    hidden_masked = last_dim_contiguous(hidden_masked) if hidden_masked is not None else hidden
    (n, dim), vocab_size, device = hidden.shape, weight.shape[0], hidden.device

    def buffer(wanted: bool, shape) -> Optional[Tensor]:
        return torch.zeros(shape, dtype=torch.float32, device=device) if wanted else None

    grad_hidden = buffer(needs_hidden and plan.clean_dz, (n, dim))
    grad_hidden_masked = buffer(needs_hidden_masked and plan.masked_dz, (n, dim))
    grad_weight = buffer(needs_weight, (vocab_size, dim))
    grad_bias = buffer(needs_bias, (vocab_size,))
    if n > 0:
        config = block_config(device)
        dot_precision, grad_dot_precision = dot_precisions(hidden.dtype)
        grads = tuple(None if g is None else g.to(torch.float32).contiguous() for g in grads)
        stand_in = lse  # for pointers that the constexpr flags never let the kernel read or write

        def pointer(tensor: Optional[Tensor]) -> Tensor:
            return stand_in if tensor is None else tensor

        grid = (triton.cdiv(n, config.block_n), triton.cdiv(vocab_size, config.block_v))
        _linear_perception_kl_bwd_kernel[grid](
            hidden, hidden_masked, weight, pointer(bias), tokens.contiguous(),
            lse, entropy, pointer(lse_masked), pointer(entropy_masked), pointer(kl),
            *map(pointer, grads),
            pointer(grad_hidden), pointer(grad_hidden_masked), pointer(grad_weight), pointer(grad_bias),
            n, vocab_size, dim,
            hidden.stride(0), hidden_masked.stride(0), weight.stride(0),
            temperature,
            HAS_BIAS=bias is not None,
            LOGPROBS_GRAD=grads[0] is not None, LOGPROBS_MASKED_GRAD=grads[1] is not None,
            ENTROPY_GRAD=grads[2] is not None, ENTROPY_MASKED_GRAD=grads[3] is not None,
            KL_GRAD=grads[4] is not None,
            CLEAN_LOGITS=plan.clean_logits, MASKED_LOGITS=plan.masked_logits,
            CLEAN_DZ=plan.clean_dz, MASKED_DZ=plan.masked_dz,
            GRAD_HIDDEN=grad_hidden is not None, GRAD_HIDDEN_MASKED=grad_hidden_masked is not None,
            GRAD_WEIGHT=grad_weight is not None, GRAD_BIAS=grad_bias is not None,
            DOT_PRECISION=dot_precision, GRAD_DOT_PRECISION=grad_dot_precision,
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return grad_hidden, grad_hidden_masked, grad_weight, grad_bias


def in_dtype(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


@dataclass(frozen=True)
class TritonOptions:
    temperature: float


class TritonLinearPerceptionKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, hidden_masked, weight, bias, tokens, options: TritonOptions):
        clean, masked = linear_perception_kl_forward(hidden, hidden_masked, weight, bias, tokens, options.temperature)
        (logprobs, entropy, lse), (logprobs_masked, entropy_masked, lse_masked, kl) = clean, masked
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, hidden_masked, weight, bias, tokens, lse, lse_masked, entropy, entropy_masked, kl)
        ctx.options = options
        return logprobs, logprobs_masked, entropy, entropy_masked, kl

    @staticmethod
    @fused_backward("linear_perception_kl (triton backend)")
    def backward(ctx, logprobs_grad, logprobs_masked_grad, entropy_grad, entropy_masked_grad, kl_grad):
        saved = ctx.saved_tensors
        grads = (logprobs_grad, logprobs_masked_grad, entropy_grad, entropy_masked_grad, kl_grad)
        grad_hidden, grad_hidden_masked, grad_weight, grad_bias = linear_perception_kl_backward(
            saved, grads, ctx.needs_input_grad[:4], ctx.options.temperature)
        hidden, _, weight, bias = saved[:4]
        return (in_dtype(grad_hidden, hidden), in_dtype(grad_hidden_masked, hidden), in_dtype(grad_weight, weight),
                in_dtype(grad_bias, bias), None, None)


def check_triton_dtype(hidden: Tensor) -> None:
    if hidden.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' computes in float16, bfloat16 or float32, got hidden of dtype {hidden.dtype}; "
            f"use backend='torch' (chunked) or 'reference' for float64"
        )
    if hidden.dtype == torch.bfloat16 and knobs.runtime.interpret:
        raise ValueError(
            "backend='triton' under TRITON_INTERPRET=1 computes in float16 or float32, got hidden of dtype "
            "torch.bfloat16 (the interpreter multiplies bfloat16 bit patterns as integers); use backend='torch' "
            "on the CPU, or a CUDA device"
        )


def linear_perception_kl(
    hidden: Tensor, hidden_masked: Tensor, weight: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same as ``reference.linear_perception_kl``, fused: the logits never reach memory."""
    check_triton_dtype(hidden)
    return TritonLinearPerceptionKLFunction.apply(hidden, hidden_masked, weight, bias, tokens,
                                                  TritonOptions(float(temperature)))
