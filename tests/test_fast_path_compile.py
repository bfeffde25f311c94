"""The fast path's Triton kernels compile for real GPUs within their limits, checked without one.

A child process without TRITON_INTERPRET compiles each kernel ahead of time for sm_90 (and sm_80
where the kernel runs there) down to a cubin, as the runtime would at the headline shape
(D = 3584, V = 152064, chunks of 1024 tokens, bfloat16): the runtime specialises every pointer
and every int divisible by 16 with ``tt.divisibility = 16``, which widens vector loads and can
change how much shared memory the pipeliner takes, so the compile does too. Checked per kernel:
shared memory within the device's limit (232448 B on sm_90, 166912 B on sm_80) and no register
spills (``ptxas -v``). The dW kernel's TMA variant must contain the TMA reduce-add.
"""

import json
import os
import subprocess
import sys
import textwrap

SHARED_MEMORY_LIMITS = {90: 232448, 80: 166912}

CHILD = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from papo_kernels.fast_path import triton_grad_weight as grad_weight
    from papo_kernels.fast_path.epilogues import triton_epilogue as epilogue

    # the ints as the runtime sees them at the headline shape: 1024 tokens a chunk (2048 rows), 19 splits
    V, D, TOKENS, SPLITS = 152064, 3584, 1024, 19
    INTS = dict(vocab_size=V, dim=D, k_rows=2 * TOKENS, stride_dz=V, stride_rows=D, stride_grad_weight=D,
                n_tokens=TOKENS, stride_logits=V, stride_out=V, stride_field=SPLITS * TOKENS, stride_split=TOKENS,
                n_splits=SPLITS)

    def ptxas_report(ptx, capability):
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        with tempfile.TemporaryDirectory() as folder:
            source = os.path.join(folder, "kernel.ptx")
            with open(source, "w") as handle:
                handle.write(ptx)
            done = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", source, "-o",
                                   os.path.join(folder, "kernel.o")], capture_output=True, text=True, check=True)
        spills = [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", done.stderr)]
        registers = [int(n) for n in re.findall(r"Used (\\d+) registers", done.stderr)]
        return sum(spills), max(registers)

    def compile_kernel(label, fn, types, constexprs, capability, num_warps, num_stages):
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            signature[name] = types.get(name, "i32")
            divisible = signature[name].startswith("*") or (signature[name] == "i32" and INTS[name] % 16 == 0)
            if divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        spills, registers = ptxas_report(compiled.asm["ptx"], capability)
        print(json.dumps(dict(label=label, capability=capability, shared=compiled.metadata.shared, spills=spills,
                              registers=registers, tma_reduce="cp.reduce.async.bulk.tensor" in compiled.asm["ptx"])),
              flush=True)

    for capability in (90, 80):
        config = grad_weight.config_for(capability // 10)
        operand_types = {"alpha": "fp32"}
        if config.tma:
            operand_types.update(dz=f"tensordesc<bf16[{config.block_k}, {config.block_m}]>",
                                 rows=f"tensordesc<bf16[{config.block_k}, {config.block_n}]>",
                                 grad_weight=f"tensordesc<fp32[{config.block_m}, {config.block_n}]>")
        else:
            operand_types.update(dz="*bf16", rows="*bf16", grad_weight="*fp32")
        compile_kernel("grad_weight", grad_weight._grad_weight_kernel, operand_types,
                       dict(TMA=config.tma, ACCUMULATE=True, DOT_PRECISION="tf32", BLOCK_M=config.block_m,
                            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m),
                       capability, config.num_warps, config.num_stages)

    # The epilogue: float32 logits in, a bfloat16 bias, dz out in bfloat16.
    config = epilogue.config_for(9)
    pointers = dict(logits_ptr="*fp32", bias_ptr="*bf16", tokens_ptr="*i64", out_ptr="*bf16", temperature="fp32")
    for name in ("partials_ptr", "logprobs_ptr", "entropy_ptr", "lse_ptr", "logprobs_masked_ptr", "entropy_masked_ptr",
                 "lse_masked_ptr", "kl_ptr", "logprobs_grad_ptr", "entropy_grad_ptr", "logprobs_masked_grad_ptr",
                 "entropy_masked_grad_ptr", "kl_grad_ptr"):
        pointers[name] = "*fp32"
    blocks = dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, SPLIT_V=config.split_v)
    for capability in (90, 80):
        compile_kernel("statistics partials", epilogue._statistics_partials_kernel, pointers,
                       dict(HAS_BIAS=True, PAIRED=True, **blocks), capability, config.num_warps, 1)
    compile_kernel("finalize statistics", epilogue._finalize_statistics_kernel, pointers,
                   dict(PAIRED=True, BLOCK_N=config.finalize_block_n), 90, config.finalize_num_warps, 1)
    every_flag = dict.fromkeys(("HAS_BIAS", "LOGPROBS_GRAD", "ENTROPY_GRAD", "LOGPROBS_MASKED_GRAD",
                                "ENTROPY_MASKED_GRAD", "KL_GRAD", "CLEAN_DZ", "MASKED_DZ", "CLEAN_LOGITS",
                                "MASKED_LOGITS"), True)
    compile_kernel("gradient", epilogue._epilogue_gradient_kernel, pointers, dict(every_flag, **blocks), 90,
                   config.num_warps, 1)
""")


def test_fast_path_kernels_compile_within_shared_memory_and_without_spills():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["label"], r["capability"]) for r in reports] == [
        ("grad_weight", 90), ("grad_weight", 80), ("statistics partials", 90), ("statistics partials", 80),
        ("finalize statistics", 90), ("gradient", 90)]
    for report in reports:
        assert report["shared"] <= SHARED_MEMORY_LIMITS[report["capability"]], report
        assert report["spills"] == 0, report
    grad_weight_90, grad_weight_80 = reports[0], reports[1]
    assert grad_weight_90["tma_reduce"] and not grad_weight_80["tma_reduce"]
