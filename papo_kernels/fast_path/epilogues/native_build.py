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
without one is ``NativeUnavailable`` (the torch epilogue runs, with its one warning). A file system
that refuses ``flock`` itself (Lustre mounted without it, some network file systems: ENOSYS,
EOPNOTSUPP, ENOLCK) gets one warning and the lock-free path: concurrent first uses may each build,
and the atomic rename still keeps every library whole.

The cache verifies its bytes: each build writes ``<library>.json`` with the library's size and
SHA-256 before the library moves into place, and a cached library is loaded only when both match
(a truncated or damaged shared object would otherwise kill the process with SIGBUS or SIGSEGV inside
the loader). One that does not match is rebuilt with one warning, or, where the cache cannot be
written, is ``NativeUnavailable``.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
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
# Part of the cache key: entries of an earlier layout (without a manifest) are never read.
CACHE_LAYOUT = "manifest-v1"
# What flock raises on a file system that does not implement it.
LOCKS_REFUSED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)


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
    digest.update("\0".join(build_flags() + [compiler, version, sys.platform, CACHE_LAYOUT]).encode())
    capability = torch.backends.cpu.get_cpu_capability().replace(" ", "_")
    return f"torch{torch.__version__}-{capability}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _exclusive(lock: IO) -> Iterator[bool]:
    """An exclusive ``fcntl`` lock on the open file ``lock`` for the duration (yields True), or, where the file
    system refuses locks (``LOCKS_REFUSED``), one warning and no lock (yields False); the file is closed after."""
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in LOCKS_REFUSED:
                raise
            warnings.warn(f"papo_kernels: the native epilogue's cache folder {Path(lock.name).parent} does not "
                          f"support file locks ({error.strerror}); it is built and loaded without one (processes "
                          "starting together may each build it; every library still moves into place whole)",
                          RuntimeWarning, stacklevel=4)
            yield False
            return
        try:
            yield True
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
        built = work / f"{LIBRARY_NAME}.so"
        manifest = work / manifest_path(library).name
        manifest.write_text(json.dumps(fingerprint(built)))
        os.replace(manifest, manifest_path(library))  # the manifest first: a library is never without its own
        os.replace(built, library)
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


def manifest_path(library: Path) -> Path:
    return library.with_suffix(".json")


def fingerprint(library: Path) -> dict:
    """What the manifest records of a library: its size and SHA-256."""
    return {"size": library.stat().st_size, "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}


def damage(library: Path) -> Optional[str]:
    """Why the cached ``library`` is not the one its build wrote (size or SHA-256 differs from its manifest, or the
    manifest is missing or unreadable), or None when it is."""
    try:
        recorded = json.loads(manifest_path(library).read_text())
        size, sha256 = int(recorded["size"]), str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest {manifest_path(library).name} cannot be read ({type(error).__name__})"
    try:
        actual = fingerprint(library)
    except OSError as error:
        return f"it cannot be read ({error.strerror})"
    if actual["size"] != size:
        return f"{actual['size']} bytes where its build wrote {size}"
    if actual["sha256"] != sha256:
        return "its SHA-256 differs from the one its build recorded"
    return None


def _load_cached(library: Path) -> None:
    """Loads a library whose bytes ``damage`` accepted."""
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
        reason = damage(library)
        if reason is not None:
            raise NativeUnavailable(f"the cached library {library} is damaged ({reason}) and its cache folder cannot "
                                    f"be written to rebuild it; set {CACHE_DIR_VARIABLE} to a writable folder") \
                from error
        _load_cached(library)
    else:
        with _exclusive(lock) as locked:
            if locked:  # a build folder is a dead builder's only while the lock is held
                for stale in entry.glob("build-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            cached = library.exists() and not rebuild
            reason = damage(library) if cached else None
            if cached and reason is None:
                _load_cached(library)
            else:
                if reason is not None:
                    warnings.warn(f"papo_kernels: the cached native epilogue {library} is damaged ({reason}); "
                                  "rebuilding it", RuntimeWarning, stacklevel=3)
                library = _build(entry, compiler, ninja_dir())
    _loaded = library
    return library
