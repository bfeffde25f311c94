"""Bounded memory of the torch backend, measured as the growth of the peak resident set in a fresh process.

The child process resets its peak RSS (``/proc/self/clear_refs``, Linux), runs forward and
backward of both passes at a size where one pass's full logits take more than 1 GiB, and
reports how far the peak (VmHWM) rose above the resident set before the call. The control
runs the materialising reference at a smaller size and must show its logits (log-softmax,
probabilities and their gradients, for both passes).
"""

import json
import subprocess
import sys
import textwrap

import pytest

MIB = 2**20

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from papo_kernels import papo_loss
    from papo_kernels.backends import reference, torch_chunked

    def fast_path(hidden, hidden_masked, weight, tokens, bias, temperature):
        # papo_loss's fast path with both passes, exact KL and entropies: one scalar, gradient inside the forward
        loss, _ = papo_loss(hidden[None], weight, tokens[None], torch.ones_like(tokens[None]), torch.ones(1),
                            hidden_masked=hidden_masked[None], bias=bias, temperature=temperature,
                            perception_kl="exact", path="fast", backend="torch")
        return (loss,)

    def fast_path_one_pass(hidden, hidden_masked, weight, tokens, bias, temperature):
        # one pass, the masked log-probs given: the clean entropy's gradient and k3's make the torch epilogue's
        # largest set of (C, V) temporaries
        masked_logprobs = -torch.rand(1, tokens.numel(), generator=torch.Generator().manual_seed(1))
        loss, _ = papo_loss(hidden[None], weight, tokens[None], torch.ones_like(tokens[None]), torch.ones(1),
                            masked_logprobs=masked_logprobs, bias=bias, temperature=temperature, path="fast",
                            backend="torch")
        return (loss,)

    op = {"torch": torch_chunked.linear_perception_kl, "reference": reference.linear_perception_kl,
          "fast": fast_path, "fast_one_pass": fast_path_one_pass}[sys.argv[1]]
    n, v, d = map(int, sys.argv[2:5])
    torch.set_num_threads(2)

    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    def run(n, v):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, d, generator=gen).requires_grad_()
        hidden_masked = (hidden.detach() + torch.randn(n, d, generator=gen)).requires_grad_()
        weight = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
        bias = torch.randn(v, generator=gen).requires_grad_()
        tokens = torch.randint(0, v, (n,), generator=gen)
        upstream = [torch.randn(n, generator=gen) for _ in range(5)]
        inputs = (hidden, hidden_masked, weight, bias)
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
        outputs = op(hidden, hidden_masked, weight, tokens, bias, 1.0)
        torch.autograd.backward(outputs, [g[:out.numel()].reshape(out.shape) for g, out in zip(upstream, outputs)])
        peak = kib("VmHWM")
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs if t.grad is not None)
        return (peak - before) * 1024, grad_bytes

    run(64, 1000)  # warm up: first-call allocations of the libraries
    growth, grad_bytes = run(n, v)
    print(json.dumps({"growth": growth, "grad_bytes": grad_bytes}))
""")


def peak_growth(backend: str, n: int, v: int, d: int):
    result = subprocess.run([sys.executable, "-c", CHILD, backend, str(n), str(v), str(d)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["growth"], report["grad_bytes"]


@pytest.fixture(scope="module")
def linux_proc():
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        pytest.fail(f"peak-RSS reset through /proc/self/clear_refs is unavailable: {error}")


def test_torch_backend_peak_memory_is_bounded(linux_proc):
    n, v, d = 2048, 140_000, 32
    logits_bytes = n * v * 4
    assert logits_bytes > 2**30  # one pass's float32 logits alone would exceed 1 GiB
    growth, grad_bytes = peak_growth("torch", n, v, d)
    # the gradients are outputs, not temporaries; everything else must fit in 256 MiB
    assert growth - grad_bytes < 256 * MIB, (
        f"peak grew by {growth / MIB:.0f} MiB ({grad_bytes / MIB:.0f} MiB of it gradients); "
        f"one pass's logits are {logits_bytes / MIB:.0f} MiB"
    )


@pytest.mark.parametrize("op, passes", [("fast", 2), ("fast_one_pass", 1)])
def test_fast_path_peak_memory_is_bounded(linux_proc, op, passes):
    """The fast path keeps its logits chunk and the epilogue's temporaries in the 256 MiB workspace; for a float32
    weight its float32 dW accumulator is the gradient itself. Besides, papo_loss gathers the unmasked rows of
    each pass's hidden states (a copy of their size)."""
    n, v, d = 2048, 140_000, 32
    assert n * v * 4 > 2**30
    growth, grad_bytes = peak_growth(op, n, v, d)
    gathered_rows = passes * n * d * 4
    assert growth - grad_bytes < 256 * MIB + gathered_rows, (
        f"peak grew by {growth / MIB:.1f} MiB ({grad_bytes / MIB:.1f} MiB of it gradients)"
    )


def test_probe_sees_materialised_logits(linux_proc):
    """Control: the same probe on the reference, whose logits take 128 MiB a pass, must report more than 256 MiB."""
    n, v, d = 512, 65_536, 32
    growth, grad_bytes = peak_growth("reference", n, v, d)
    assert growth - grad_bytes > 256 * MIB, f"the probe saw only {growth / MIB:.0f} MiB of growth"
