"""Compiles grouped_matmul.cc once per machine and registers its FFI targets with XLA:CPU.

The library is cached under $MOE_JAX_CACHE (default ~/.cache/moe_jax)/kernels_cpu, keyed by
the source, jaxlib's version, the compiler and the CPU (it is built with -march=native, so
a home directory shared across machines gets one build per CPU model). The build writes
a temporary file and renames it, so concurrent processes (pytest -n 2) never load half a
library. MOE_JAX_CPU_KERNELS=0 turns the kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("grouped_matmul.cc")
ENV_SWITCH = "MOE_JAX_CPU_KERNELS"
TARGETS = {"MoeGmm": "moe_jax_cpu_gmm", "MoeGmmSum": "moe_jax_cpu_gmm_sum",
           "MoeTgmm": "moe_jax_cpu_tgmm"}


def _cpu_id() -> str:
  try:  # model and feature flags of the first CPU (Linux)
    text = Path("/proc/cpuinfo").read_text()
    return "|".join(line for line in text.splitlines()[:30]
                    if line.startswith(("model name", "flags", "Features", "CPU part")))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> str:
  cxx = os.environ.get("CXX") or next(
      (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
  if not cxx:
    raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH; set CXX to one")
  return cxx


def library_path() -> Path:
  """The compiled library, built now if this machine has none for this source yet."""
  cxx = _compiler()
  key = hashlib.sha256("\n".join([
      SOURCE.read_text(), importlib.metadata.version("jaxlib"), cxx, platform.machine(),
      _cpu_id()]).encode()).hexdigest()[:16]
  cache = Path(os.environ.get("MOE_JAX_CACHE", Path.home() / ".cache" / "moe_jax"))
  out = cache / "kernels_cpu" / f"grouped_matmul-{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: build into the temporary directory instead
    out = Path(tempfile.gettempdir()) / "moe_jax_kernels_cpu" / out.name
    if out.exists():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
  base = [cxx, "-O3", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
          str(SOURCE), "-o", str(tmp)]
  errors = []
  for arch in (["-march=native"], []):  # native first; a portable build if it is refused
    run = subprocess.run(base[:1] + arch + base[1:], capture_output=True, text=True,
                         timeout=600, check=False)
    if run.returncode == 0:
      os.replace(tmp, out)
      return out
    errors.append((run.stderr or run.stdout).strip().splitlines()[-1:] or ["?"])
  raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {errors[-1][0]}")


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
