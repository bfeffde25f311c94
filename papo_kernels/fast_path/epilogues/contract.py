"""The contract every epilogue of the fast path keeps (Triton on CUDA, native C++ on CPU, plain torch anywhere).

The chunk loop hands an epilogue one chunk of raw logits ``logits = rows @ W^T``
(float32, or float64 for float64 inputs), of shape (R, V): R = C rows of the clean
pass, followed by, when ``paired``, the C rows of the masked pass for the same tokens.
With z = (logits + b) / tau, p = softmax(z) per clean row and q = softmax(z~) per
masked row (shared PAPO_SPEC.md):

1. ``statistics(logits, tokens, bias, temperature, paired) -> RowStatistics``: per
   token, lse = logsumexp(z), l = z_y - lse, H = -sum p log p, and when paired the same
   of z~ and KL(p || q) = sum p (log p - log q). It may rewrite ``logits`` into a state
   of its own that only its ``logit_gradient`` reads.
2. ``logit_gradient(logits, tokens, bias, temperature, stats, grads, out)``: with the
   per-token upstream gradients g of the loss with respect to l, H, l~, H~ and KL (None
   where absent, i.e. zero), writes into ``out`` (R, V) the gradient with respect to the
   raw logits, dz / tau, where (the gradient table of PAPO_SPEC.md)

       dz  = g_l (e_y - p) - g_H p (log p + H) + g_KL p (log p - log q - KL)
       dz~ = g_l~ (e_y - q) - g_H~ q (log q + H~) + g_KL (q - p)

   ``out`` is ``logits`` itself, or a buffer in the inputs' half dtype for the
   products that follow. The rows of a pass whose gradients are all None are left
   unspecified: the chunk loop does not read them.

``workspace_bytes_per_token(vocab_size, paired, itemsize)`` tells the chunk loop how
many bytes of temporaries the epilogue needs per token besides the logits.

A vocabulary-parallel head (``papo_kernels/vocab_parallel.py``) splits step 1 in two around an
all-reduce across the ranks, each of which holds a block of the vocabulary's columns:

1a. ``row_partials(logits, tokens, bias, temperature, paired) -> Tensor``: per token the partial
    state over the chunk's columns, a (fields, C) tensor in the logits' dtype laid out as
    ``papo_kernels.partials.FIELDS`` (maxima, sums of exponentials, entropy sums, the token's logit, the KL's
    difference sum). It leaves ``logits`` in the same state as ``statistics`` does;
1b. the ranks all-reduce the partials (``vocab_parallel.all_reduce_partials``) and
    ``partials.finalize``, one torch function for every epilogue, gives the RowStatistics of the
    whole vocabulary, which step 2 takes on the rank's own columns.

Tokens not in the chunk's columns: ``row_partials`` and ``logit_gradient`` take ids local to
the chunk's columns, with ``NOT_HERE`` (-1) for a token that another rank holds: its logit is
then 0 in the partials (the owner's sum gives it) and ``logit_gradient`` leaves out its e_y
term. ``statistics`` takes ids in [0, V).
"""

from typing import NamedTuple, Optional

from torch import Tensor

from ...partials import NOT_HERE


class RowStatistics(NamedTuple):
    """Per-token statistics of a chunk, each (C,) in the logits' dtype; the masked ones None when not paired."""

    logprobs: Tensor
    entropy: Tensor
    lse: Tensor
    logprobs_masked: Optional[Tensor] = None
    entropy_masked: Optional[Tensor] = None
    lse_masked: Optional[Tensor] = None
    kl: Optional[Tensor] = None


class UpstreamGradients(NamedTuple):
    """Per-token gradients of the loss with respect to the statistics, each (C,) or None (zero)."""

    logprobs: Optional[Tensor]
    entropy: Optional[Tensor]
    logprobs_masked: Optional[Tensor] = None
    entropy_masked: Optional[Tensor] = None
    kl: Optional[Tensor] = None

    @property
    def clean(self) -> bool:
        """Whether the clean rows get a gradient."""
        return any(g is not None for g in (self.logprobs, self.entropy, self.kl))

    @property
    def masked(self) -> bool:
        """Whether the masked rows get a gradient."""
        return any(g is not None for g in (self.logprobs_masked, self.entropy_masked, self.kl))
