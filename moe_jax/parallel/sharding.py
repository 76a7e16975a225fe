"""Device meshes, distributed start-up and logical axis rules.

Mesh axes: data (batch), fsdp (batch + parameter shards), expert (experts and, for
tokens, a further batch split), model (tensor parallel). Their product must equal the
number of devices. Logical names on arrays ("batch", "embed", "expert", "mlp", ...)
map to mesh axes through rules kept in config, so models never name mesh axes.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "model")

# logical axis -> mesh axes (a tuple shards over several axes, None replicates)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
)


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the sizes in `axes` (missing axes: 1)."""
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; valid: {', '.join(MESH_AXES)}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  for name, size in zip(MESH_AXES, sizes):
    if size < 1:
      raise ValueError(f"mesh.{name}={size} must be >= 1")
  devices = list(jax.devices() if devices is None else devices)
  product = 1
  for s in sizes:
    product *= s
  if product != len(devices):
    shape = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    raise ValueError(f"mesh {shape} needs {product} devices but {len(devices)} are available; "
                     "make the product of the mesh axes equal the device count")
  # Auto axes: jit/shard_map reshard inputs as needed (explicit-sharding mode would not).
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names."""
  table = dict(rules)
  spec = []
  for name in logical_axes:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(table)}")
    spec.append(None if name is None else table[name])
  return P(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(timeout_s: float = 300) -> bool:
  """jax.distributed.initialize() on multi-process launches; a no-op on one host.

  Multi-process means a coordinator / TPU-pod variable is set, or SLURM launched more
  than one task. Every process waits up to `timeout_s` for all of them to connect.
  Returns whether it initialised (False if already done, e.g. by a notebook's earlier run).
  """
  multi = any(os.environ.get(k) for k in _MULTI_PROCESS_ENV)
  multi = multi or int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not multi or jax.distributed.is_initialized():
    return False
  # JAX reads the coordinator from JAX_COORDINATOR_ADDRESS but the process count and
  # id only from cluster managers (SLURM, Open MPI, TPU, k8s): take them from the
  # environment too, for hand-launched multi-node jobs.
  kwargs = {}
  for arg, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    value = os.environ.get(env)
    if value:
      if not value.isdigit():
        raise ValueError(f"{env}={value!r} must be a non-negative integer")
      kwargs[arg] = int(value)
  # When a process never connects, JAX aborts this one from C++ with DEADLINE_EXCEEDED
  # (RegisterTask) and no Python error: say beforehand what is being waited for.
  address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
  print(f"process {kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')}: "
        f"connecting to {address or 'the cluster coordinator'}, waiting up to {timeout_s:g} s "
        "for every process (train.barrier_timeout_s); an abort with DEADLINE_EXCEEDED "
        "RegisterTask means some process never started or got other JAX_* variables",
        flush=True)
  jax.distributed.initialize(initialization_timeout=int(timeout_s), **kwargs)
  return True
