"""Shared helpers of the backend tests: inputs, running an op with chosen upstream gradients, comparisons.

Every comparison names the worst index and the values there when it fails.
"""

import functools
from typing import Dict, Optional, Sequence, Set

import torch

from papo_kernels.backends import head_chunks, reference, resolve_backend, torch_chunked

PAIRED_OUTPUTS = ("logprobs", "logprobs_masked", "entropy", "entropy_masked", "kl")
SINGLE_OUTPUTS = ("logprobs", "entropy")
OUTPUTS = {"perception_kl": PAIRED_OUTPUTS, "logprobs": SINGLE_OUTPUTS}
PAIRED_INPUTS = ("hidden", "hidden_masked", "weight", "bias")
SINGLE_INPUTS = ("hidden", "weight", "bias")
INPUTS = {"perception_kl": PAIRED_INPUTS, "logprobs": SINGLE_INPUTS}

# A temporaries budget that splits test shapes into many row and vocabulary chunks, with tails.
SMALL_TEMPORARY_BYTES = 64 * 1024


def triton_device() -> torch.device:
    """CUDA when present; else the CPU, where conftest.py has put Triton in interpreter mode."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(n: int, v: int, d: int, *, bias: bool, seed: int = 0, logit_std: float = 2.0,
                masked_noise: float = 0.7) -> Dict[str, Optional[torch.Tensor]]:
    """float64 inputs whose logits have about ``logit_std`` spread; cast them with ``cast``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return {
        "hidden": hidden,
        "hidden_masked": hidden + masked_noise * torch.randn(n, d, generator=gen, dtype=torch.float64),
        "weight": torch.randn(v, d, generator=gen, dtype=torch.float64) * (logit_std / d**0.5),
        "bias": torch.randn(v, generator=gen, dtype=torch.float64) if bias else None,
        "tokens": torch.randint(0, v, (n,), generator=gen),
    }


def cast(inputs, dtype: torch.dtype, device=None):
    """Float inputs to ``dtype`` (and ``device``); tokens stay int64."""
    return {name: None if t is None else t.to(device=device, dtype=t.dtype if name == "tokens" else dtype)
            for name, t in inputs.items()}


def upstream_gradients(n: int, op: str, names: Sequence[str], seed: int = 1) -> Dict[str, torch.Tensor]:
    """Random float64 upstream gradients for the outputs in ``names``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=gen, dtype=torch.float64) for name in OUTPUTS[op] if name in names}


@functools.lru_cache(maxsize=None)
def backend_functions(backend: str, temporary_bytes: int = SMALL_TEMPORARY_BYTES):
    """(linear_logprobs, linear_perception_kl) of a backend, on flattened inputs."""
    if backend == "reference":
        return reference.linear_logprobs, reference.linear_perception_kl
    if backend == "torch":
        return (functools.partial(torch_chunked.linear_logprobs, temporary_bytes=temporary_bytes),
                functools.partial(torch_chunked.linear_perception_kl, temporary_bytes=temporary_bytes))
    if backend == "head_chunks":  # the torch backend's design on CUDA (library products, torch epilogue), anywhere

        def options(temperature):
            return head_chunks.head_options(head_chunks.TORCH_HEAD, temperature, temporary_bytes)

        return (lambda h, w, t, b, tau: head_chunks.linear_logprobs(h, w, t, b, options(tau)),
                lambda h, hm, w, t, b, tau: head_chunks.linear_perception_kl(h, hm, w, t, b, options(tau)))
    module = resolve_backend(backend, triton_device(), torch.float32)
    return module.linear_logprobs, module.linear_perception_kl


def run_op(backend: str, op: str, inputs, temperature: float, upstream: Dict[str, torch.Tensor],
           requires_grad: Optional[Set[str]] = None, temporary_bytes: int = SMALL_TEMPORARY_BYTES):
    """Run ``op`` on fresh leaves, back-propagate ``upstream`` (output name -> gradient; the other
    outputs get none) and return ({output: value}, {input: .grad}) in float64 on the CPU."""
    requires_grad = set(INPUTS[op]) if requires_grad is None else requires_grad
    leaves = {name: t.detach().clone().requires_grad_(name in requires_grad)
              for name, t in inputs.items() if t is not None and name != "tokens"}
    single, paired = backend_functions(backend, temporary_bytes)
    if op == "logprobs":
        outputs = single(leaves["hidden"], leaves["weight"], inputs["tokens"], leaves.get("bias"), temperature)
    else:
        outputs = paired(leaves["hidden"], leaves["hidden_masked"], leaves["weight"], inputs["tokens"],
                         leaves.get("bias"), temperature)
    named = dict(zip(OUTPUTS[op], outputs))
    # an output that depends on no input wanting a gradient (the reference's logprobs_masked when only
    # hidden does, say) takes no upstream gradient
    chosen = [(named[name], grad.to(named[name])) for name, grad in upstream.items() if named[name].requires_grad]
    if chosen:
        torch.autograd.backward(*zip(*chosen))
    values = {name: out.detach().cpu().double() for name, out in named.items()}
    grads = {name: None if leaf.grad is None else leaf.grad.cpu().double()
             for name, leaf in leaves.items() if name in INPUTS[op]}
    return values, grads


def _worst(error: torch.Tensor):
    """(index, value) of the largest entry, NaN counting as the largest."""
    if error.numel() == 0:
        return (), float("-inf")
    error = torch.nan_to_num(error, nan=float("inf"))
    flat = int(error.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), error.shape))
    return index, float(error.reshape(-1)[flat])


def assert_close(name: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], *, rtol: float,
                 atol: float) -> None:
    """|actual - expected| <= atol + rtol |expected| everywhere; both None is a match."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: got {actual is not None and 'a tensor'} " \
                                                    f"where the reference has {expected}"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    index, worst = _worst(excess)
    if worst > 0:
        raise AssertionError(
            f"{name}: worst mismatch at index {index}: got {float(actual[index]):.10g}, "
            f"expected {float(expected[index]):.10g} (rtol {rtol}, atol {atol})")


def assert_within_budget(name: str, kernel: Optional[torch.Tensor], same_dtype: Optional[torch.Tensor],
                         truth: Optional[torch.Tensor], *, factor: float, atol: float,
                         scale_to_truth: bool = False) -> float:
    """The error-budget rule: max |kernel - truth| <= factor * max |same_dtype - truth| + atol * scale.

    ``same_dtype`` is the reference run at the kernel's dtype. ``scale`` is max(1, max |truth|): values are
    built from log-probs of O(1), whatever their own size (a KL of 0.01 is a difference of two of them). With
    ``scale_to_truth`` it is max |truth| itself, for papo_loss's gradients: they carry the normaliser's 1/N, and
    a scale of 1 would let an atol of 1.6e-2 pass anything. Returns the ratio of the two errors.
    """
    if kernel is None or truth is None:
        assert kernel is None and truth is None, f"{name}: gradient presence differs from the reference"
        return 0.0
    largest = float(truth.abs().max()) if truth.numel() else 0.0
    scale = largest if scale_to_truth and largest > 0 else max(1.0, largest)
    kernel_error = (kernel - truth).abs()
    torch_error = float((same_dtype - truth).abs().max()) if truth.numel() else 0.0
    index, worst = _worst(kernel_error)
    bound = factor * torch_error + atol * scale
    if worst > bound:
        raise AssertionError(
            f"{name}: worst error {worst:.3g} at index {index}: kernel {float(kernel[index]):.10g}, "
            f"float64 truth {float(truth[index]):.10g}, same-dtype torch {float(same_dtype[index]):.10g}; "
            f"bound {factor} x {torch_error:.3g} + {atol} x {scale:.3g} = {bound:.3g}")
    return worst / max(torch_error, 1e-300)
