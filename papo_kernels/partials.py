"""Per-row partial statistics over part of the vocabulary, how two parts merge, and the statistics they give.

A part of the vocabulary (a rank's shard of the head; a Triton vocabulary split) gives per token, for
each pass with z = (logits + b) / tau over the part's columns (shared PAPO_SPEC.md):

    m = max z,   s = sum e^(z - m),   t = sum e^(z - m) (z - m),   z_y = the token's logit (0 where the part
    does not hold the token),

and for a clean/masked pair the difference sum w = sum e^(z - m) (z - z~), which carries the clean pass's
weights. Parts over disjoint columns merge exactly: with M = max of the parts' m and a = e^(m - M),

    S = sum a s,   T = sum a (t + (m - M) s),   W = sum a w,   Z_y = sum z_y

(the same for the masked pass with its own M~), so the maxima travel once through a max and everything
else through one sum: a vocabulary split across ranks all-reduces the maxima, then the rescaled sums
(``vocab_parallel.py``). From the merged state (``finalize``):

    lse = M + log S,   l = (Z_y - M) - log S,   H = log S - T / S,
    KL(p || q) = W / S - (M - M~) - (log S - log S~),

formed in float64 for float32 partials. The differences z - z~ are summed column by column (W), so no two
large numbers cancel where the passes are close. As in the native epilogue (``csrc/papo_epilogue.h``),
H and KL are returned for lse and lse~ as rounded to the partials' dtype (plus r = round(lse) - lse, and
minus r, plus r~), so that log p + H and log p - log q - KL in the gradient sweeps cancel exactly.

The partials are one tensor of shape (fields, ..., C), the fields of ``FIELDS`` in that order (the first
``SINGLE_PASS_FIELDS`` for one pass). Ids local to a part take ``NOT_HERE`` for a token that another
part holds. The fast path's epilogues make partials of a logits chunk (``row_partials``,
``fast_path/epilogues/contract.py``), the torch backend of the LM-head ops of its running state.
"""

from typing import Tuple

import torch
from torch import Tensor

NOT_HERE = -1  # the id of a token whose column another part holds (in a part's local ids)
FIELDS = ("max", "exp_sum", "shifted_sum", "token_logit",
          "max_masked", "exp_sum_masked", "shifted_sum_masked", "token_logit_masked", "difference_sum")
SINGLE_PASS_FIELDS = 4
MASKED = 4  # the masked pass's fields start here


def field_count(paired: bool) -> int:
    return len(FIELDS) if paired else SINGLE_PASS_FIELDS


def max_fields(paired: bool) -> list:
    """Indices of the running maxima (merged by a max)."""
    return [0, MASKED] if paired else [0]


def sum_fields(paired: bool) -> list:
    """Indices of the fields merged by a sum once rescaled (``rescaled_sums``), in ``FIELDS`` order."""
    return [1, 2, 3, 5, 6, 7, 8] if paired else [1, 2, 3]


def _rescaled_pass(partials: Tensor, first: int, new_max: Tensor):
    """(a, [s', t', z_y']) of the pass whose fields start at ``first``, relative to ``new_max``."""
    running_max, exp_sum, shifted_sum, token_logit = partials[first:first + SINGLE_PASS_FIELDS]
    shift = running_max - new_max
    scale = torch.exp(shift)
    return scale, [scale * exp_sum, scale * (shifted_sum + shift * exp_sum), token_logit]


def rescaled_sums(partials: Tensor, maxima: Tensor) -> Tensor:
    """The sum fields of ``partials`` (``sum_fields`` order) relative to new maxima ``maxima`` (one per pass,
    broadcastable against a field): s' = a s, t' = a (t + (m - M) s), z_y' = z_y, w' = a w, a = e^(m - M)."""
    scale, sums = _rescaled_pass(partials, 0, maxima[0])
    if partials.shape[0] == len(FIELDS):
        _, masked_sums = _rescaled_pass(partials, MASKED, maxima[1])
        sums += masked_sums + [scale * partials[8]]
    return torch.stack(sums)


def joined(maxima: Tensor, sums: Tensor) -> Tensor:
    """The partials tensor of merged maxima and sums (the inverse of taking ``max_fields`` and ``sum_fields``)."""
    paired = maxima.shape[0] == 2
    partials = sums.new_empty((field_count(paired), *sums.shape[1:]))
    partials[max_fields(paired)] = maxima
    partials[sum_fields(paired)] = sums
    return partials


def merge(partials: Tensor, dim: int) -> Tensor:
    """The parts along ``dim`` (>= 1) of a (fields, ..., C) partials tensor merged into one."""
    paired = partials.shape[0] == len(FIELDS)
    maxima = partials[max_fields(paired)].amax(dim, keepdim=True)
    return joined(maxima.squeeze(dim), rescaled_sums(partials, maxima).sum(dim))


def finalize(partials: Tensor, paired: bool) -> Tuple[Tensor, ...]:
    """The per-token statistics from a merged (fields, C) partials tensor, in the order of the epilogues'
    ``RowStatistics``: (l, H, lse), and (l~, H~, lse~, KL) after them when ``paired``."""
    assert partials.shape[0] == field_count(paired)
    dtype = partials.dtype
    wide = partials.to(torch.float64)

    def pass_statistics(first: int):
        running_max, exp_sum, shifted_sum, token_logit = wide[first:first + SINGLE_PASS_FIELDS]
        log_sum = exp_sum.log()
        lse = running_max + log_sum
        lse_rounded = lse.to(dtype)
        rounding = lse_rounded.double() - lse
        entropy = log_sum - shifted_sum / exp_sum + rounding
        return (token_logit - running_max) - log_sum, entropy, lse_rounded, rounding, log_sum

    logprobs, entropy, lse, rounding, log_sum = pass_statistics(0)
    if not paired:
        return logprobs.to(dtype), entropy.to(dtype), lse
    logprobs_masked, entropy_masked, lse_masked, rounding_masked, log_sum_masked = pass_statistics(MASKED)
    kl = wide[8] / wide[1] - (wide[0] - wide[MASKED]) - (log_sum - log_sum_masked) - rounding + rounding_masked
    return (logprobs.to(dtype), entropy.to(dtype), lse, logprobs_masked.to(dtype), entropy_masked.to(dtype), lse_masked,
            kl.to(dtype))
