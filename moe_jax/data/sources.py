"""Source registry: `make_source("digits_video:test")`, `make_source("tfds:mnist:train")`.

A source is a random-access sequence of examples (`len(s)`, `s[i] -> dict of numpy
arrays`) with `class_names`, `num_classes`, `modalities` and, for embedded ones,
`splits`. Embedded sources are offline and every example is a pure function of
(split, index).
"""
from __future__ import annotations

import inspect

from typing import Any

import numpy as np

from moe_jax.data import audio, digits, text


class StdlibText:
    """Language-model windows over Python stdlib source: {"tokens": int32[seq_len + 1]}.

    Window starts are drawn from a generator seeded by (split, index); the "examples"
    are a fixed-size virtual set over the split's corpus (see `text.stdlib_corpus`).
    """

    splits: tuple[str, ...] = text.CORPUS_SPLITS
    sizes = {"train": 100_000, "validation": 2_000}
    modalities: tuple[str, ...] = ("tokens",)
    class_names: list[str] = []
    num_classes: int = 0
    _SALT = 31

    def __init__(self, split: str = "train", seq_len: int = 128, size: int | None = None):
        digits.check_split(split, self.splits)
        self.split, self.seq_len = split, seq_len
        self.size = self.sizes[split] if size is None else size
        self._split_id = self.splits.index(split)
        self._ids = text.ByteTokenizer().encode_bytes(text.stdlib_corpus(split))
        if self._ids.size <= seq_len + 1:
            raise ValueError(f"stdlib corpus {split!r} has {self._ids.size} bytes, "
                             f"too few for seq_len={seq_len}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"example {i} out of range [0, {self.size})")
        rng = np.random.default_rng([self._SALT, self._split_id, i])
        start = int(rng.integers(0, self._ids.size - self.seq_len))  # last start: size - seq_len - 1
        return {"tokens": self._ids[start:start + self.seq_len + 1].copy()}


SOURCES: dict[str, type] = {
    "digits_image": digits.DigitsImage,
    "digits_caption": digits.DigitsCaption,
    "digits_video": digits.DigitsVideo,
    "dtmf_audio": audio.DtmfAudio,
    "stdlib_text": StdlibText,
}


def make_source(spec: str, **kwargs: Any):
    """"<name>[:split]" (embedded) or "tfds:<name>[:split]"; split defaults to "train".

    kwargs go to the source's constructor (e.g. seq_len for stdlib_text, data_dir and
    feature_map for tfds). A TFDS split may itself contain ':' (e.g. "train[:80%]").
    """
    if spec.startswith("tfds:"):
        from moe_jax.data.tfds_source import TfdsSource

        name, _, split = spec[len("tfds:"):].partition(":")
        if not name:
            raise ValueError(f"source spec {spec!r} names no TFDS dataset; use tfds:<name>[:split]")
        return TfdsSource(name, split or "train", **kwargs)
    name, _, split = spec.partition(":")
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r} in spec {spec!r}; valid names: "
                         f"{sorted(SOURCES)} or tfds:<name>[:split]")
    cls = SOURCES[name]
    split = split or "train"
    if split not in cls.splits:
        raise ValueError(f"source {name!r} has no split {split!r}; valid splits: {list(cls.splits)}")
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = [p for p in params if p != "split"]
        raise ValueError(f"source {name!r} (embedded) takes no {', '.join(unknown)}; its options: "
                         f"{', '.join(options) or 'none'}")
    return cls(split, **kwargs)
