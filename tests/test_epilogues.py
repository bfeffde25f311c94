"""Every epilogue of the fast path (Triton, native) against the torch epilogue, on the contract of ``contract.py``.

A chunk of raw logits goes in; per-token statistics, then the gradient with respect to the
logits, come out. Shapes are awkward on purpose (V not a multiple of any block, one row,
tokens at the first and the last id), with and without bias, at two temperatures, paired
or one pass, and with each upstream gradient present or absent.
"""

import pytest
import torch

from papo_kernels.fast_path.epilogues import resolve_epilogue, torch_epilogue
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients

from backend_cases import assert_within_budget, triton_device

SHAPES = [(1, 37), (5, 203), (9, 64)]  # (tokens C, vocabulary V)
# each upstream gradient alone, the pairs that couple the passes, and all of them
GRADIENT_SUBSETS = [(name,) for name in UpstreamGradients._fields] + [
    ("logprobs", "logprobs_masked"), ("entropy", "kl"), ("entropy_masked", "kl"), UpstreamGradients._fields]


def make_chunk(n: int, v: int, paired: bool, bias: bool, seed: int, dtype: torch.dtype):
    """float64 tensors holding values exactly representable in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn((2 if paired else 1) * n, v, generator=g, dtype=torch.float64)
    if paired:  # the masked rows near the clean ones, as a masked image gives
        logits[n:] = logits[:n] + 0.8 * torch.randn(n, v, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[0], tokens[-1] = 0, v - 1
    grads = {name: torch.randn(n, generator=g, dtype=torch.float64) for name in UpstreamGradients._fields}
    bias_vector = torch.randn(v, generator=g, dtype=torch.float64) if bias else None

    def rounded(value):
        return None if value is None else value.to(dtype).double()

    return rounded(logits), tokens, rounded(bias_vector), {name: rounded(value) for name, value in grads.items()}


def run_epilogue(epilogue, logits, tokens, bias, temperature, paired, grads, present):
    logits = logits.clone()
    stats = epilogue.statistics(logits, tokens, bias, temperature, paired)
    upstream = UpstreamGradients(*(grads[name] if name in present and (paired or not name.endswith(("masked", "kl")))
                                   else None for name in UpstreamGradients._fields))
    out = torch.full_like(logits, float("nan"))
    epilogue.logit_gradient(logits, tokens, bias, temperature, stats, upstream, out)
    n = tokens.shape[0]
    rows = ([slice(0, n)] if upstream.clean else []) + ([slice(n, 2 * n)] if paired and upstream.masked else [])
    return stats, torch.cat([out[r] for r in rows]) if rows else None


def epilogue_cases():
    return [(shape, paired, bias, temperature)
            for shape in SHAPES for paired in (True, False) for bias, temperature in ((True, 0.6), (False, 1.0))]


def check_against_torch_epilogue(epilogue, device, shape, paired, bias, temperature, dtype):
    """The error-budget rule: against the float64 torch epilogue on the same rounded inputs, the epilogue's error
    is at most 4x the torch epilogue's own error at ``dtype`` plus a few float32 ulps of the values' scale."""
    n, v = shape
    logits, tokens, bias_vector, grads = make_chunk(n, v, paired, bias, seed=n + v, dtype=dtype)

    def on(device_, dtype_):
        return dict(logits=logits.to(device_, dtype_), tokens=tokens.to(device_),
                    bias=None if bias_vector is None else bias_vector.to(device_, dtype_),
                    grads={name: value.to(device_, dtype_) for name, value in grads.items()})

    def run_on(module, inputs, present):
        return run_epilogue(module, inputs["logits"], inputs["tokens"], inputs["bias"], temperature, paired,
                            inputs["grads"], present)

    for present in GRADIENT_SUBSETS:
        truth = run_on(torch_epilogue, on("cpu", torch.float64), present)
        same_dtype = run_on(torch_epilogue, on("cpu", dtype), present)
        kernel = run_on(epilogue, on(device, dtype), present)
        for name, value in truth[0]._asdict().items():
            if value is not None:
                assert_within_budget(name, getattr(kernel[0], name).cpu().double(),
                                     getattr(same_dtype[0], name).double(), value, factor=4.0, atol=4e-7)
        if truth[1] is not None:
            assert_within_budget(f"dz with {present}", kernel[1].cpu().double(), same_dtype[1].double(), truth[1],
                                 factor=4.0, atol=4e-7)


# every epilogue but the torch one, on the device it runs on
EPILOGUE_DEVICES = {"triton": triton_device, "native": lambda: torch.device("cpu")}


@pytest.mark.parametrize("name", EPILOGUE_DEVICES)
@pytest.mark.parametrize("shape, paired, bias, temperature", epilogue_cases(), ids=str)
def test_epilogue_matches_the_torch_epilogue(name, shape, paired, bias, temperature):
    """float32 Triton (interpreted on CPU) and native C++ against the torch epilogue."""
    device = EPILOGUE_DEVICES[name]()
    epilogue = resolve_epilogue(name, device, torch.float32)
    assert epilogue.NAME == name, f"backend={name!r} resolved to the {epilogue.NAME} epilogue"
    check_against_torch_epilogue(epilogue, device, shape, paired, bias, temperature, torch.float32)
