"""Builds the native CPU epilogue (``csrc/``) on first use and loads it; nothing here runs at import.

The sources ship inside the package as ``papo_kernels/_csrc`` (in the repository a link to
``csrc/``; in an sdist or wheel a copy), so an installed package can build them too.

``load()`` compiles them with ``torch.utils.cpp_extension`` (ninja, the ``CXX`` compiler or
``c++``), for this CPU's vector instructions (``torch.backends.cpu.get_cpu_capability()``:
AVX512, AVX2, else plain C++), with OpenMP, and loads the library into the process once. The
result is cached in ``$PAPO_KERNELS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/papo_kernels``, i.e.
``~/.cache/papo_kernels``) under ``native/<torch version>-<capability>-<hash>/``, the hash taken
over the sources, the flags and the compiler's version, so a new torch, CPU, compiler or source
builds anew. ``PAPO_KERNELS_REBUILD=1`` rebuilds even when the cache holds a library.

Concurrent first use (pytest workers, DDP ranks, processes sharing a home directory): one
process builds while the others wait on an ``fcntl`` lock of the cache entry (released by the
kernel if the builder dies); a build happens in a private folder and its library moves into
place with an atomic ``os.replace``, so no process ever loads a half-written file. The folder
of a builder that died is removed by the next holder of the lock.

A cache entry whose lock cannot be opened (a read-only folder or file system, say a cache built
once and shared) has no builder to wait for: its library loads without the lock, and an entry
without one is ``NativeUnavailable`` (the torch epilogue runs, with its one warning).
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator, List, Optional

import torch

LIBRARY_NAME = "papo_kernels_native"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "_csrc"
SOURCES = ("papo_epilogue_cpu.cpp",)
HEADERS = ("papo_epilogue.h",)
CACHE_DIR_VARIABLE = "PAPO_KERNELS_CACHE_DIR"
REBUILD_VARIABLE = "PAPO_KERNELS_REBUILD"

# The flags ATen compiles its own vectorised kernels with, per capability (at::vec picks its
# implementation from CPU_CAPABILITY_*); any other capability gets at::vec's plain C++.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
COMMON_FLAGS = ["-O3", "-fopenmp"]


class NativeUnavailable(RuntimeError):
    """No toolchain to build the native epilogue here (no compiler, no ninja, not Linux); the reason is the message."""


class NativeBuildError(RuntimeError):
    """The compiler ran and failed, or the library it made does not load; the message holds its output."""


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "papo_kernels"


def compiler_path() -> str:
    """The C++ compiler torch's build would call; raises NativeUnavailable when it is not there."""
    name = os.environ.get("CXX", "c++")
    found = shutil.which(name)
    if found is None:
        raise NativeUnavailable(f"no C++ compiler found (CXX={name!r} is not an executable on PATH)")
    return found


def ninja_dir() -> str:
    """The folder of a ninja executable: the ``ninja`` package's, else one on PATH."""
    try:
        import ninja
    except ImportError:
        ninja = None
    if ninja is not None and (Path(ninja.BIN_DIR) / "ninja").exists():
        return ninja.BIN_DIR
    found = shutil.which("ninja")
    if found is None:
        raise NativeUnavailable("ninja is not installed (pip install ninja)")
    return str(Path(found).parent)


def build_flags() -> List[str]:
    return COMMON_FLAGS + CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def cache_key(compiler: str) -> str:
    """<torch version>-<capability>-<hash of sources, flags and compiler version>."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update("\0".join(build_flags() + [compiler, version, sys.platform]).encode())
    capability = torch.backends.cpu.get_cpu_capability().replace(" ", "_")
    return f"torch{torch.__version__}-{capability}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _exclusive(lock: IO) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on the open file ``lock`` for the duration; the file is closed after."""
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _path_with(folder: str) -> Iterator[None]:
    """PATH with ``folder`` first while torch's build looks for ninja."""
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + previous
    try:
        yield
    finally:
        os.environ["PATH"] = previous


def _build(entry: Path, compiler: str, ninja_folder: str) -> Path:
    """Compiles into a private folder of ``entry``, loads the library, moves it to ``entry``; returns its path."""
    from torch.utils import cpp_extension

    work = Path(tempfile.mkdtemp(prefix="build-", dir=entry))
    log = entry / "build.log"
    library = entry / f"{LIBRARY_NAME}.so"
    try:
        with _path_with(ninja_folder):
            cpp_extension.load(name=LIBRARY_NAME, sources=[str(SOURCE_DIR / name) for name in SOURCES],
                               extra_cflags=build_flags(), extra_ldflags=["-fopenmp"],
                               build_directory=str(work), is_python_module=False, verbose=False)
        os.replace(work / f"{LIBRARY_NAME}.so", library)
        log.unlink(missing_ok=True)  # an earlier failure's
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        output = "\n".join(str(part) for part in (error, getattr(error, "output", None), getattr(error, "stderr", None))
                           if part)
        log.write_text(output)
        tail = "\n".join(output.splitlines()[-40:])
        raise NativeBuildError(
            f"building papo_kernels' native CPU epilogue with {compiler} failed; the compiler's output "
            f"(in full in {log}):\n{tail}\nUse backend='torch' to run without it.") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return library


def _load_cached(library: Path) -> None:
    try:
        torch.ops.load_library(str(library))
    except OSError as error:
        raise NativeBuildError(f"the cached native epilogue {library} does not load ({error}); "
                               f"set {REBUILD_VARIABLE}=1 to rebuild it") from error


_loaded: Optional[Path] = None


def load() -> Path:
    """Builds (once per cache entry) and loads (once per process) the native epilogue's library; returns its path.

    Raises NativeUnavailable where nothing can build it, NativeBuildError where the build fails.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if not sys.platform.startswith("linux"):
        raise NativeUnavailable(f"the native epilogue is built for Linux only, this is {sys.platform}")
    if not SOURCE_DIR.is_dir():
        raise NativeUnavailable(f"its C++ sources are not installed (no folder {SOURCE_DIR})")
    compiler = compiler_path()
    entry = cache_dir() / "native" / cache_key(compiler)
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeUnavailable(f"its cache folder {entry} cannot be made ({error}); set {CACHE_DIR_VARIABLE} to a "
                                "writable folder") from error
    library = entry / f"{LIBRARY_NAME}.so"
    rebuild = os.environ.get(REBUILD_VARIABLE, "0") not in ("", "0")
    try:
        lock = open(entry / "lock", "a")
    except OSError as error:  # a read-only cache: nobody builds in it, so its library needs no lock
        if rebuild or not library.exists():
            raise NativeUnavailable(f"its cache folder {entry} cannot be written ({error.strerror}), so the library "
                                    f"cannot be built there; set {CACHE_DIR_VARIABLE} to a writable folder") from error
        _load_cached(library)
    else:
        with _exclusive(lock):
            for stale in entry.glob("build-*"):  # left by a builder that died: only the lock's holder builds
                shutil.rmtree(stale, ignore_errors=True)
            if library.exists() and not rebuild:
                _load_cached(library)
            else:
                library = _build(entry, compiler, ninja_dir())
    _loaded = library
    return library
