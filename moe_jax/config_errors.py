"""One-line explanations of bad `--config.a.b=value` overrides (ml_collections)."""
from __future__ import annotations

import difflib
import importlib.util
import re

import ml_collections


def config_spec(argv: list[str]) -> str | None:
  """The "path[:arg]" of --config=..., or of --config PATH (the space form)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(argv: list[str]):
  spec = config_spec(argv)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_moe_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _key_paths(node, prefix: str = ""):
  """Every dotted key path of a config ("model.moe.router.k", ...)."""
  for key, value in node.items():
    yield f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _key_paths(value, f"{prefix}{key}.")


def explain_override_error(argv: list[str], error: Exception) -> str:
  """Names the first unknown override key and lists the valid keys at that level."""
  try:
    config = _load_config(argv)
  except Exception as e:  # pylint: disable=broad-except
    return f"could not load the config file: {type(e).__name__}: {e}"
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)=", arg)
    if not m or config is None:
      continue
    node, walked = config, []
    for key in m.group(1).split("."):
      where = "config" + "".join(f".{w}" for w in walked)
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return (f"--config.{m.group(1)}: {where} is the value {node!r}, not a group of keys, "
                f"so it has no {key!r}")
      if key not in node:
        valid = sorted(node.keys())
        close = difflib.get_close_matches(key, valid, n=1)
        elsewhere = [p for p in _key_paths(config) if p.endswith(f".{key}")][:3]
        hint = (f"did you mean {close[0]!r}? " if close else
                f"it is at {' or '.join('--config.' + p for p in elsewhere)}; " if elsewhere else "")
        return (f"unknown config key {key!r} in --config.{m.group(1)}; {hint}valid keys of "
                f"{where}: {', '.join(valid)}")
      walked.append(key)
      node = node[key]
  first = str(error).strip().splitlines()
  return f"{type(error).__name__}: {first[0] if first else ''}"
