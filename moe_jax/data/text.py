"""Text side of the data: a byte tokenizer, digit captions and prompts, a code corpus.

Everything here is offline and deterministic. `stdlib_corpus` reads the running
Python's own standard library, so its bytes depend on the Python version.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib

import numpy as np

from moe_jax.tokenizer import ByteTokenizer  # noqa: F401  (re-exported)

DIGIT_NAMES: list[str] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Caption phrasings for a digit image; "{name}" is the word, "{digit}" the numeral.
_DIGIT_TEMPLATES: tuple[str, ...] = (
    "a handwritten {name}",
    "the digit {digit}",
    "a picture of the number {name}",
    "a scanned {name}",
    "a small grayscale {name}",
    "the number {digit} written by hand",
    "a blurry {name} on a white page",
    "a tiny drawing of a {name}",
)
NUM_CAPTION_VARIANTS: int = len(_DIGIT_TEMPLATES)


def digit_captions(label: int, variant: int) -> str:
    """Caption number `variant` (any int, taken modulo the number of phrasings)."""
    template = _DIGIT_TEMPLATES[variant % NUM_CAPTION_VARIANTS]
    return template.format(name=DIGIT_NAMES[label], digit=label)


def class_prompts(class_names: list[str], template: str = "a photo of the digit {}") -> list[str]:
    """One zero-shot classification prompt per class."""
    return [template.format(name) for name in class_names]


# ---- Python standard library source as a byte corpus --------------------------------

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_MAX_BYTES = {"train": 8 << 20, "validation": 1 << 20}
CORPUS_SPLITS: tuple[str, ...] = tuple(_MAX_BYTES)


def _split_of(relpath: str) -> str:
    """Fixed held-out split: 1 file in 20 (by crc32 of its path) is validation."""
    return "validation" if zlib.crc32(relpath.encode("utf-8")) % 20 == 0 else "train"


def stdlib_files(split: str) -> list[str]:
    """Sorted relative paths ('/'-separated) of the stdlib .py files in `split`."""
    if split not in _MAX_BYTES:
        raise ValueError(f"stdlib corpus split {split!r} is not one of {list(CORPUS_SPLITS)}")
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                if _split_of(rel) == split:
                    paths.append(rel)
    return sorted(paths)


@functools.lru_cache(maxsize=None)
def stdlib_corpus(split: str) -> bytes:
    """The split's files concatenated (sorted order, blank line between), capped in size."""
    root = sysconfig.get_paths()["stdlib"]
    cap = _MAX_BYTES.get(split, 0)
    chunks, total = [], 0
    for rel in stdlib_files(split):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read(cap - total) + b"\n\n"
        chunks.append(data)
        total += len(data)
        if total >= cap:
            break
    return b"".join(chunks)[:cap]
