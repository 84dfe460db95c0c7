"""Worker layer: compiles a C++ source into a shared library once per machine and caches it.

The library is built with the host's C++ compiler for the host's CPU
(`-march=native`), so the cache key covers the source, the compiler, the
flags and the CPU's feature flags: a cache directory shared between machines
never hands one CPU code built for another. A build writes a temporary file
and renames it, so concurrent processes never load a half-written library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pagoda import envs

logger = logging.getLogger(__name__)

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


class NativeBuildError(RuntimeError):
    """No compiler, or the compiler rejected the source."""


def find_compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_signature() -> str:
    """The CPU's feature flags (what -march=native depends on), or the machine name where unreadable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_key(source: str, compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (source, compiler, version, " ".join(_FLAGS), _cpu_signature()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_shared_library(source_path: Path) -> Path:
    """Path of the compiled library for `source_path`, building it if the cache has none."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler (c++, g++ or clang++) on PATH")
    source = source_path.read_text()
    cache = envs.cache_dir() / "kernels"
    library = cache / f"{source_path.stem}-{_cache_key(source, compiler)}.so"
    if library.is_file():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *_FLAGS, str(source_path), "-o", str(built)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NativeBuildError(f"{compiler} failed on {source_path.name}:\n{result.stderr[-2000:]}")
        os.replace(built, library)
    logger.info("built %s in %.1f s (cached as %s)", source_path.name, time.perf_counter() - started, library)
    return library
