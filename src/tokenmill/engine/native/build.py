"""Compiling tokenmill's C++ CPU kernels on the machine that runs them, once, and loading them.

A kernel is one C++ file of this folder registering torch operators (``TORCH_LIBRARY``).
It is compiled with the system's C++ compiler against the installed torch's
headers and libraries, into a cache folder named by a hash of the source, the
torch version and the flags, so a second process, or a second run, loads the
built library at once (~10 ms). The first build takes about 10 s; concurrent
builds each write their own file and the last rename wins, so no lock is
needed.

Where a kernel cannot be built (no compiler, a CPU without AVX-512, a
non-Linux system) the caller keeps PyTorch's own kernel, and the reason is
logged once. ``TOKENMILL_NATIVE_KERNELS=0`` turns them off;
``TOKENMILL_CACHE_DIR`` moves the cache (default ``~/.cache/tokenmill``);
``CXX`` names the compiler.

    python -m tokenmill.engine.native   # build now (``make venv`` does), and say what was used
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
# Explicit ISA flags, not -march=native: the library is only ever loaded where AVX-512 is present
# (torch's own dispatch says so), and a cache folder shared between machines stays valid.
_ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
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
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"this CPU has no AVX-512 (torch reports {capability})"
    return None


def build(name: str) -> BuildResult:
    """Build ``<name>.cpp`` of this folder (or find it built) and load it into torch."""
    reason = disabled_reason()
    if reason is not None:
        return BuildResult(None, reason)
    source = SOURCE_DIR / f"{name}.cpp"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return BuildResult(None, "no C++ compiler found (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).resolve().parent
    flags = [
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fopenmp",  # at::parallel_for is OpenMP in torch's CPU builds; torch's libgomp is the one loaded
        "-w",  # torch's headers warn under some compilers; the build's result is what matters
        *_ISA_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    identity = [source.read_bytes(), torch.__version__.encode(), compiler.encode(), *map(str.encode, flags)]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
    library = cache_dir() / f"{name}-{key}.so"
    if not library.exists():
        failure = _compile(compiler, flags, libs, source, library)
        if failure is not None:
            return BuildResult(None, failure)
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as e:
        return BuildResult(None, f"built {library} but could not load it: {e}")
    return BuildResult(library, f"{name}: {library}")


def _compile(compiler: str, flags: list[str], libs: list[str], source: Path, library: Path) -> str | None:
    """Compile ``source`` into ``library``; None on success, else why not."""
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=library.stem + ".", suffix=".tmp")
    os.close(fd)
    logger.info("building tokenmill's %s kernel for this machine (once; about 10 s)", source.stem)
    try:
        done = subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, *libs],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return f"{compiler} failed on {source.name} (exit {done.returncode}): {last}"
        os.replace(tmp, library)  # atomic: a concurrent loader sees the whole file or none
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not run {compiler}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
