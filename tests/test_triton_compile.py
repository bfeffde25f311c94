"""Every Triton kernel the package launches compiles for sm_80 and sm_90 within the GPU's limits, checked on the CPU.

1. Record (this process; conftest.py has put Triton in interpreter mode): the public entry points run over their
   option grid on tiny CPU tensors (``linear_logprobs`` and ``linear_perception_kl`` over the subsets of
   differentiated outputs and of inputs wanting a gradient, ``papo_loss`` over its terms and estimators on the fast
   path and at its presets on the per-token path, the fast path's logits function
   ``triton_logit_statistics.chunk_statistics``, and papo_loss's chunk loops with dW by the reduce-add kernel:
   ``PAPO_KERNELS_GRAD_WEIGHT=reduce_add``, resolved by the rules of ``fast_path/grad_weight.py`` for a CUDA device
   of the forced capability, so its TMA variant on sm_90 and ``addmm`` on sm_80), at two families of sizes (as at
   the Qwen heads: D, V and the row strides multiples of 16, an odd token count; and odd sizes throughout), with
   every launcher's config selection forced to a CUDA capability (``_triton_utils.forced_capability``). Each Triton
   launch is recorded, not run: the kernel, Triton's own specialisation of every argument
   (``native_specialize_impl`` with the CUDA backend, as the runtime applies it: ``tt.divisibility`` 16 for 16-byte
   aligned pointers and integers divisible by 16, 1 as a constant), the constexprs, warps and stages. The library
   products behave as on CUDA with half inputs (half products into float32 results, so dZ goes to a half buffer).
   The interpreter cannot run bfloat16 dots, so the drive runs in float16 and float32, and each float16 launch is
   compiled as its bfloat16 twin: the two types have the same size and MMA shapes, so one compile answers for both.
2. Compile (a child process without TRITON_INTERPRET): each distinct record for its target.
3. Check: shared memory (Triton's allocation, which its launcher holds against the device, plus the cubin's static
   shared memory) within 166912 bytes on sm_80 and 232448 on sm_90, and no stack frame (no register spills), from
   the cubin's resource usage; the TMA reduce-add (``cp.reduce.async.bulk.tensor``) in the PTX of the dW kernel's
   TMA variant where it adds into the accumulator, and nowhere else. A table of every compile is printed.

A kernel added later joins by picking its config through ``_triton_utils.launch_config``.
"""

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}
# (tokens N, width D, vocabulary V): as at the Qwen heads (D, V and the row strides multiples of 16, the token
# count anything), and odd sizes throughout
SIZE_FAMILIES = {"odd_tokens": (5, 32, 96), "odd_sizes": (5, 20, 70)}
# a few tokens a chunk at these sizes, so that the fast path runs several chunks
SMALL_WORKSPACE_BYTES = 2048
CHILD_TIMEOUT_S = 900
# the PTX instruction of the TMA reduce-add (the dW kernel adding its tiles into the float32 accumulator)
TMA_REDUCE_ADD = "cp.reduce.async.bulk.tensor"


# ---------------------------------------------------------------------------------------------------------------
# 1. Recording (test process, interpreter mode)


class LaunchRecorder:
    """Records every Triton launch (through the interpreter's ``InterpretedFunction.run``) instead of running it,
    with the specialisation the CUDA runtime would give its arguments."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.capability = capability
        self.backend = make_backend(GPUTarget("cuda", capability * 10, 32))
        self.records = []

    def run(self, function, *args, grid, warmup, **kwargs):
        from triton._C.libtriton import native_specialize_impl

        specialisation = [list(native_specialize_impl(self.backend, arg, False, True, True)) for arg in args]
        self.records.append(dict(kernel=[function.fn.__module__, function.fn.__qualname__],
                                 capability=self.capability, specialisation=specialisation, kwargs=kwargs))


def _cuda_like_products():
    """``MatrixProducts`` as it runs on CUDA with half inputs (half operands, float32 results, a half dZ buffer in the
    chunk loops), computed on the CPU in float32."""
    from papo_kernels.fast_path import chunk_loop

    class CudaLikeProducts(chunk_loop.MatrixProducts):
        def __init__(self, weight, grad_weight_kernel="addmm"):
            super().__init__(weight, grad_weight_kernel)
            if weight.dtype in chunk_loop.HALF_DTYPES:
                self.native_half, self.input_dtype, self.weight = True, weight.dtype, weight

        def logits(self, rows, out):
            return out.copy_(rows.float() @ self.weight.float().T)

        def grad_rows(self, dz, out, alpha=1.0):
            out.copy_(dz.float() @ self.weight.float() * alpha)

        def accumulate_grad_weight(self, accumulator, dz, rows, alpha=1.0, accumulate=True):
            if self.grad_weight_kernel == "reduce_add":  # the Triton kernel: its launch is recorded
                return super().accumulate_grad_weight(accumulator, dz, rows, alpha, accumulate)
            if not accumulate:
                accumulator.zero_()
            accumulator.add_(dz.float().T @ rows.float(), alpha=alpha)

    return CudaLikeProducts


def _subsets(names):
    return [subset for size in range(1, len(names) + 1) for subset in itertools.combinations(names, size)]


def _drive_ops(dtype):
    """linear_logprobs and linear_perception_kl: every subset of differentiated outputs with every input wanting a
    gradient, and every subset of inputs wanting one with every output differentiated (the weight standing for the
    bias: either makes the head want a gradient)."""
    import papo_kernels

    g = torch.Generator().manual_seed(0)
    for (n, dim, v), bias in itertools.product(SIZE_FAMILIES.values(), (False, True)):
        base = dict(hidden=torch.randn(n, dim, generator=g), hidden_masked=torch.randn(n, dim, generator=g),
                    weight=torch.randn(v, dim, generator=g), bias=torch.randn(v, generator=g))
        tokens = torch.randint(0, v, (n,), generator=g)
        for op, outputs, inputs in (
                ("logprobs", ("logprobs", "entropy"), ("hidden", "weight", "bias")),
                ("perception_kl", ("logprobs", "logprobs_masked", "entropy", "entropy_masked", "kl"),
                 ("hidden", "hidden_masked", "weight", "bias"))):
            sweep = [(subset, inputs[:-1]) for subset in _subsets(outputs)] + [
                (outputs, subset) for subset in _subsets(inputs[:-1])]
            for differentiated, wanting in sweep:
                leaves = {name: base[name].to(dtype).requires_grad_(name in wanting) for name in inputs}
                options = dict(bias=leaves.get("bias") if bias else None, temperature=0.7, backend="triton")
                if op == "logprobs":
                    result = papo_kernels.linear_logprobs(leaves["hidden"], leaves["weight"], tokens, **options)
                else:
                    result = papo_kernels.linear_perception_kl(leaves["hidden"], leaves["hidden_masked"],
                                                               leaves["weight"], tokens, **options)
                chosen = [getattr(result, name) for name in differentiated if getattr(result, name).requires_grad]
                if chosen:
                    torch.autograd.backward(chosen, [torch.ones_like(t) for t in chosen])


def _drive_papo_loss(dtype):
    """papo_loss's fast path: every combination of its terms (gamma, eta_clean, eta_masked on or off), the
    estimators and entropy modes where a term uses them, the masked pass as hidden states or as log-probs, bias, at
    the odd token count (the other size families with every term on); its per-token path at the presets (it
    launches through the per-token ops, which ``_drive_ops`` sweeps)."""
    for family, (n, dim, v) in SIZE_FAMILIES.items():
        _drive_papo_loss_at(dtype, n, dim, v, every_term=family == "odd_tokens")


def _drive_papo_loss_at(dtype, n, dim, v, every_term):
    from papo_kernels import PRESETS, papo_loss
    from papo_kernels.objective import ENTROPY_MODES, PERCEPTION_KL_ESTIMATORS

    g = torch.Generator().manual_seed(1)
    b, t = (2, n // 2) if n % 2 == 0 else (1, n)
    hidden, hidden_masked = torch.randn(b, t, dim, generator=g), torch.randn(b, t, dim, generator=g)
    weight, bias_vector = torch.randn(v, dim, generator=g), torch.randn(v, generator=g)
    tokens, mask = torch.randint(0, v, (b, t), generator=g), torch.ones(b, t, dtype=torch.long)
    advantages, logprobs = torch.randn(b, generator=g), -torch.rand(b, t, generator=g)
    terms = itertools.product((0.0, 0.02), repeat=3) if every_term else [(0.01, 0.03, 0.03)]
    for bias, masked_pass, (gamma, eta_clean, eta_masked) in itertools.product(
            (False, True), ("hidden_masked", "masked_logprobs", None), list(terms)):
        estimators = PERCEPTION_KL_ESTIMATORS if gamma else ("k3",)
        entropies = ENTROPY_MODES if eta_clean or eta_masked else ("exact",)
        for perception_kl, entropy in itertools.product(estimators, entropies):
            leaves = dict(hidden=hidden.to(dtype).requires_grad_(), weight=weight.to(dtype).requires_grad_())
            options = dict(gamma=gamma, eta_clean=eta_clean, eta_masked=eta_masked, perception_kl=perception_kl,
                           entropy=entropy, path="fast", backend="triton", old_logprobs=logprobs,
                           ref_logprobs=logprobs, beta=0.01)
            if bias:
                options["bias"] = leaves["bias"] = bias_vector.to(dtype).requires_grad_()
            if masked_pass == "hidden_masked":
                options["hidden_masked"] = leaves["hidden_masked"] = hidden_masked.to(dtype).requires_grad_()
            elif masked_pass == "masked_logprobs":
                options["masked_logprobs"] = logprobs
            try:
                loss, _ = papo_loss(leaves["hidden"], leaves["weight"], tokens, mask, advantages, **options)
            except ValueError:  # a combination papo_loss refuses (a masked term without a masked pass): no launch
                continue
            loss.backward()
    for preset, bias in itertools.product(PRESETS.values(), (False, True)):  # the per-token path, through the ops
        leaves = [hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
        extra = dict(bias=bias_vector.to(dtype).requires_grad_()) if bias else {}
        loss, _ = papo_loss(*leaves, tokens, mask, advantages, hidden_masked=hidden_masked.to(dtype).requires_grad_(),
                            old_logprobs=logprobs, ref_logprobs=logprobs, path="per_token", backend="triton",
                            **preset, **extra)
        loss.backward()


def _drive_chunk_statistics(dtype):
    """The fast path's logits function, statistics only and with the logits stored, one pass and pairs."""
    from papo_kernels.backends import triton_logit_statistics

    g = torch.Generator().manual_seed(2)
    for (count, dim, v), bias, paired, store in itertools.product(SIZE_FAMILIES.values(), (False, True),
                                                                   (False, True), (False, True)):
        rows = torch.randn((2 if paired else 1) * count, dim, generator=g).to(dtype)
        out = torch.empty(rows.shape[0], v) if store else None
        triton_logit_statistics.chunk_statistics(rows, torch.randn(v, dim, generator=g).to(dtype),
                                                 torch.randn(v, generator=g).to(dtype) if bias else None,
                                                 torch.randint(0, v, (count,), generator=g), 0.7, paired, out)


def _drive_reduce_add(dtype):
    """The chunk loops with dW by the reduce-add kernel (``PAPO_KERNELS_GRAD_WEIGHT=reduce_add``, where the rules of
    ``grad_weight.py`` let it run): papo_loss at its presets on the fast path, in chunks of a few tokens (the first
    chunk stores dW, the later ones add to it), and on the per-token path (the per-token ops' chunked backward)."""
    from papo_kernels import PRESETS, papo_loss

    g = torch.Generator().manual_seed(3)
    for (n, dim, v), preset, path in itertools.product(SIZE_FAMILIES.values(), PRESETS.values(),
                                                       ("fast", "per_token")):
        hidden, hidden_masked = (torch.randn(1, n, dim, generator=g).to(dtype).requires_grad_() for _ in range(2))
        weight = torch.randn(v, dim, generator=g).to(dtype).requires_grad_()
        tokens, logprobs = torch.randint(0, v, (1, n), generator=g), -torch.rand(1, n, generator=g)
        workspace = dict(workspace_bytes=SMALL_WORKSPACE_BYTES) if path == "fast" else {}
        loss, _ = papo_loss(hidden, weight, tokens, torch.ones(1, n, dtype=torch.long), torch.randn(1, generator=g),
                            hidden_masked=hidden_masked, old_logprobs=logprobs, ref_logprobs=logprobs, path=path,
                            backend="triton", **preset, **workspace)
        loss.backward()


def record_launches(capability: int, monkeypatch) -> list:
    from triton.runtime.interpreter import InterpretedFunction

    from papo_kernels.backends import _triton_utils, head_chunks
    from papo_kernels.fast_path import chunk_loop, grad_weight

    recorder = LaunchRecorder(capability)
    products = _cuda_like_products()
    with monkeypatch.context() as patch, _triton_utils.forced_capability(capability):
        patch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: recorder.run(self, *args, **kwargs))
        patch.setattr(chunk_loop, "MatrixProducts", products)
        patch.setattr(head_chunks, "MatrixProducts", products)
        # the dW flag resolves by the rules for a CUDA device of the forced capability
        patch.setattr(grad_weight, "reduce_add_unavailable", lambda device, dtype, vocab_size, dim:
                      grad_weight.cuda_reduce_add_unavailable((capability, 0), dtype, vocab_size, dim))
        for dtype in (torch.float32, torch.float16):
            _drive_ops(dtype)
            _drive_papo_loss(dtype)
            _drive_chunk_statistics(dtype)
            with patch.context() as flag:
                flag.setenv(grad_weight.GRAD_WEIGHT_VARIABLE, "reduce_add")
                _drive_reduce_add(dtype)
    return recorder.records


def distinct(records: list) -> list:
    """The records without repeats, float16 ones as their bfloat16 twins (same sizes, same MMA shapes: one compile
    stands for both)."""
    unique = {}
    for record in records:
        twin = _bfloat16_twin(record)
        unique.setdefault(json.dumps(twin, sort_keys=True), twin)
    return list(unique.values())


def _bfloat16_twin(record: dict) -> dict:
    def twin(kind, attribute):
        return [re.sub(r"(?<=[*<])fp16\b", "bf16", kind) if isinstance(kind, str) else kind, attribute]
    return dict(record, specialisation=[twin(*entry) for entry in record["specialisation"]])


# ---------------------------------------------------------------------------------------------------------------
# 2. Compiling (child process, no interpreter)


def _resources(cubin: bytes):
    """(registers, stack bytes, static shared bytes) from the cubin's resource usage (Triton's bundled cuobjdump)."""
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    return tuple(int(value) for value in found.groups())


def compile_record(record: dict) -> dict:
    """Compiles one record as the runtime would have (``JITFunction._pack_args`` on the recorded specialisation);
    returns its row of the table."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, qualname = record["kernel"]
    kernel = getattr(importlib.import_module(module), qualname)
    target = GPUTarget("cuda", record["capability"] * 10, 32)
    backend = make_backend(target)
    names = [param.name for param in kernel.params]
    positional = record["specialisation"]
    specialisation = [tuple(entry) if i < len(positional) else ("constexpr", record["kwargs"][name])
                      for i, (name, entry) in enumerate(zip(names, positional + [None] * len(names)))]
    bound = {name: (entry[1] if entry[0] == "constexpr" else None) for name, entry in zip(names, specialisation)}
    launch_options = {name: value for name, value in record["kwargs"].items() if name not in names}
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch_options, bound, specialisation, None)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    registers, stack, static_shared = _resources(compiled.asm["cubin"])
    flags = {name: value for name, value in record["kwargs"].items() if name in names and not name.startswith(
        "BLOCK") and name != "GROUP_N"}
    return dict(kernel=qualname, target=f"sm_{record['capability']}0",
                dtypes="/".join(sorted({kind for kind, _ in positional if isinstance(kind, str) and kind.startswith(
                    ("*f", "*b", "tensordesc"))})),
                divisible=" ".join(name for name, (kind, attribute) in zip(names, positional) if attribute == "D"),
                flags=" ".join(f"{name}={value}" for name, value in sorted(flags.items())),
                blocks=" ".join(f"{name}={value}" for name, value in record["kwargs"].items()
                                if name.startswith("BLOCK")),
                warps=options.num_warps, stages=options.num_stages,
                shared=compiled.metadata.shared + static_shared, registers=registers, stack=stack,
                tma_reduce_add=TMA_REDUCE_ADD in compiled.asm["ptx"])


def child_main() -> None:
    """Reads the records (JSON on stdin), compiles each on two processes, prints the table, then one JSON line of
    the rows."""
    import multiprocessing

    records = json.load(sys.stdin)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        rows = pool.map(compile_record, records, chunksize=1)
    header = ("kernel", "target", "dtypes", "flags", "blocks", "warps", "stages", "divisible", "shared", "registers",
              "stack")
    print(" | ".join(header))
    for row in sorted(rows, key=lambda r: tuple(str(r[name]) for name in header)):
        print(" | ".join(str(row[name]) for name in header))
    print("ROWS " + json.dumps(rows))


# ---------------------------------------------------------------------------------------------------------------
# 3. The test


@functools.lru_cache(maxsize=None)
def _compiled_rows(records_json: str):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=records_json, capture_output=True,
                            text=True, env=env, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-6000:]
    table, rows_line = result.stdout.rsplit("ROWS ", 1)
    return table, json.loads(rows_line)


def test_every_launched_kernel_fits_sm80_and_sm90(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("records the launches through the interpreter, which runs only without a CUDA device")
    records = distinct([record for capability in (8, 9) for record in record_launches(capability, monkeypatch)])
    launched = {record["kernel"][1] for record in records}
    assert {"_logit_partials_kernel", "_finalize_kernel", "_statistics_partials_kernel",
            "_finalize_statistics_kernel", "_epilogue_gradient_kernel", "_grad_weight_kernel"} <= launched, launched
    # the dW kernel on sm_90: TMA, storing the first chunk's dW and adding the later chunks' by the reduce-add
    assert {(True, False), (True, True)} <= {(r["kwargs"]["TMA"], r["kwargs"]["ACCUMULATE"]) for r in records
                                             if r["kernel"][1] == "_grad_weight_kernel" and r["capability"] == 9}
    table, rows = _compiled_rows(json.dumps(records))
    print(f"\n{len(records)} distinct launches, {len(rows)} compiles\n{table}")
    assert len(rows) == len(records)
    for record, row in zip(records, rows):
        limit = SHARED_MEMORY_LIMITS[int(row["target"].removeprefix("sm_"))]
        assert row["shared"] <= limit, f"shared memory {row['shared']} > {limit}: {row}"
        assert row["stack"] == 0, f"register spills ({row['stack']} bytes of stack): {row}"
        adds_by_tma = record["kernel"][1] == "_grad_weight_kernel" and record["kwargs"]["TMA"] and record[
            "kwargs"]["ACCUMULATE"]
        assert row["tma_reduce_add"] == adds_by_tma, f"{TMA_REDUCE_ADD} expected: {adds_by_tma}: {row}"


def test_launch_config_answers_for_the_forced_capability_and_keeps_the_interpreter_apart():
    from papo_kernels.backends._triton_utils import KernelConfigs, LaunchConfig, forced_capability, launch_config

    configs = KernelConfigs({9: LaunchConfig(dict(BLOCK=9), 8, 3)}, fallback=LaunchConfig(dict(BLOCK=1), 4, 2),
                            interpreter=LaunchConfig(dict(BLOCK=0), 1, 1))
    cpu = torch.device("cpu")
    if not torch.cuda.is_available():  # conftest.py put Triton in interpreter mode
        assert launch_config(configs, cpu).blocks == dict(BLOCK=0)
    with forced_capability(9):
        assert launch_config(configs, cpu).launch_kwargs() == dict(BLOCK=9, num_warps=8, num_stages=3)
        with forced_capability(8):
            assert launch_config(configs, cpu).blocks == dict(BLOCK=1)  # no entry for 8: the fallback
        assert launch_config(configs, cpu).blocks == dict(BLOCK=9)


if __name__ == "__main__":
    child_main()
