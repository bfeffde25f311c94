"""The Triton kernels compile for real GPUs, checked without one.

The interpreter runs the kernels as Python and accepts code that the compiler rejects
(a name defined only under a constexpr branch, mismatched loop-carried types, dot shapes).
A child process without TRITON_INTERPRET compiles them ahead of time, down to a cubin with
Triton's bundled ptxas, for the sm_90 block config, in bfloat16: the dtype the CPU tests
cannot run. (float16 and float32, and sm_80, compile as well; they are left out for time.) The fast path's
kernels are compiled, with their limits checked, in tests/test_fast_path_compile.py.
"""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import triton
    import torch
    from triton.backends.compiler import GPUTarget

    from papo_kernels.backends import triton_perception_kl as kernels
    from papo_kernels.backends._triton_utils import DEVICE_CONFIGS, dot_precisions

    INPUT_POINTERS = ("hidden_ptr", "hidden_masked_ptr", "weight_ptr", "bias_ptr")

    def compile_kernel(fn, constexprs, config, input_pointers=INPUT_POINTERS):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in input_pointers:
                signature[name] = "*bf16"
            elif name == "tokens_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "fp32" if name == "temperature" else "i32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        assert compiled.asm["cubin"], fn.__name__

    config = DEVICE_CONFIGS[9]
    blocks = dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d)
    precision, grad_precision = dot_precisions(torch.bfloat16)
    compile_kernel(kernels._linear_perception_kl_fwd_kernel,
                   dict(HAS_BIAS=True, PAIRED=True, DOT_PRECISION=precision, **blocks), config)
    every_gradient = dict.fromkeys(
        ("HAS_BIAS", "LOGPROBS_GRAD", "LOGPROBS_MASKED_GRAD", "ENTROPY_GRAD", "ENTROPY_MASKED_GRAD", "KL_GRAD",
         "CLEAN_LOGITS", "MASKED_LOGITS", "CLEAN_DZ", "MASKED_DZ", "GRAD_HIDDEN", "GRAD_HIDDEN_MASKED",
         "GRAD_WEIGHT", "GRAD_BIAS"), True)
    # masked entropy only, into hidden_masked and bias: the clean pass is compiled out
    masked_only = dict(every_gradient, LOGPROBS_GRAD=False, LOGPROBS_MASKED_GRAD=False, ENTROPY_GRAD=False,
                       KL_GRAD=False, CLEAN_LOGITS=False, CLEAN_DZ=False, GRAD_HIDDEN=False, GRAD_WEIGHT=False)
    for flags in (every_gradient, masked_only):
        compile_kernel(kernels._linear_perception_kl_bwd_kernel,
                       dict(flags, DOT_PRECISION=precision, GRAD_DOT_PRECISION=grad_precision, **blocks), config)

    print("compiled")
""")


def test_kernels_compile_for_sm90():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
