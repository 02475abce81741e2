"""Builds the C++ and CUDA kernels on first use with ninja and caches them across processes.

The cache lives in ``$CIRCATT_CACHE`` (default ``~/.cache/circatt``), one folder per torch
version and device kind; the build name carries a hash of the sources and flags, so an edited
kernel rebuilds and an unchanged one loads in milliseconds from any later process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its warning that a CUDA toolkit is installed but no
    GPU is visible: on such a machine the CPU kernels are what is wanted, and every command printed it."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _cpu_isa_flags() -> list[str]:
    """Vector-ISA flags for the class of CPU torch detected (never -march=native, so a cache can move
    between machines of one class; the build name hashes these flags, so another class rebuilds)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["-mavx512f", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}.get(capability, [])


CPU_FLAGS = ["-O3", "-fopenmp", *_cpu_isa_flags()]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


class BuildUnavailable(RuntimeError):
    """No compiler (or no CUDA toolkit) to build the kernels with."""


def cache_root() -> Path:
    """Where built kernels are kept; override with CIRCATT_CACHE."""
    base = os.environ.get("CIRCATT_CACHE") or Path.home() / ".cache" / "circatt"
    return Path(base) / f"torch-{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"


def _sources(device: str) -> list[Path]:
    folder = CSRC / device
    return sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".cu"))


def _headers(device: str) -> list[Path]:
    """The device's own headers and those both devices share (ops/csrc/*.h)."""
    return sorted(p for folder in (CSRC / device, CSRC) for p in folder.iterdir() if p.suffix in (".h", ".cuh"))


def _cuda_arch() -> str:
    """The present device's arch (build for the one GPU we run on), unless the user set one."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_name(device: str) -> str:
    """Extension name: the device kind plus a hash of every source, header and flag."""
    digest = hashlib.sha256()
    for path in _sources(device) + _headers(device):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(CPU_FLAGS + CUDA_FLAGS).encode())
    if device == "cuda":
        digest.update(_cuda_arch().encode())
        digest.update(str(torch.version.cuda).encode())
    return f"circatt_{device}_{digest.hexdigest()[:12]}"


def build_dir(device: str) -> Path:
    return cache_root() / build_name(device)


def is_built(device: str) -> bool:
    """True when a cached build of the current sources exists."""
    try:
        return any(build_dir(device).glob("*.so")) or any(build_dir(device).glob("*.pyd"))
    except (OSError, RuntimeError):
        return False


def _check_toolchain(device: str) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildUnavailable(f"no C++ compiler found ({cxx!r} is not on PATH)")
    if device == "cuda":
        cuda_home = _cpp_extension().CUDA_HOME
        if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
            raise BuildUnavailable("no CUDA toolkit found (nvcc; set CUDA_HOME)")
        if not torch.cuda.is_available():
            raise BuildUnavailable("no CUDA device is visible")


@functools.cache
def load(device: str) -> ModuleType:
    """Build (once, announced in one line) or load the kernels for device 'cpu' or 'cuda'."""
    torch_load = _cpp_extension().load
    _check_toolchain(device)
    folder = build_dir(device)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_built(device):
        what = "C++ (CPU)" if device == "cpu" else f"CUDA (sm_{_cuda_arch().replace('.', '')})"
        print(f"circatt: building the {what} kernels once, cached in {folder} ...", file=sys.stderr, flush=True)
    env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if device == "cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch()
    try:
        return torch_load(
            name=build_name(device),
            sources=[str(p) for p in _sources(device)],
            extra_cflags=CPU_FLAGS,
            extra_ldflags=CPU_LDFLAGS,
            extra_cuda_cflags=CUDA_FLAGS if device == "cuda" else None,
            extra_include_paths=[str(CSRC / device), str(CSRC)],
            build_directory=str(folder),
            verbose=False,
        )
    finally:
        if device == "cuda":
            if env_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_arch
