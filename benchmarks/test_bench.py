"""Throughput of linear_logprobs, linear_perception_kl and papo_loss per backend, forward, backward and full,
and of papo_loss's fast path per epilogue (full mode: its forward computes the gradient).

    pytest benchmarks/ --benchmark-only

Shapes: on a GPU, bf16 with the Qwen2.5-VL-7B head (D = 3584, V = 152064) and N = 4096;
on CPU, fp32 at N = 256, D = 256, V = 4096, and the Triton backend only at N = 16, D = 32,
V = 256 under TRITON_INTERPRET=1 (an interpreter: its times are not kernel speeds).
``PAPO_BENCH_SHAPE=N,D,V`` overrides the shape for every backend, and
``PAPO_BENCH_DISTRIBUTION=spread|peaked`` the logit distribution (spread by default). The
inputs come from the same setup as the sweep runner (benchmarks/implementations.py); each
result's ``extra_info`` holds the shape, the FLOP floor and the TFLOP/s at the median. The
per-token backends run papo_loss with ``path="per_token"``; the fast path is its own test.
"""

import os

import pytest
import torch

import papo_kernels
from papo_kernels.fast_path import EPILOGUES

from .distributions import DISTRIBUTIONS
from .flops import lm_head_flops
from .implementations import MODES, OPS, Shape, backward, epilogue_unavailable, fast_path_builder, make_inputs
from .implementations import package_builder

BACKENDS = [name for name in papo_kernels.BACKENDS if name != "auto"]
FAST_EPILOGUES = [name for name in EPILOGUES if name != "auto"]
GPU_SHAPE, CPU_SHAPE, INTERPRETER_SHAPE = Shape(4096, 3584, 152064), Shape(256, 256, 4096), Shape(16, 32, 256)
ROUNDS = {"cuda": 10, "cpu": 5, "interpreter": 2}


def parse_shape(text: str) -> Shape:
    try:
        n, d, v = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"PAPO_BENCH_SHAPE must be three integers N,D,V, got {text!r}") from None
    return Shape(n, d, v)


def distribution() -> str:
    chosen = os.environ.get("PAPO_BENCH_DISTRIBUTION", "spread")
    if chosen not in DISTRIBUTIONS:
        raise ValueError(f"PAPO_BENCH_DISTRIBUTION must be one of {list(DISTRIBUTIONS)}, got {chosen!r}")
    return chosen


def case(backend: str):
    """(shape, dtype, device, rounds) of one backend's (or epilogue's) benchmarks on this machine."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = device.type == "cpu" and backend == "triton"
    if "PAPO_BENCH_SHAPE" in os.environ:
        shape = parse_shape(os.environ["PAPO_BENCH_SHAPE"])
    else:
        shape = GPU_SHAPE if device.type == "cuda" else INTERPRETER_SHAPE if interpreted else CPU_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return shape, dtype, device, ROUNDS["interpreter" if interpreted else device.type]


def synchronized(device: torch.device):
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return synchronize


@pytest.mark.parametrize("epilogue", FAST_EPILOGUES)
def test_fast_path_throughput(benchmark, epilogue):
    """papo_loss on its fast path, forward + backward (12 NDV)."""
    shape, dtype, device, rounds = case(epilogue)
    reason = epilogue_unavailable(epilogue, device, dtype)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(shape, dtype, device, distribution=distribution())
    forward = fast_path_builder(epilogue)("papo_loss", inputs)
    synchronize = synchronized(device)

    def run_full():
        backward("papo_loss", inputs, forward())
        synchronize()

    def fresh():
        inputs.zero_grad()
        return (), {}

    benchmark.pedantic(run_full, setup=fresh, rounds=rounds, warmup_rounds=1)
    record(benchmark, "papo_loss", "full", shape, dtype, device, epilogue, inputs.description)


def record(benchmark, op, mode, shape, dtype, device, name, description) -> None:
    flop_floor = lm_head_flops(op, mode, shape.n, shape.d, shape.v)
    benchmark.extra_info.update(
        N=shape.n, D=shape.d, V=shape.v, dtype=str(dtype).removeprefix("torch."), device=device.type,
        interpreted=device.type == "cpu" and name == "triton", flop_floor=flop_floor, inputs=description,
    )
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["tflops_at_median"] = flop_floor / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_throughput(benchmark, backend, op, mode):
    shape, dtype, device, rounds = case(backend)
    inputs = make_inputs(shape, dtype, device, distribution=distribution())
    forward = package_builder(backend)(op, inputs)

    synchronize = synchronized(device)

    def run_forward():
        outputs = forward()
        synchronize()
        return outputs

    def run_backward(outputs):
        backward(op, inputs, outputs)
        synchronize()

    def run_full():
        run_backward(forward())

    def fresh_forward():
        inputs.zero_grad()
        return (run_forward(),), {}

    def fresh():
        inputs.zero_grad()
        return (), {}

    if mode == "forward":
        benchmark.pedantic(run_forward, setup=fresh, rounds=rounds, warmup_rounds=1)
    elif mode == "backward":
        benchmark.pedantic(run_backward, setup=fresh_forward, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(run_full, setup=fresh, rounds=rounds, warmup_rounds=1)

    record(benchmark, op, mode, shape, dtype, device, backend, inputs.description)
