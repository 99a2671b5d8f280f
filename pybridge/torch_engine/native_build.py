"""Small C kernels built with the system C compiler on first use and loaded with ctypes.

A library is compiled once per machine into a cache folder (``$PYBRIDGE_CACHE_DIR``, else
``~/.cache/pybridge``, else one in the temporary directory) with ``$CC`` (else ``cc``). Where there
is no compiler, the build fails, or the library's switch (an environment variable) or
``PYBRIDGE_NATIVE`` is ``0``, :meth:`NativeLibrary.get` gives None and the caller uses torch ops:
nothing but speed depends on these kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

# (-ffp-contract=off: a + b*c rounds twice, as torch's separate ops do; clang would fuse it otherwise)
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off"]


def _cache_dirs() -> list:
    """Where a library may be built: $PYBRIDGE_CACHE_DIR, else the user's cache folder, then a
    folder of the user's in the temporary directory (for a home that cannot be written)."""
    root = os.environ.get("PYBRIDGE_CACHE_DIR")
    if root:
        return [Path(root)]
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pybridge"
    return [user, Path(tempfile.gettempdir()) / f"pybridge-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]


def _cpu_model() -> str:
    """-march=native code runs only on CPUs like the one that built it: the cache key names it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, source_path: Path) -> Path:
    source = source_path.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([compiler] + FLAGS).encode(),
                                     platform.machine().encode(), _cpu_model().encode()])).hexdigest()[:16]
    folders = _cache_dirs()
    for folder in folders:
        target = folder / f"{source_path.stem}-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:   # build, then move into place
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(source_path), "-o", str(built), "-lm"],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(built, target)
            return target
        except OSError:     # (a folder that cannot be made or written: try the next)
            if folder == folders[-1]:
                raise


class NativeLibrary:
    """One C file, built and loaded at the first :meth:`get`; `declare` sets its functions' ctypes
    signatures. A failed build warns once (`fallback` says what is used instead)."""

    def __init__(self, source: Path, switch: str, what: str, fallback: str, declare: Callable):
        self.source, self.switch, self.what, self.fallback, self.declare = source, switch, what, fallback, declare
        self._library: Optional[ctypes.CDLL] = None
        self._tried = False

    @property
    def tried(self) -> bool:
        return self._tried

    def get(self) -> Optional[ctypes.CDLL]:
        if self._tried:
            return self._library
        self._tried = True
        if "0" in (os.environ.get(self.switch, "1"), os.environ.get("PYBRIDGE_NATIVE", "1")):
            return None
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler, self.source)))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"pybridge: could not build {self.what} ({detail.strip()[:300]}); {self.fallback}")
            return None
        self.declare(lib)
        self._library = lib
        return lib
