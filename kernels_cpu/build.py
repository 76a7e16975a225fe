"""Compiles grouped_matmul.cc once per machine and registers its FFI targets with XLA:CPU.

The library is cached under $MOE_JAX_CACHE (default ~/.cache/moe_jax)/kernels_cpu (or a
private folder in the temporary directory when that is not writable), keyed by the source,
jaxlib's version, the compiler and its version, the flags and the CPU (it is built with
-march=native, so a home directory shared across machines gets one build per CPU model).
The build writes a temporary file and renames it, so concurrent processes (pytest -n 2)
never load half a library. MOE_JAX_CPU_KERNELS=0 turns the kernels off;
MOE_JAX_CPU_KERNELS_FLAGS adds compiler flags (e.g. "-march=x86-64-v3" for one library
across a cluster's CPUs, or "-mno-avx512f" to try the AVX2 register blocks).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("grouped_matmul.cc")
ENV_SWITCH = "MOE_JAX_CPU_KERNELS"
FLAGS_ENV = "MOE_JAX_CPU_KERNELS_FLAGS"
TARGETS = {"MoeGmm": "moe_jax_cpu_gmm", "MoeGmmSum": "moe_jax_cpu_gmm_sum",
           "MoeTgmm": "moe_jax_cpu_tgmm"}


def _cpu_id() -> str:
  try:  # model and feature flags of the first CPU (Linux)
    text = Path("/proc/cpuinfo").read_text()
    return "|".join(line for line in text.splitlines()[:30]
                    if line.startswith(("model name", "flags", "Features", "CPU part")))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
  """The compiler command ($CXX may carry arguments, e.g. "ccache g++")."""
  cxx = shlex.split(os.environ.get("CXX", "")) or [next(
      (c for c in ("c++", "g++", "clang++") if shutil.which(c)), "")]
  if not cxx[0] or not shutil.which(cxx[0]):
    raise RuntimeError(f"no C++ compiler ({' '.join(cxx) or 'c++, g++ or clang++'}) on PATH; "
                       "set CXX to one")
  return cxx


def _compiler_version(cxx: list[str]) -> str:
  try:
    return subprocess.run(cxx + ["--version"], capture_output=True, text=True, timeout=60,
                          check=False).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "?"


def _writable_dir(path: Path) -> bool:
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return False
  return os.access(path, os.W_OK | os.X_OK)


def _cache_dir() -> Path:
  """$MOE_JAX_CACHE/kernels_cpu, else a folder of this user's own in the temporary
  directory (mode 0700, owner checked: a shared /tmp must not hand us another's library)."""
  cache = Path(os.environ.get("MOE_JAX_CACHE", Path.home() / ".cache" / "moe_jax")) / "kernels_cpu"
  if _writable_dir(cache):
    return cache
  fallback = Path(tempfile.gettempdir()) / f"moe_jax_kernels_cpu-{os.getuid()}"
  fallback.mkdir(mode=0o700, exist_ok=True)
  if fallback.stat().st_uid != os.getuid() or fallback.is_symlink():
    raise RuntimeError(f"{cache} is not writable and {fallback} belongs to another user")
  return fallback


# Each attempt's flags; native first, a portable build if the compiler refuses it.
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17", "-w"]
ARCHES = (["-march=native"], [])

_build_lock = threading.Lock()  # threads of one process build once; processes rename atomically


def library_path() -> Path:
  """The compiled library, built now if this machine has none for this source yet."""
  cxx = _compiler()
  flags = FLAGS + shlex.split(os.environ.get(FLAGS_ENV, ""))
  key = hashlib.sha256("\n".join([
      SOURCE.read_text(), importlib.metadata.version("jaxlib"), " ".join(cxx),
      _compiler_version(cxx), " ".join(flags), repr(ARCHES), platform.machine(),
      _cpu_id()]).encode()).hexdigest()[:16]
  with _build_lock:
    out = _cache_dir() / f"grouped_matmul-{key}.so"
    if out.exists():
      return out
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f"{out.stem}.", suffix=".so.tmp")
    os.close(fd)
    errors = []
    try:
      for arch in ARCHES:
        cmd = cxx + arch + flags + [f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if run.returncode == 0:
          os.replace(tmp, out)
          return out
        lines = (run.stderr or run.stdout).strip().splitlines()
        first = next((l for l in lines if "error" in l), lines[-1] if lines else "?")
        errors.append(f"[{' '.join(arch) or 'portable'}] {first.strip()}")
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  raise RuntimeError(f"{' '.join(cxx)} could not build {SOURCE.name}: {'; '.join(errors)}")


@functools.cache
def unavailable() -> str | None:
  """None once the kernels are registered with XLA:CPU; otherwise why they are not."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return f"{ENV_SWITCH}=0"
  try:
    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    for symbol, target in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    return f"{type(e).__name__}: {e}"
  return None
