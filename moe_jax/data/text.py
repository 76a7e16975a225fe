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


class ByteTokenizer:
    """Byte-level tokenizer: id = utf-8 byte + 1, id 0 is padding."""

    pad_id: int = 0
    vocab_size: int = 257

    def encode(self, text: str, length: int) -> np.ndarray:
        """`text` -> int32[length], truncated or right-padded with 0."""
        return self.encode_bytes(text.encode("utf-8"), length)

    def encode_bytes(self, data: bytes, length: int | None = None) -> np.ndarray:
        """Raw bytes -> int32 ids; padded/truncated to `length` when given."""
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + 1
        if length is None:
            return ids
        out = np.zeros(length, np.int32)
        n = min(length, ids.size)
        out[:n] = ids[:n]
        return out

    def decode(self, ids: np.ndarray) -> str:
        """int ids -> text; padding (0) is dropped, invalid utf-8 is replaced."""
        ids = np.asarray(ids).reshape(-1)
        ids = ids[ids > 0]
        return bytes((ids - 1).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


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
