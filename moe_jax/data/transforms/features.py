"""Feature selection: keep, drop and rename features of an example."""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.data.transforms.base import Example, Transform, register


@dataclasses.dataclass(frozen=True, init=False)
class _Keys(Transform):
    keys: tuple[str, ...] = ()

    def __init__(self, *keys: str, training: bool = False, class_names=()):
        object.__setattr__(self, "keys", tuple(keys))
        object.__setattr__(self, "training", training)
        object.__setattr__(self, "class_names", tuple(class_names))
        if not self.keys or not all(isinstance(k, str) for k in self.keys):
            raise ValueError(f"{self.name}: give feature names, e.g. {self.name}('image', 'label')")


@register("keep")
@dataclasses.dataclass(frozen=True, init=False)
class Keep(_Keys):
    """Only these features (and their "_mask" companions) go on."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        for k in self.keys:
            self.feature(example, k)
        keep = set(self.keys) | {k + "_mask" for k in self.keys}
        return {k: v for k, v in example.items() if k in keep}


@register("drop")
@dataclasses.dataclass(frozen=True, init=False)
class Drop(_Keys):
    """These features and their "_mask" companions are removed (absent ones are ignored)."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        gone = set(self.keys) | {k + "_mask" for k in self.keys}
        return {k: v for k, v in example.items() if k not in gone}


@register("rename")
@dataclasses.dataclass(frozen=True, init=False)
class Rename(Transform):
    """rename(spectrogram="audio"): feature old -> new (its "_mask" too)."""

    mapping: tuple[tuple[str, str], ...] = ()

    def __init__(self, training: bool = False, class_names=(), **mapping: str):
        object.__setattr__(self, "mapping", tuple(mapping.items()))
        object.__setattr__(self, "training", training)
        object.__setattr__(self, "class_names", tuple(class_names))
        if not self.mapping or not all(isinstance(v, str) for _, v in self.mapping):
            raise ValueError("rename: give old='new' pairs, e.g. rename(spectrogram='audio')")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        out = dict(example)
        for old, new in self.mapping:
            out[new] = out.pop(old) if old in out else self.feature(example, old)
            if old + "_mask" in out:
                out[new + "_mask"] = out.pop(old + "_mask")
        return out
