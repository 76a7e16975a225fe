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
