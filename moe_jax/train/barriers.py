"""Barriers between processes that time out naming the processes that did not arrive.

A multi-host run waits for every process at start-up and around each checkpoint. A plain
collective would hang forever when one host is stuck (a slow filesystem, a crashed data
worker); `wait_for_processes` waits at most `timeout_s` through JAX's coordination
service, and each process first writes an "arrived" key, so the error can say which
processes were missing. One process: no-op.
"""
from __future__ import annotations

import hashlib
import re

import jax
from jax._src import distributed

from moe_jax.train import faults

PREFIX = "moe_jax/barrier"


class BarrierTimeout(RuntimeError):
  """Some process did not reach a barrier in time; the message is one line naming them."""


def _client():
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("several JAX processes but jax.distributed is not initialized")
  return client


def wait_for_processes(name: str, timeout_s: float) -> None:
  """Blocks until every process has called this with `name` (unique per use), or raises
  BarrierTimeout after `timeout_s` naming the processes that had not arrived."""
  faults.at("barrier", name)  # the tests make one process late here
  n, me = jax.process_count(), jax.process_index()
  if n == 1:
    return
  client = _client()
  client.key_value_set(f"{PREFIX}/{name}/{me}", "arrived", allow_overwrite=True)
  try:
    client.wait_at_barrier(f"{PREFIX}/{name}", int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 -- a JaxRuntimeError with a multi-line status
    raise BarrierTimeout(_timeout_message(client, name, timeout_s, n, me, e)) from None


def _timeout_message(client, name: str, timeout_s: float, n: int, me: int, e: Exception) -> str:
  try:
    arrived = {int(k.rsplit("/", 1)[-1])
               for k, _ in client.key_value_dir_get(f"{PREFIX}/{name}/")}
  except Exception:  # noqa: BLE001 -- the service itself may be gone
    arrived = None
  if arrived is None:
    return (f"barrier {name!r} failed on process {me} of {n} after up to {timeout_s:g} s: "
            f"{first_line(e)}")
  missing = sorted(set(range(n)) - arrived)
  if missing:
    return (f"process(es) {', '.join(map(str, missing))} of {n} did not reach {name!r} within "
            f"{timeout_s:g} s (seen from process {me}); see their logs for what held them "
            "(a slow filesystem, a crash, a hang). train.barrier_timeout_s sets the wait")
  return (f"process {me} reached {name!r} after the others had waited {timeout_s:g} s and "
          "given up; see why this process was slow. train.barrier_timeout_s sets the wait")


def first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def describe_timeout(text: str) -> str | None:
  """"processes 1, 3 did not reach the barrier" from a JAX barrier-timeout status (as
  Orbax's own barriers raise it); None when `text` is not one."""
  if "Barrier timed out" not in text:
    return None
  names = re.search(r"timed out task names:\s*\n?\s*([^\n]+)", text)
  who = f"process(es) {names.group(1).strip()}" if names else "some process"
  return f"{who} did not reach Orbax's checkpoint barrier in time"


def check_same_config(text: str, timeout_s: float) -> None:
  """One line when another process runs with a different config (compared by hash)."""
  n, me = jax.process_count(), jax.process_index()
  if n == 1:
    return
  client = _client()
  digest = hashlib.sha256(text.encode()).hexdigest()[:16]
  client.key_value_set(f"moe_jax/config/{me}", digest, allow_overwrite=True)
  wait_for_processes("startup", timeout_s)
  others = {p: client.blocking_key_value_get(f"moe_jax/config/{p}", int(timeout_s * 1000))
            for p in range(n)}
  differ = sorted(p for p, d in others.items() if d != others[0])
  if differ:
    raise ValueError(f"process(es) {', '.join(map(str, differ))} of {n} run another config than "
                     "process 0: launch every process with the same flags and config file")
