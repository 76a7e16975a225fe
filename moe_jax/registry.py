"""Name -> component registries (routers, dispatchers, expert banks).

A component is one module that registers itself under a name; configs name it.
`Registry.get(name)` first looks in what is registered, then imports
`<package>.<name>` (so a new router file `moe_jax/nn/routing/my_router.py` that
registers "my_router" needs no other edit), and otherwise fails with one line
listing the registered names.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any


class Registry:
  """Components of one kind ("router", "dispatch", ...) by name, with metadata."""

  def __init__(self, kind: str, package: str | None = None):
    self.kind, self.package = kind, package
    self._items: dict[str, tuple[Any, dict[str, Any]]] = {}

  def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
    """Decorator: `@ROUTERS.register("top_k")` on a class or function."""

    def add(obj):
      if name in self._items and self._items[name][0] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice "
                         f"({self._items[name][0]!r} and {obj!r})")
      self._items[name] = (obj, meta)
      return obj

    return add

  def _load(self, name: str) -> None:
    if name in self._items or not self.package or not name.isidentifier():
      return
    try:
      importlib.import_module(f"{self.package}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{self.package}.{name}":
        raise

  def _load_package(self) -> None:
    """Imports every module of the package (an error path only: a full list of names)."""
    if not self.package:
      return
    import pkgutil  # pylint: disable=import-outside-toplevel
    package = importlib.import_module(self.package)
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
      try:
        importlib.import_module(f"{self.package}.{info.name}")
      except ImportError:  # an optional dependency missing: that component is unavailable
        pass

  def get(self, name: str) -> Any:
    if not isinstance(name, str):
      raise ValueError(f"{self.kind}={name!r} must be a registered name (a string); "
                       f"registered: {', '.join(repr(n) for n in self._items)}")
    self._load(name)
    if name not in self._items:
      self._load_package()  # so the list names the components not imported yet too
      raise ValueError(f"{self.kind}={name!r} is not registered; registered: "
                       f"{', '.join(repr(n) for n in self._items)}")
    return self._items[name][0]

  def meta(self, name: str) -> dict[str, Any]:
    self.get(name)
    return self._items[name][1]

  def names(self) -> tuple[str, ...]:
    return tuple(self._items)

  def __contains__(self, name: str) -> bool:
    if not isinstance(name, str):
      return False
    self._load(name)
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)


def option_defaults(cls, options: tuple[str, ...]) -> dict[str, Any]:
  """{option: default} of a dataclass component (options without a default left out)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in options:
      if f.default is not dataclasses.MISSING:
        out[f.name] = f.default
      elif f.default_factory is not dataclasses.MISSING:
        out[f.name] = f.default_factory()
  return out


def drop_exposed_defaults(spec: Any, registry: Registry, options_of: Callable[[Any], tuple]
                          ) -> Any:
  """A component spec dict as the command line may leave it: the config file exposed the
  named component's options at their defaults (experiments/configs/fields.py), so after
  `--config.model.moe.router.name=expert_choice` the dict still holds top_k's. Options the
  named component does not take are dropped when their value is some registered
  component's default for that option (any other stays, for the component's one-line
  "unknown option" error); so are its own options left at None where None is the default."""
  if isinstance(spec, str) or not hasattr(spec, "items") or "name" not in spec:
    return spec
  spec = dict(spec.items())
  cls = registry.get(spec["name"])
  own = option_defaults(cls, options_of(cls))
  registry._load_package()  # pylint: disable=protected-access  (every component's defaults)
  others = [option_defaults(c, options_of(c)) for c in (registry.get(n) for n in registry.names())]
  for key in [k for k in spec if k != "name"]:
    value = spec[key]
    if key in own:
      if value is None and own[key] is None:
        del spec[key]
    elif any(key in d and _same(d[key], value) for d in others):
      del spec[key]
  return spec


def _same(a: Any, b: Any) -> bool:
  """Equal config values (a list and a tuple alike; True is not 1)."""
  norm = lambda v: tuple(v) if isinstance(v, list) else v
  if isinstance(a, bool) != isinstance(b, bool):
    return False
  try:
    return bool(norm(a) == norm(b))
  except Exception:  # noqa: BLE001 -- arrays and other odd values: not a default
    return False
