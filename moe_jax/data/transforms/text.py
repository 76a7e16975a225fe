"""Text transforms: captions from class names, tokenization with a padding mask.

`tokenize` uses the byte tokenizer (id = byte + 1, 0 = padding) or, given the path of
a Hugging Face `tokenizer.json`, the `tokenizers` package. Either way the ids are
padded / truncated to `length` and "<key>_mask" marks the real tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from moe_jax.data.transforms.base import MASK_SUFFIX, Example, Transform, register
from moe_jax.tokenizer import ByteTokenizer


def _as_str(value: Any) -> str | None:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from tokenizer.json (cached per process)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("tokenize(tokenizer=...) with a tokenizer.json needs the tokenizers "
                          "package: pip install tokenizers") from None
    if not os.path.isfile(path):
        raise ValueError(f"tokenize: tokenizer file {path!r} does not exist")
    return Tokenizer.from_file(path)


@register("tokenize")
@dataclasses.dataclass(frozen=True)
class Tokenize(Transform):
    """Text (str or utf-8 bytes) -> int32 [length] ids and bool "<key>_mask"."""

    length: int = 32
    key: str = "text"
    tokenizer: str = "bytes"  # or the path of a Hugging Face tokenizer.json
    pad_id: int = 0

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"tokenize: length={self.length} must be >= 1")
        if self.tokenizer != "bytes":
            load_tokenizer(self.tokenizer)  # a missing file or package fails at config time

    def encode(self, text: str) -> np.ndarray:
        """Unpadded int32 ids of `text`."""
        if self.tokenizer == "bytes":
            return ByteTokenizer().encode_bytes(text.encode("utf-8"))
        return np.asarray(load_tokenizer(self.tokenizer).encode(text).ids, np.int32)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        text = _as_str(self.feature(example, self.key))
        if text is None:
            value = np.asarray(example[self.key])
            raise self.fail(f"feature {self.key!r} is {value.dtype}{list(value.shape)}, expected "
                            "a string or utf-8 bytes")
        ids = self.encode(text)[:self.length]
        out = np.full(self.length, self.pad_id, np.int32)
        out[:ids.size] = ids
        mask = np.zeros(self.length, bool)
        mask[:ids.size] = True
        return {**example, self.key: out, self.key + MASK_SUFFIX: mask}


@register("caption")
@dataclasses.dataclass(frozen=True)
class Caption(Transform):
    """Writes a caption made from the class name of `label_key` into `key`.

    templates: format strings with "{}" (or "{name}") for the class name; a random one
    per example while training, the first at eval. Needs the source's class names.
    """

    templates: Any = ("a photo of {}",)
    key: str = "text"
    label_key: str = "label"

    def __post_init__(self):
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        if not templates or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"caption: templates={self.templates!r} must be strings")
        object.__setattr__(self, "templates", templates)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        if not self.class_names:
            raise self.fail("the data source has no class names (a ClassLabel feature) to make "
                            "captions from")
        label = int(np.asarray(self.feature(example, self.label_key)))
        if not 0 <= label < len(self.class_names):
            raise self.fail(f"label {label} is outside the {len(self.class_names)} class names")
        template = self.templates[int(rng.integers(len(self.templates))) if self.training else 0]
        name = self.class_names[label]
        return {**example, self.key: template.replace("{name}", "{}").format(name)}


def prompt_ids(calls, prompts, key: str = "text") -> tuple[tuple[int, ...], ...]:
    """Token ids of `prompts` as the task's own `tokenize(key=...)` step makes them
    (unpadded, truncated to its length); () when the transforms tokenize no `key`."""
    from moe_jax.data.transforms.base import Pipeline  # noqa: PLC0415 (import cycle)

    steps = [t for t in Pipeline(calls, training=False).steps
             if isinstance(t, Tokenize) and t.key == key]
    if not steps:
        return ()
    return tuple(tuple(int(i) for i in steps[-1].encode(p)[:steps[-1].length]) for p in prompts)


def vocab_needed(calls) -> int:
    """The embedding size the tokenize steps of `calls` need (0 when none tokenizes)."""
    from moe_jax.data.transforms.base import Pipeline  # noqa: PLC0415 (import cycle)

    sizes = [ByteTokenizer.vocab_size if t.tokenizer == "bytes" else
             load_tokenizer(t.tokenizer).get_vocab_size()
             for t in Pipeline(calls, training=False).steps if isinstance(t, Tokenize)]
    return max(sizes, default=0)
