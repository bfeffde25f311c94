"""The torch epilogue: the fast path's per-row work in plain PyTorch ops; runs anywhere.

It is the second opinion the tests hold the Triton and native epilogues to, and the
fallback where neither is available. After ``statistics`` the logits chunk holds
log p (and log q) in place; ``logit_gradient`` reads them. Besides the logits it
holds up to three (C, V) temporaries at once, paired or not (a single pass: p, the
factor and one term of it, or logsumexp's own beside exp in ``statistics``).
"""

from typing import Optional

import torch
from torch import Tensor

from .contract import RowStatistics, UpstreamGradients

NAME = "torch"


def workspace_bytes_per_token(vocab_size: int, paired: bool, itemsize: int) -> int:
    return 3 * vocab_size * itemsize


def _log_softmax_(z: Tensor, tokens: Tensor):
    """Turns z into log p in place; returns (lse, l = log p(y), H = -sum p log p)."""
    lse = torch.logsumexp(z, dim=1)
    z.sub_(lse[:, None])
    logprobs = z.gather(1, tokens[:, None]).squeeze(1)
    entropy = -torch.linalg.vecdot(z.exp(), z)
    return lse, logprobs, entropy


def statistics(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
               paired: bool) -> RowStatistics:
    if bias is not None:
        logits.add_(bias.to(logits.dtype))
    logits.div_(temperature)
    n = tokens.shape[0]
    lse, logprobs, entropy = _log_softmax_(logits[:n], tokens)
    if not paired:
        return RowStatistics(logprobs, entropy, lse)
    log_p, log_q = logits[:n], logits[n:]
    lse_masked, logprobs_masked, entropy_masked = _log_softmax_(log_q, tokens)
    kl = torch.linalg.vecdot(log_p.exp(), log_p - log_q)  # KL(p || q) = sum p (log p - log q)
    return RowStatistics(logprobs, entropy, lse, logprobs_masked, entropy_masked, lse_masked, kl)


def _column(value: Optional[Tensor]) -> Optional[Tensor]:
    return None if value is None else value[:, None]


def _add_at_tokens(dz: Tensor, tokens: Tensor, values: Optional[Tensor]) -> None:
    """dz[i, y_i] += values[i]: the e_y part of d l / dz."""
    if values is not None:
        dz.scatter_add_(1, tokens[:, None], values[:, None].to(dz.dtype))


def logit_gradient(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                   stats: RowStatistics, grads: UpstreamGradients, out: Tensor) -> None:
    n = tokens.shape[0]
    log_p = logits[:n]
    p = log_p.exp()
    g_l, g_h, g_l_masked, g_h_masked, g_kl = map(_column, grads)
    dz = None
    if grads.clean:
        # dz = p * (-g_l - g_H (log p + H) + g_KL (log p - log q - KL)) + g_l e_y
        factor = torch.zeros_like(log_p)
        if g_l is not None:
            factor.sub_(g_l)
        if g_h is not None:
            factor.sub_((log_p + stats.entropy[:, None]).mul_(g_h))
        if g_kl is not None:
            factor.add_((log_p - logits[n:]).sub_(stats.kl[:, None]).mul_(g_kl))
        dz = factor.mul_(p)
        _add_at_tokens(dz, tokens, grads.logprobs)
    if grads.masked:
        # dz~ = q * (-g_l~ - g_H~ (log q + H~) + g_KL) - g_KL p + g_l~ e_y, formed in log q's place
        log_q = logits[n:]
        q = log_q.exp()
        factor = log_q
        if g_h_masked is not None:
            factor.add_(stats.entropy_masked[:, None]).mul_(-g_h_masked)
        else:
            factor.zero_()
        if g_l_masked is not None:
            factor.sub_(g_l_masked)
        if g_kl is not None:
            factor.add_(g_kl)
        dz_masked = factor.mul_(q)
        if g_kl is not None:
            dz_masked.addcmul_(p, g_kl, value=-1.0)
        _add_at_tokens(dz_masked, tokens, grads.logprobs_masked)
        out[n:].copy_(dz_masked.div_(temperature))
    if dz is not None:
        out[:n].copy_(dz.div_(temperature))
