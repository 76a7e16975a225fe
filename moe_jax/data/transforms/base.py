"""Transform base class, registry, spec parsing and the composed per-task pipeline.

A task's preprocessing is data: a list of transform calls, written as one string
`"decode_image|resize(40)|random_crop(32)|flip"` (big_vision's `pp` style) or as a
list of such strings or `{"name": ..., **kwargs}` dicts. Arguments are Python
literals only (parsed with `ast`, never evaluated). Each transform maps an example
(dict of numpy arrays, strings or bytes) to an example on the host, before batching,
so every batch of a task has one static shape.

Randomness: `__call__(example, rng)` draws only from `rng`, which the pipeline seeds
per (seed, epoch, example position), so resumed runs see the same augmentations.
`training` selects train-time behaviour (random crop, flip, random audio window);
at eval the same spec is deterministic (center crop, no flip, center window).
"""
from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from moe_jax.registry import Registry

TRANSFORMS = Registry("transform", "moe_jax.data.transforms")
Example = dict[str, Any]
MASK_SUFFIX = "_mask"  # feature "audio" has its padding mask in "audio_mask"


class TransformError(ValueError):
    """A transform got a feature it cannot handle; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """One named step. Subclasses are frozen dataclasses of their arguments.

    `training` and `class_names` are filled by `build_transforms`, not by the spec.
    """

    name: ClassVar[str] = ""
    training: bool = dataclasses.field(default=False, kw_only=True, repr=False)
    class_names: tuple[str, ...] = dataclasses.field(default=(), kw_only=True, repr=False)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    # --- helpers for subclasses ----------------------------------------------------
    def fail(self, message: str) -> TransformError:
        return TransformError(f"transform {self.name}: {message}")

    def feature(self, example: Example, key: str) -> Any:
        if key not in example:
            raise self.fail(f"the example has no feature {key!r}; it has {sorted(example)}")
        return example[key]

    def array(self, example: Example, key: str, *, ranks: Sequence[int], what: str,
              numeric: bool = True) -> np.ndarray:
        """The feature as an array of one of `ranks`, or a one-line error saying `what`."""
        value = self.feature(example, key)
        if isinstance(value, (bytes, str)):
            raise self.fail(f"feature {key!r} is {type(value).__name__} (encoded or text), "
                            f"expected {what}")
        value = np.asarray(value)
        if value.ndim not in ranks or (numeric and value.dtype.kind not in "biuf"):
            raise self.fail(f"feature {key!r} is {value.dtype}{list(value.shape)}, expected {what}")
        return value


def register(name: str):
    """Class decorator: registers a Transform subclass under `name`."""

    def add(cls):
        cls.name = name
        return TRANSFORMS.register(name)(cls)

    return add


# --- specs --------------------------------------------------------------------------
def _literal(node: ast.AST, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"transform {text!r}: arguments must be Python literals "
                         f"(numbers, strings, tuples, lists, dicts)") from None


def _parse_call(text: str) -> tuple[str, tuple, dict[str, Any]]:
    """"name", "name(1, key='x')" -> (name, args, kwargs)."""
    text = text.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"transform {text!r} is not of the form name or name(args)") from None
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"transform {text!r} is not of the form name or name(args)")
    if any(k.arg is None for k in node.keywords):
        raise ValueError(f"transform {text!r}: write arguments as key=value, not **{{...}}")
    args = tuple(_literal(a, text) for a in node.args)
    kwargs = {k.arg: _literal(k.value, text) for k in node.keywords}
    return node.func.id, args, kwargs


def _split_top_level(spec: str) -> list[str]:
    """"a|b('x|y')" -> ["a", "b('x|y')"]: splits on '|' outside quotes and brackets."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(spec):
        if quote:
            quote = "" if ch == quote and spec[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return parts + [spec[start:]]


def split_spec(spec: Any) -> tuple[str, ...]:
    """A spec (one "a|b(1)" string, a list of strings / dicts, or None) -> one string per call.

    The result is hashable (tasks are static jit arguments) and validated: unknown
    names and arguments fail here, when the config is read.
    """
    if spec is None or spec == "":
        return ()
    items = _split_top_level(spec) if isinstance(spec, str) else list(spec)
    calls = []
    for item in items:
        if isinstance(item, Mapping) or hasattr(item, "items"):
            item = dict(item)
            if "name" not in item:
                raise ValueError(f"transform {item!r} has no 'name'")
            name = item.pop("name")
            item = f"{name}({', '.join(f'{k}={v!r}' for k, v in item.items())})"
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"transform {item!r} must be a string like 'resize(32)' or a dict "
                             "with a 'name'")
        calls.append(item.strip())
    for call in calls:
        _make(call, training=False, class_names=())  # fail early on names and arguments
    return tuple(calls)


def _make(call: str, *, training: bool, class_names: Sequence[str]) -> Transform:
    name, args, kwargs = _parse_call(call)
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r} in {call!r}; registered: "
                         f"{', '.join(sorted(TRANSFORMS.names()))}")
    cls = TRANSFORMS.get(name)
    try:
        return cls(*args, **kwargs, training=training, class_names=tuple(class_names))
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in
                  ("training", "class_names")]
        raise ValueError(f"transform {call!r}: {e}; its arguments: {', '.join(fields)}") from None


class Pipeline:
    """The composed transforms of one task; drops features left as strings or bytes.

    Strings and bytes (captions, file names, encoded images) can be read by a transform
    but never reach the model: whatever is still text after the last transform is
    dropped, so a dataset's extra string features need no feature_map.
    """

    def __init__(self, calls: Sequence[str], *, training: bool, class_names: Sequence[str] = ()):
        self.calls = tuple(calls)
        self.steps = [_make(c, training=training, class_names=class_names) for c in self.calls]

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        example = dict(example)
        for call, step in zip(self.calls, self.steps):
            try:
                example = step(example, rng)
            except TransformError:
                raise
            except Exception as e:  # noqa: BLE001 -- name the step that failed, in one line
                first = str(e).splitlines()[0] if str(e) else ""
                raise TransformError(f"transform {call!r} failed: {type(e).__name__}: {first}") \
                    from e
        return {k: v for k, v in example.items() if not _is_text(v)}

    def __repr__(self) -> str:
        return "|".join(self.calls) or "(none)"


def _is_text(value: Any) -> bool:
    if isinstance(value, (bytes, str)):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "OSU"


def build_transforms(spec: Any, *, training: bool, class_names: Sequence[str] = ()) -> Pipeline:
    """Spec (see `split_spec`) -> the callable pipeline for train or eval."""
    return Pipeline(split_spec(spec), training=training, class_names=class_names)
