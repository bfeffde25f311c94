"""Kernel-level measurements of the fast path's pieces (issue 23), as rows of the GPU check's stages part.

Each function times one piece alone at the headline head (V = 152064, D = 3584 on the GPU) and
hands its rows to ``record`` (``stages.StageRun.record``), so they land in ``stages.csv``:

- ``grad_weight_products``: the dW product alone, dW (+)= dZ^T R with K = 1024, 2048, 4096 rows
  (512 to 2048 tokens a chunk), by ``addmm`` into the float32 accumulator and by the reduce-add
  kernel (``papo_kernels/fast_path/triton_grad_weight.py``); the note gives their max relative
  difference (both accumulate float32 products of the same half inputs; only the order of the
  sums differs). The addmm fit of 2026-12-04: 0.975 ms of exposed read-modify-write a product
  plus the mainloop at 758 TFLOP/s.
- ``statistics_sweeps``: the Triton epilogue's statistics (partials, then finalize) at several
  tokens per chunk, with one vocabulary split (one program per token sweeping all of V: the
  schedule before the split) and with the split-V grid; the note gives the bandwidth reached on
  the bytes it must read (the float32 logits of both passes) against the measured copy bandwidth.
- ``logits_error``: the logits product as the fast path makes it on CUDA (half inputs, float32
  results through ``out_dtype``) and as float32 products of the upcast inputs, each against
  float64: the mean signed error, the mean error of |z| (a rounding toward zero shrinks every
  logit: a bias that does not average out over the tokens of the loss), the RMS error, and the
  mean entropy error they cause. A diagnostic of the loss rows of the correctness part.
- ``grad_weight_flag_in_the_loss``: papo_loss's weight gradient (the device's default epilogue)
  with dW by ``addmm`` and by the reduce-add kernel (each at its default workspace): their max
  difference beside one rounding of the returned dtype. The kernel inside the chunk loop
  (slices, the first chunk's store, alpha), not only alone.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import torch

import papo_kernels
from papo_kernels.fast_path.chunk_loop import MatrixProducts
from papo_kernels.fast_path.grad_weight import reduce_add_unavailable

from .implementations import PAPO_LOSS_CONFIG, TEMPERATURE, Inputs, Shape, grad_weight_flag

Record = Callable[..., None]  # StageRun.record


def _random(*size: int, device: torch.device, dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)


def grad_weight_products(shape: Shape, dtype: torch.dtype, device: torch.device, timer, record: Record,
                         k_rows: Sequence[int], ceilings) -> None:
    """``ceilings``: the device's matrix-product rate and copy bandwidth (``stages.Ceilings``), for the floors."""
    v, d = shape.v, shape.d
    weight = _random(v, d, device=device, dtype=dtype, scale=d ** -0.5, seed=1)
    reason = reduce_add_unavailable(device, dtype, v, d)
    kernels = {"addmm": MatrixProducts(weight, "addmm")}
    if reason is None:
        kernels["reduce-add"] = MatrixProducts(weight, "reduce_add")
    accumulator = torch.zeros(v, d, dtype=torch.float32, device=device)
    for k in k_rows:
        dz = _random(k, v, device=device, dtype=kernels["addmm"].input_dtype, scale=1e-4, seed=k)
        rows = _random(k, d, device=device, dtype=kernels["addmm"].input_dtype, scale=1.0, seed=k + 1)
        results = {}
        for name, products in kernels.items():
            results[name] = torch.empty_like(accumulator)
            products.accumulate_grad_weight(results[name], dz, rows, accumulate=False)
        difference = None
        if len(results) == 2:
            difference = float((results["reduce-add"] - results["addmm"]).abs().max()
                               / results["addmm"].abs().max())
        results = None
        flop_count = 2.0 * v * d * k
        byte_count = 8.0 * v * d + k * (v + d) * dz.element_size()  # the accumulator read and written, dZ, R
        for name, products in kernels.items():
            timing = timer(lambda: products.accumulate_grad_weight(accumulator, dz, rows))
            note = f"K = {k} rows" + ("" if difference is None else
                                      f"; max |reduce-add - addmm| / max |addmm| = {difference:.2g}")
            floors = (flop_count / (ceilings.matmul_tflops * 1e9), byte_count / (ceilings.copy_gb_per_s * 1e6))
            record(f"dW product, {name}", "-", None, k // 2, 1, timing, 0, floors=floors, note=note,
                   flop_count=flop_count)
        if reason is not None:
            record("dW product, reduce-add", "-", None, k // 2, 1, None, 0, note=f"K = {k} rows; skipped: {reason}")
        dz = rows = None


def statistics_sweeps(shape: Shape, device: torch.device, timer, record: Record, token_counts: Sequence[int],
                      copy_gb_per_s: float) -> None:
    from papo_kernels.backends._triton_utils import launch_config
    from papo_kernels.fast_path.epilogues import triton_epilogue

    config = launch_config(triton_epilogue.CONFIGS, device)
    one_split = dataclasses.replace(config, split_v=-(-shape.v // config.block_v) * config.block_v)
    for tokens in token_counts:
        logits = _random(2 * tokens, shape.v, device=device, dtype=torch.float32, scale=1.0, seed=tokens)
        token_ids = torch.randint(shape.v, (tokens,), device=device)
        byte_count = logits.numel() * logits.element_size()
        for label, chosen in (("one split", one_split), ("split V", config)):
            def sweep(chosen=chosen) -> None:
                partials = triton_epilogue.statistics_partials(logits, token_ids, None, 1.0, True, chosen)
                triton_epilogue.finalize_statistics(partials, True, chosen)

            timing = timer(sweep)
            reached = byte_count / (timing[0] * 1e6)
            record(f"statistics sweep, {label}", "triton", None, tokens, 1, timing, 0,
                   floors=(None, byte_count / (copy_gb_per_s * 1e6)),
                   note=f"vocabulary splits: {-(-shape.v // chosen.split_v)} of {chosen.split_v} columns; {reached:.0f} GB/s "
                        f"read = {reached / copy_gb_per_s:.2f} of the copy bandwidth")
        logits = token_ids = None


def _error_summary(logits: torch.Tensor, truth: torch.Tensor) -> str:
    error = logits.double() - truth
    scale = truth.abs().mean()
    signed = float(error.mean() / scale)
    magnitude = float((error * truth.sign()).mean() / scale)
    rms = float(error.pow(2).mean().sqrt() / scale)
    entropy_error = float((_entropy(logits.double()) - _entropy(truth)).mean())
    return (f"mean signed error {signed:.3g}, mean error of |z| {magnitude:.3g}, RMS {rms:.3g} (each of mean |z|); "
            f"mean entropy error {entropy_error:.3g} nats")


def _entropy(z: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(z, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def logits_error(hidden: torch.Tensor, weight: torch.Tensor, record: Record, rows: Optional[int] = None) -> None:
    """The logits of the first ``rows`` rows (all by default) as the fast path's product makes them and as upcast
    float32 products, against float64."""
    hidden = hidden.detach()[:rows]
    weight = weight.detach()
    truth = hidden.double() @ weight.double().T
    made = {"fast path product": MatrixProducts(weight).logits(hidden, out=torch.empty(
        hidden.shape[0], weight.shape[0], device=hidden.device)),
        "float32 product of upcast inputs": hidden.float() @ weight.float().T}
    for label, logits in made.items():
        record(f"logits error, {label}", "-", None, hidden.shape[0], 1, None, 0,
               note=_error_summary(logits, truth))


def grad_weight_flag_in_the_loss(x: Inputs, record: Record) -> None:
    """The weight gradient of papo_loss's fast path with dW by addmm and by the reduce-add kernel, compared."""
    reason = reduce_add_unavailable(x.weight.device, x.weight.dtype, *x.weight.shape)
    if reason is not None:
        record("dW kernel in the loss", "auto", None, None, None, None, 0, note=f"skipped: {reason}")
        return
    gradients = {}
    for kernel in ("addmm", "reduce_add"):
        x.zero_grad()
        with grad_weight_flag(kernel):
            loss, _ = papo_kernels.papo_loss(
                x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
                hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path="fast", **PAPO_LOSS_CONFIG)
        loss.backward()
        gradients[kernel] = x.weight.grad.float()
    x.zero_grad()
    want, got = gradients["addmm"], gradients["reduce_add"]
    difference = float((got - want).abs().max() / want.abs().max())
    # float32 sums in another order (and, with the flag's own workspace, other chunks) may round the returned
    # gradient to a neighbour: at most one rounding of its dtype, eps / 2 of the largest value
    rounding = torch.finfo(x.weight.dtype).eps / 2
    record("dW kernel in the loss", "auto", None, None, None, None, 0, dw="reduce_add",
           note=f"max |reduce-add - addmm| / max |addmm| = {difference:.3g} (one rounding of "
                f"{str(x.weight.dtype).removeprefix('torch.')}: {rounding:.3g})")
