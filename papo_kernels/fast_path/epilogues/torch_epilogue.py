"""The torch epilogue: the fast path's per-row work in plain PyTorch ops; runs anywhere.

It is the second opinion the tests hold the Triton and native epilogues to, and the
fallback where neither is available. ``statistics`` and ``row_partials`` leave the logits
chunk holding z = (logits + b) / tau in place; ``logit_gradient`` turns it into log p (and
log q) in place with the statistics' lse. Besides the logits it holds up to three (C, V)
temporaries at once, paired or not (log q, then log p and p in ``statistics``; the
exponentials and the shifted logits of ``row_partials``; p, the factor and one term of it
in ``logit_gradient``).
"""

from typing import Optional

import torch
from torch import Tensor

from .contract import NOT_HERE, RowStatistics, UpstreamGradients

NAME = "torch"


def workspace_bytes_per_token(vocab_size: int, paired: bool, itemsize: int) -> int:
    return 3 * vocab_size * itemsize


def _scaled_(logits: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """z = (logits + b) / tau, in place."""
    if bias is not None:
        logits.add_(bias.to(logits.dtype))
    return logits.div_(temperature)


def _at_tokens(values: Tensor, tokens: Tensor) -> Tensor:
    """values[i, y_i], and 0 where y_i is NOT_HERE."""
    picked = values.gather(1, tokens.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(tokens != NOT_HERE, picked, 0.0)


def statistics(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
               paired: bool) -> RowStatistics:
    z = _scaled_(logits, bias, temperature)
    n = tokens.shape[0]
    lse = torch.logsumexp(z[:n], dim=1)
    if paired:
        lse_masked = torch.logsumexp(z[n:], dim=1)
        log_q = z[n:] - lse_masked[:, None]
        logprobs_masked = _at_tokens(log_q, tokens)
        entropy_masked = -log_q.exp().mul_(log_q).sum(1)  # H~ = -sum q log q
    log_p = z[:n] - lse[:, None]
    logprobs = _at_tokens(log_p, tokens)
    p = log_p.exp()
    # the products go in place of a factor no longer needed: no (C, V) temporary beyond log q, log p and p
    if paired:
        difference = log_q.sub_(log_p).neg_()  # log p - log q, exactly as rounded by a - b
        kl = difference.mul_(p).sum(1)  # KL(p || q) = sum p (log p - log q)
    entropy = -log_p.mul_(p).sum(1)  # H = -sum p log p
    if not paired:
        return RowStatistics(logprobs, entropy, lse)
    return RowStatistics(logprobs, entropy, lse, logprobs_masked, entropy_masked, lse_masked, kl)


def _pass_partials(z: Tensor, tokens: Tensor):
    """(m, s, t, z_y) of one pass's rows (``partials.FIELDS``) and the rows' exponentials e^(z - m)."""
    running_max = z.amax(1)
    shifted = z - running_max[:, None]
    exps = shifted.exp()
    shifted_sum = shifted.mul_(exps).sum(1)  # t = sum e^(z - m) (z - m)
    return [running_max, exps.sum(1), shifted_sum, _at_tokens(z, tokens)], exps


def row_partials(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                 paired: bool) -> Tensor:
    z = _scaled_(logits, bias, temperature)
    n = tokens.shape[0]
    fields, exps = _pass_partials(z[:n], tokens)
    if paired:
        masked_fields, _ = _pass_partials(z[n:], tokens)
        fields += masked_fields + [(z[:n] - z[n:]).mul_(exps).sum(1)]  # w = sum e^(z - m) (z - z~)
    return torch.stack(fields)


def _column(value: Optional[Tensor]) -> Optional[Tensor]:
    return None if value is None else value[:, None]


def _add_at_tokens(dz: Tensor, tokens: Tensor, values: Optional[Tensor]) -> None:
    """dz[i, y_i] += values[i]: the e_y part of d l / dz (none where y_i is NOT_HERE)."""
    if values is not None:
        here = torch.where(tokens != NOT_HERE, values.to(dz.dtype), 0.0)
        dz.scatter_add_(1, tokens.clamp(min=0)[:, None], here[:, None])


def logit_gradient(logits: Tensor, tokens: Tensor, bias: Optional[Tensor], temperature: float,
                   stats: RowStatistics, grads: UpstreamGradients, out: Tensor) -> None:
    n = tokens.shape[0]
    log_p = logits[:n].sub_(stats.lse[:, None])  # log p = z - lse, in place
    if logits.shape[0] > n:
        logits[n:].sub_(stats.lse_masked[:, None])
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
