"""Compiling tokenmill's C++ CPU kernels on the machine that runs them, once, and loading them.

The C++ files of this folder are one library, ``cpu_kernels``: a file per kernel,
and ops.cpp registering them as torch operators (``torch.ops.tokenmill.*``).
It is compiled with the system's C++ compiler against the installed torch's
headers and libraries, into a cache folder named by a hash of the sources, the
torch version and the flags, so a second process, or a second run, loads the
built library at once (~10 ms). The first build takes about 10 s; processes
starting together take turns on a lock in the cache folder, so one compiles and
the others find its result.

The library is built for AVX-512 where torch finds it, else for AVX2 with FMA.
Where it cannot be built (no compiler, a CPU with neither, a non-Linux system)
the caller keeps PyTorch's own kernel, and the reason is logged once.
``TOKENMILL_NATIVE_KERNELS=0`` turns them off;
``TOKENMILL_CACHE_DIR`` moves the cache (default ``~/.cache/tokenmill``);
``CXX`` names the compiler; ``TOKENMILL_NATIVE_ISA=AVX2`` builds the AVX2 form on an
AVX-512 CPU (for a cache shared with AVX2 machines, or to test it).

    python -m tokenmill.engine.native   # build now (``make venv`` does), and say what was used
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
# Explicit ISA flags, not -march=native: the library is only loaded where torch's own dispatch
# found that ISA, and a cache folder shared between machines stays valid (the flags are in the key).
_ISA_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),  # torch reports AVX2 only with FMA beside it
}
_BUILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class BuildResult:
    library: Path | None  # None: not built, see ``reason``
    reason: str  # what was used, or why nothing could be


def cache_dir() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(Path.home(), ".cache", "tokenmill")
    return Path(root) / "native"


def disabled_reason() -> str | None:
    """Why native kernels cannot run in this process, or None if they can."""
    if os.environ.get("TOKENMILL_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "TOKENMILL_NATIVE_KERNELS=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"no native kernels for {sys.platform}/{platform.machine()} (Linux x86-64 only)"
    if isa() is None:
        capability = torch.backends.cpu.get_cpu_capability()
        wanted = os.environ.get("TOKENMILL_NATIVE_ISA", "").strip()
        if wanted:
            allowed = " or ".join(_available_isas()) or "none"
            return f"TOKENMILL_NATIVE_ISA={wanted}: this CPU (torch reports {capability}) allows {allowed}"
        return f"this CPU has neither AVX-512 nor AVX2 (torch reports {capability})"
    if compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def isa() -> str | None:
    """The vector ISA the library is built for here: the best this CPU has of "AVX512" and "AVX2"
    (or ``TOKENMILL_NATIVE_ISA``, which may name a lower one), None for neither."""
    available = _available_isas()
    wanted = os.environ.get("TOKENMILL_NATIVE_ISA", "").strip().upper()
    if wanted:
        return wanted if wanted in available else None
    return available[0] if available else None


def _available_isas() -> list[str]:
    """The ISAs of ``_ISA_FLAGS`` this CPU runs, best first (an AVX-512 CPU has AVX2 too)."""
    capability = torch.backends.cpu.get_cpu_capability()
    names = list(_ISA_FLAGS)
    while names and not capability.startswith(names[0]):
        names.pop(0)
    return names


def compiler() -> list[str] | None:
    """The C++ compiler command: ``CXX`` (which may carry arguments, e.g. ``ccache g++``), else c++ or g++."""
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


LIBRARY = "cpu_kernels"


def build(name: str = LIBRARY) -> BuildResult:
    """Build the library (or find it built) and load it into torch. Never raises: whatever goes
    wrong (an unwritable cache, a failing compiler) is the reason in the result."""
    reason = disabled_reason()
    if reason is not None:
        return BuildResult(None, reason)
    if name in _loaded:  # a library's operators register once per process; a second load aborts it
        return BuildResult(_loaded[name], f"{name}: {_loaded[name]}")
    try:
        return _build(name)
    except Exception as e:  # a kernel that cannot be had must never stop a model from loading
        return BuildResult(None, f"could not build {name}: {type(e).__name__}: {e}")


_loaded: dict[str, Path] = {}


def _build(name: str) -> BuildResult:
    sources = sorted(SOURCE_DIR.glob("*.cpp"))
    headers = sorted(SOURCE_DIR.glob("*.h"))
    cxx = compiler()
    assert cxx is not None  # disabled_reason() checked
    torch_dir = Path(torch.__file__).resolve().parent
    flags = [
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fopenmp",  # at::parallel_for is OpenMP in torch's CPU builds (checked after loading: one runtime)
        # No a * b + c fused behind the code's back: the elementwise kernels keep PyTorch's roundings,
        # and FMAs are written out where they are meant (simd::fma).
        "-ffp-contract=off",
        "-w",  # torch's headers warn under some compilers; the build's result is what matters
        *_ISA_FLAGS[isa()],
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    code = [path.read_bytes() for path in sources + headers]
    identity = [*code, torch.__version__, str(torch_dir), _version(cxx), *cxx, *flags]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in identity)).hexdigest()
    library = cache_dir() / f"{name}-{key[:16]}.so"
    if not library.exists():
        failure = _compile(cxx, flags, libs, sources, library)
        if failure is not None:
            return BuildResult(None, failure)
    runtimes_before = _openmp_runtimes()
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as e:
        return BuildResult(None, f"built {library} but could not load it: {e}")
    _loaded[name] = library
    added = _openmp_runtimes() - runtimes_before
    if added:
        # A second OpenMP runtime (another libgomp, or clang's libomp) would run its own thread
        # team beside torch's: the kernel would ignore torch's thread count, and two teams spin.
        return BuildResult(None, f"{library} brought a second OpenMP runtime ({', '.join(sorted(added))})")
    return BuildResult(library, f"{name} ({isa()}): {library}")


def _compile(
    cxx: list[str], flags: list[str], libs: list[str], sources: list[Path], library: Path
) -> str | None:
    """Compile ``sources`` into ``library``; None on success, else why not. One process compiles at
    a time (a lock in the cache folder); the others then find the library built. The sources are
    compiled one per core, then linked: one compiler over all of them took two to three minutes of
    a small machine's first start (torch's headers are most of each file's time)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with open(library.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # built by the process that held the lock
            return None
        for stale in library.parent.glob(library.stem + ".*.tmp"):  # a build killed midway
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        # Said at warning level, which the CLI shows: else a first start looks hung for a minute.
        logger.warning("building tokenmill's CPU kernels for this machine (once; about a minute)")
        with tempfile.TemporaryDirectory(
            dir=library.parent, prefix=library.stem + ".", suffix=".tmp"
        ) as work:
            objects = [Path(work) / f"{source.stem}.o" for source in sources]
            compile_flags = [f for f in flags if f != "-shared"]
            jobs = [
                [*cxx, *compile_flags, "-c", str(s), "-o", str(o)]
                for s, o in zip(sources, objects, strict=True)
            ]
            tmp = Path(work) / "library.so"
            try:
                failed = _run_all(jobs, os.cpu_count() or 1)
                if failed is None:
                    failed = _run_all([[*cxx, *flags, *map(str, objects), "-o", str(tmp), *libs]], 1)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"could not run {' '.join(cxx)}: {e}"
            if failed is not None:
                code, last = failed
                return f"{' '.join(cxx)} failed on {library.stem} (exit {code}): {last}"
            os.replace(tmp, library)  # atomic: a loader sees the whole file or none
            return None


def _run_all(commands: list[list[str]], width: int) -> tuple[int, str] | None:
    """Run ``commands``, ``width`` at a time, all within ``_BUILD_TIMEOUT_S``; the first failure's
    exit status and last line of output, or None. After a failure nothing more is started."""
    deadline = time.monotonic() + _BUILD_TIMEOUT_S
    pending, running = list(commands), []
    failed: tuple[int, str] | None = None
    try:
        while pending or running:
            while pending and len(running) < width and failed is None:
                cmd = pending.pop(0)
                running.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                )
            if not running:
                break
            process = running[0]  # (still in the list, to be killed if it runs past the deadline)
            _, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            running.pop(0)
            if process.returncode != 0 and failed is None:
                failed = (process.returncode, (err.strip().splitlines() or ["(no output)"])[-1])
                pending.clear()
    finally:
        for process in running:  # a failure or a timeout: what still runs is of no use
            process.kill()
            process.wait()
    return failed


def _version(cxx: list[str]) -> str:
    """The compiler's first ``--version`` line: a compiler upgrade builds afresh."""
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout.splitlines() or ["unknown"])[0]


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return {
                line.split(maxsplit=5)[5].strip()
                for line in maps
                if ("libgomp" in line or "libomp" in line or "libiomp" in line) and len(line.split()) >= 6
            }
    except OSError:
        return set()
