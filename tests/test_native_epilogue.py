"""The native C++ epilogue (csrc/): equal to the torch epilogue, registered as proper custom ops, built once.

- float64 to 1e-12 and float32 within the error budget of the torch epilogue, on shapes that
  exercise the vector body, the scalar tail and the blocked sums (V below, across and above
  the 1024-column sum block), with every upstream gradient absent in turn;
- dz written over the logits equals dz written into a separate buffer, and statistics leave the
  logits as they were;
- ``torch.library.opcheck`` on the three ops, and ``gradcheck`` of the statistics op, whose
  registered backward is the gradient op;
- papo_loss end to end with backend="native" equals backend="torch" (float64, 1e-10);
- in fresh processes, one rule where the library cannot be had (no compiler, a failing compiler, a
  read-only cache without it, a damaged one that cannot be rebuilt): ``backend='auto'`` gives the torch
  epilogue with exactly one warning, ``backend='native'`` the error with its cause (a failing compiler's
  output); two processes on a cold cache build once; a read-only cache loads the library it holds;
- the cache verifies its bytes: a truncated or damaged library, or one without its manifest, is found
  before it is loaded, and is rebuilt with one warning; a file system that refuses file locks loads the
  library without one, with one warning;
- the math header compiles for CUDA (sm_90, float and double) where nvcc is installed.
"""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Sequence

import pytest
import torch

from papo_kernels.fast_path.epilogues import native_build, resolve_epilogue, torch_epilogue
from papo_kernels.fast_path.epilogues.contract import UpstreamGradients

from backend_cases import assert_close
from test_epilogues import GRADIENT_SUBSETS, check_against_torch_epilogue, make_chunk, run_epilogue
from test_fast_path import FULL_CASE, TINY_WORKSPACE, make_batch, run, sampled_cases

CPU = torch.device("cpu")
# (tokens, vocabulary): all tail (V < 16 lanes), one row, lanes plus tail, whole vectors, two sum blocks plus tail
SHAPES = [(3, 5), (1, 37), (5, 203), (4, 64), (2, 2500)]
# each upstream gradient alone or with the pairs of test_epilogues, and all of them but one
SUBSETS = GRADIENT_SUBSETS + [tuple(f for f in UpstreamGradients._fields if f != name)
                              for name in UpstreamGradients._fields]
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native():
    epilogue = resolve_epilogue("native", CPU, torch.float64)
    assert epilogue.NAME == "native", f"backend='native' resolved to the {epilogue.NAME} epilogue"
    return epilogue


def cases():
    return [(shape, paired, bias, temperature) for shape in SHAPES for paired in (True, False)
            for bias, temperature in ((True, 0.6), (False, 1.0))]


@pytest.mark.parametrize("shape, paired, bias, temperature", cases(), ids=str)
def test_float64_equals_the_torch_epilogue(native, shape, paired, bias, temperature):
    n, v = shape
    logits, tokens, bias_vector, grads = make_chunk(n, v, paired, bias, seed=n * v, dtype=torch.float64)
    for present in SUBSETS:
        want = run_epilogue(torch_epilogue, logits, tokens, bias_vector, temperature, paired, grads, present)
        got = run_epilogue(native, logits, tokens, bias_vector, temperature, paired, grads, present)
        for name, value in want[0]._asdict().items():
            assert_close(name, getattr(got[0], name), value, rtol=0.0, atol=1e-12)
        assert_close(f"dz with {present}", got[1], want[1], rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("shape, paired, bias, temperature", cases(), ids=str)
def test_float32_keeps_the_error_budget(native, shape, paired, bias, temperature):
    check_against_torch_epilogue(native, CPU, shape, paired, bias, temperature, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dz_over_the_logits_equals_dz_into_a_buffer(native, dtype):
    n, v = 4, 203
    logits, tokens, bias, grads = make_chunk(n, v, True, True, seed=3, dtype=dtype)
    logits, bias = logits.to(dtype), bias.to(dtype)
    grads = {name: value.to(dtype) for name, value in grads.items()}
    for present in SUBSETS:
        upstream = UpstreamGradients(*(grads[name] if name in present else None for name in UpstreamGradients._fields))
        chunk = logits.clone()
        stats = native.statistics(chunk, tokens, bias, 0.6, True)
        assert torch.equal(chunk, logits), "statistics wrote into the logits"
        buffer = torch.full_like(chunk, float("nan"))
        native.logit_gradient(chunk, tokens, bias, 0.6, stats, upstream, buffer)
        native.logit_gradient(chunk, tokens, bias, 0.6, stats, upstream, chunk)
        rows = ([slice(0, n)] if upstream.clean else []) + ([slice(n, 2 * n)] if upstream.masked else [])
        for row in rows:
            assert torch.equal(chunk[row], buffer[row]), f"in-place dz differs with {present}"


def op_inputs(paired: bool, bias: bool, requires_grad: bool = False):
    n, v = 3, 37
    logits, tokens, bias_vector, grads = make_chunk(n, v, paired, bias, seed=5, dtype=torch.float64)
    return logits.requires_grad_(requires_grad), tokens, bias_vector, grads


@pytest.mark.parametrize("paired, bias", [(True, True), (False, False)], ids=str)
def test_opcheck_passes_for_every_op(native, paired, bias):
    ops = torch.ops.papo_kernels
    logits, tokens, bias_vector, grads = op_inputs(paired, bias, requires_grad=True)
    torch.library.opcheck(ops.epilogue_statistics.default, (logits, tokens, bias_vector, 0.7, paired))
    logits = logits.detach()
    stats = ops.epilogue_statistics(logits, tokens, bias_vector, 0.7, paired)
    g = [grads[name] for name in UpstreamGradients._fields]
    masked_inputs = (stats[5], stats[4], stats[6]) if paired else (None, None, None)
    gradients = (g[0], g[1], None, g[2], g[3], None, g[4]) if paired else (g[0], g[1], None, None, None, None, None)
    inputs = (tokens, bias_vector, 0.7, stats[2], stats[1], *masked_inputs, *gradients)
    torch.library.opcheck(ops.epilogue_logit_gradient.default, (logits, *inputs), {"out": torch.empty_like(logits)})
    torch.library.opcheck(ops.epilogue_logit_gradient_.default, (logits.clone(), *inputs))


@pytest.mark.parametrize("paired", [True, False], ids=str)
def test_statistics_op_gradient_passes_gradcheck(native, paired):
    """Every statistic (l, H, lse, ..., KL) differentiated with respect to the logits and the bias by finite
    differences: the registered backward (the gradient op) is right on its own, not only equal to torch's."""
    logits, tokens, bias, _ = op_inputs(paired, bias=True, requires_grad=True)
    bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, b: torch.ops.papo_kernels.epilogue_statistics(x, tokens, b, 0.7, paired), (logits, bias))


@pytest.mark.parametrize("case", sampled_cases(12, seed=15), ids=lambda case: "-".join(map(str, case.values())))
def test_papo_loss_with_the_native_epilogue_equals_the_torch_epilogue(native, case):
    batch = make_batch()
    loss, metrics, grads = run(batch, case, path="fast", backend="native", workspace_bytes=TINY_WORKSPACE)
    want_loss, want_metrics, want_grads = run(batch, case, path="fast", backend="torch",
                                              workspace_bytes=TINY_WORKSPACE)
    assert_close("loss", loss, want_loss, rtol=1e-10, atol=1e-12)
    for name, value in want_metrics.items():
        assert_close(name, metrics[name], value, rtol=1e-10, atol=1e-12)
    for name, value in want_grads.items():
        assert_close(f"grad of {name}", grads[name], value, rtol=1e-10, atol=1e-12)


def test_auto_picks_the_native_epilogue_on_cpu(native):
    assert resolve_epilogue("auto", CPU, torch.float32) is native
    assert resolve_epilogue("auto", CPU, torch.bfloat16) is native  # half inputs: float32 logits on CPU


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_native_on_other_devices_is_a_clear_error(device):
    with pytest.raises(ValueError, match="backend='native' runs on CPU tensors"):
        resolve_epilogue("native", torch.device(device), torch.float32)


def run_python(code: str, tmp_path: Path, prefix: Sequence[str] = (),
               **env_overrides: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (run by the command ``prefix``, when given), with a cache folder of its own
    unless one is given."""
    env = dict(os.environ, PAPO_KERNELS_CACHE_DIR=str(tmp_path / "cache"), **env_overrides)
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], cwd=REPOSITORY, env=env, text=True,
                          capture_output=True, timeout=300)


PAPO_LOSS_TWICE_THEN_NATIVE = """
    import warnings
    import torch
    from papo_kernels import papo_loss
    from papo_kernels.fast_path.epilogues import resolve_epilogue

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    ids, mask, advantages = torch.randint(0, 11, (2, 3), generator=g), torch.ones(2, 3), torch.randn(2, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in ("auto", "auto", "native"):
            try:
                loss, _ = papo_loss(hidden, weight, ids, mask, advantages, hidden_masked=hidden + 0.1,
                                    backend=backend)
            except RuntimeError as error:
                print("error", type(error).__name__, " ".join(str(error).split()))
                continue
            loss.backward()
            print("epilogue", resolve_epilogue(backend, torch.device("cpu"), torch.float32).NAME)
    native = [str(w.message) for w in caught if "native" in str(w.message)]
    print("warnings", len(native))
    print("message", native[0] if native else "")
"""


def assert_auto_falls_back_and_native_raises(result, cause: str, error: str = "NativeUnavailable"):
    """PAPO_LOSS_TWICE_THEN_NATIVE's output where the library cannot be had: auto runs the torch epilogue twice
    with one warning that gives ``cause``; native raises ``error`` with the same cause."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["epilogue torch", "epilogue torch"], result.stdout
    assert lines[2].startswith(f"error {error} backend='native' asks for the native CPU epilogue"), result.stdout
    assert cause in lines[2] and "backend='torch' without one" in lines[2], result.stdout
    assert "warnings 1" in lines, result.stdout
    message = lines[lines.index("warnings 1") + 1]
    assert "native CPU epilogue is unavailable" in message and cause in message, result.stdout


def test_without_a_compiler_auto_runs_the_torch_epilogue_and_native_raises(tmp_path):
    result = run_python(PAPO_LOSS_TWICE_THEN_NATIVE, tmp_path, CXX=str(tmp_path / "missing" / "c++"))
    assert_auto_falls_back_and_native_raises(result, "no C++ compiler found")


# answers torch's version queries as the real compiler does, fails on every compilation (-c)
FAILING_COMPILER = """#!/bin/sh
for argument in "$@"; do
  if [ "$argument" = "-c" ]; then
    echo "papo_epilogue_cpu.cpp:1:1: error: simulated compiler failure" >&2
    exit 1
  fi
done
exec c++ "$@"
"""


def test_a_failing_build_raises_with_the_compiler_output_and_auto_falls_back(tmp_path):
    compiler = tmp_path / "bad-c++"
    compiler.write_text(FAILING_COMPILER)
    compiler.chmod(0o755)
    strict = run_python("""
        import torch
        from papo_kernels.fast_path.epilogues import resolve_epilogue
        resolve_epilogue("native", torch.device("cpu"), torch.float32)
    """, tmp_path, CXX=str(compiler))
    assert strict.returncode != 0
    error = strict.stderr[strict.stderr.index("NativeBuildError"):]
    assert "simulated compiler failure" in error and "build.log" in error, strict.stderr
    lenient = run_python("""
        import warnings
        import torch
        from papo_kernels.fast_path.epilogues import resolve_epilogue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [resolve_epilogue("auto", torch.device("cpu"), torch.float32).NAME for _ in range(2)]
        print(names, [str(w.message) for w in caught])
    """, tmp_path, CXX=str(compiler))
    assert lenient.returncode == 0, lenient.stderr
    assert lenient.stdout.startswith("['torch', 'torch']"), lenient.stdout
    assert lenient.stdout.count("native CPU epilogue is unavailable") == 1, lenient.stdout
    assert "simulated compiler failure" in lenient.stdout


def test_two_processes_on_a_cold_cache_build_once_and_share_the_library(tmp_path):
    code = """
        import os
        import torch
        from papo_kernels.fast_path.epilogues import native_build
        library = native_build.load()
        logits = torch.randn(4, 100, dtype=torch.float64)
        stats = torch.ops.papo_kernels.epilogue_statistics(logits, torch.tensor([0, 99]), None, 1.0, True)
        print(library, os.stat(library).st_ino, bool(torch.isfinite(stats).all()))
    """
    env = dict(os.environ, PAPO_KERNELS_CACHE_DIR=str(tmp_path / "cache"))
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPOSITORY, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    first, second = (stdout.split() for stdout, _ in outputs)
    assert first == second and first[2] == "True", outputs  # same file, same inode: built once, never replaced
    entry = Path(first[0]).parent
    assert sorted(path.name for path in entry.iterdir()) == [
        "lock", f"{native_build.LIBRARY_NAME}.json", f"{native_build.LIBRARY_NAME}.so"]
    assert native_build.damage(Path(first[0])) is None


# Remounts the folder "$0" read-only in the mount namespace of `unshare --mount`, then runs the command "$@" there.
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def read_only(folder: Path) -> List[str]:
    """A command prefix under which nothing in ``folder`` can be written: for a user its permissions (removed here);
    for root, whom permissions do not stop, a read-only bind mount in a mount namespace of its own."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return []
    prefix = ["unshare", "--mount", "sh", "-c", READ_ONLY_MOUNT, str(folder)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("runs as root, which permissions do not stop, and may not mount a folder read-only here")
    return prefix


def test_a_read_only_cache_loads_the_library_it_holds(native, tmp_path):
    built = native_build.load()
    entry = tmp_path / "cache" / "native" / built.parent.name
    shutil.copytree(built.parent, entry)
    result = run_python(PAPO_LOSS_TWICE_THEN_NATIVE, tmp_path, prefix=read_only(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("epilogue native") == 3 and "warnings 0" in lines, result.stdout


def test_a_read_only_cache_without_the_library_falls_back_under_auto_and_raises_under_native(native, tmp_path):
    entry = tmp_path / "cache" / "native" / native_build.load().parent.name
    entry.mkdir(parents=True)
    result = run_python(PAPO_LOSS_TWICE_THEN_NATIVE, tmp_path, prefix=read_only(tmp_path / "cache"))
    assert_auto_falls_back_and_native_raises(result, f"its cache folder {entry} cannot be written")


def copy_of_the_cache_entry(tmp_path: Path) -> Path:
    """A cache of this process's built entry (library and manifest) under tmp_path/cache; returns its library."""
    built = native_build.load()
    entry = tmp_path / "cache" / "native" / built.parent.name
    entry.mkdir(parents=True)
    for path in (built, native_build.manifest_path(built)):
        shutil.copy2(path, entry / path.name)
    return entry / built.name


def truncate(library: Path) -> None:
    library.write_bytes(library.read_bytes()[:len(library.read_bytes()) // 2])


def flip_bytes(count: int):
    def flip(library: Path) -> None:
        data = bytearray(library.read_bytes())
        for position in range(len(data) // 3, len(data) // 3 + count):
            data[position] ^= 0xFF
        library.write_bytes(bytes(data))
    return flip


DAMAGE = {
    "truncated": (truncate, "bytes where its build wrote"),
    "one byte flipped": (flip_bytes(1), "its SHA-256 differs"),
    "200 bytes flipped": (flip_bytes(200), "its SHA-256 differs"),
    "emptied": (lambda library: library.write_bytes(b""), "0 bytes where its build wrote"),
    "no manifest": (lambda library: native_build.manifest_path(library).unlink(), "manifest"),
    "manifest not JSON": (lambda library: native_build.manifest_path(library).write_text("{"), "manifest"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_the_cache_finds_a_damaged_library_before_loading_it(native, tmp_path, kind):
    library = copy_of_the_cache_entry(tmp_path)
    assert native_build.damage(library) is None
    damage, reason = DAMAGE[kind]
    damage(library)
    assert reason in native_build.damage(library)


def test_a_damaged_library_is_rebuilt_with_one_warning(native, tmp_path):
    library = copy_of_the_cache_entry(tmp_path)
    truncate(library)  # loaded as it is, the process died of SIGBUS
    result = run_python(PAPO_LOSS_TWICE_THEN_NATIVE, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("epilogue native") == 3 and "warnings 1" in lines, result.stdout
    assert f"the cached native epilogue {library} is damaged" in result.stdout, result.stdout
    assert native_build.damage(library) is None


def test_a_damaged_library_in_a_read_only_cache_is_never_loaded(native, tmp_path):
    library = copy_of_the_cache_entry(tmp_path)
    flip_bytes(200)(library)
    result = run_python(PAPO_LOSS_TWICE_THEN_NATIVE, tmp_path, prefix=read_only(tmp_path / "cache"))
    assert_auto_falls_back_and_native_raises(result, f"the cached library {library} is damaged")


# Runs the code after it on a file system whose flock fails with ERRNO, as Lustre without flock or NFS without
# a lock daemon do.
REFUSED_LOCKS = """
    import errno, fcntl, os

    def refuse(*args):
        raise OSError(errno.ERRNO, os.strerror(errno.ERRNO))

    fcntl.flock = refuse
"""


@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP", "ENOLCK"])
def test_a_file_system_without_locks_loads_the_library_with_one_warning(native, tmp_path, code):
    copy_of_the_cache_entry(tmp_path)
    setup = textwrap.dedent(REFUSED_LOCKS.replace("ERRNO", code))
    result = run_python(setup + textwrap.dedent(PAPO_LOSS_TWICE_THEN_NATIVE), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("epilogue native") == 3 and "warnings 1" in lines, result.stdout
    assert "does not support file locks" in result.stdout and os.strerror(getattr(errno, code)) in result.stdout


# One CUDA thread block per row pair calling every function of the header, for both scalar types.
HEADER_ON_CUDA = """
#include "papo_epilogue.h"
using namespace papo_epilogue;
template <typename T>
__global__ void row_pair(const T* z, const T* z_masked, int vocab, T* out) {
  RowSums<T> clean = zero_sums<T>(), masked = zero_sums<T>();
  const T max = z[0], max_masked = z_masked[0];
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    absorb_pair(clean, masked, scaled_logit(z[j], T(0), T(1)), z_masked[j], max, max_masked);
  }
  const PassStatistics<T> stats = pass_statistics(max, clean, z[0]);
  const PassStatistics<T> stats_masked = pass_statistics(max_masked, masked, z_masked[0]);
  const T kl = pair_kl(max, clean, stats, max_masked, masked, stats_masked);
  const UpstreamGradients<T> g{T(1), T(1), T(0), T(1), T(1), T(0), T(1)};
  const GradientCoefficients<T> c = gradient_coefficients(g, stats.entropy, stats_masked.entropy, kl, T(1));
  const T log_p = z[threadIdx.x] - stats.lse, log_q = z_masked[threadIdx.x] - stats_masked.lse;
  const T p = Ops<T>::exp(log_p);
  out[threadIdx.x] = clean_logit_gradient(p, log_p, log_q, c) + masked_logit_gradient(Ops<T>::exp(log_q), log_q, p, c);
}
template __global__ void row_pair<float>(const float*, const float*, int, float*);
template __global__ void row_pair<double>(const double*, const double*, int, double*);
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_math_header_compiles_for_cuda(tmp_path):
    source = tmp_path / "header_on_cuda.cu"
    source.write_text(HEADER_ON_CUDA)
    result = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", f"-I{REPOSITORY / 'csrc'}", "-c", str(source),
                             "-o", str(tmp_path / "header_on_cuda.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
