"""Embedded image, image-caption and "video" sources on scikit-learn's 8x8 digits.

`load_digits` ships inside scikit-learn (1797 images, 10 classes), so these work
offline. Split: a fixed permutation (seed 0) of the rows; the first 80% are
"train", the rest "test". Every example is a pure function of (split, index).

Difficulty knobs (source_args; the defaults are the plain task): `size` keeps the first N
examples of the split (fewer training examples), `noise` adds Gaussian pixel noise of
that standard deviation, fixed per (split, index), clipped to [0, 1].
"""
from __future__ import annotations

import functools

import numpy as np

from moe_jax.data.text import DIGIT_NAMES, NUM_CAPTION_VARIANTS, ByteTokenizer, digit_captions

SPLITS: tuple[str, ...] = ("train", "test")
TEXT_LENGTH = 32
VIDEO_FRAMES = 4
VIDEO_SIZES = {"train": 2000, "test": 400}
_SALT = {"digits_caption": 11, "digits_video": 12,  # separates the sources' random streams
         "noise": 13}


def check_split(split: str, valid: tuple[str, ...]) -> None:
    """ValueError naming the valid splits unless `split` is one of them."""
    if split not in valid:
        raise ValueError(f"split {split!r} is not one of {list(valid)}")


def check_index(i: int, size: int) -> None:
    if not 0 <= i < size:
        raise IndexError(f"example {i} out of range [0, {size})")


@functools.lru_cache(maxsize=None)
def load_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32[N, 8, 8, 1] in [0, 1], labels int32[N], sklearn rows int64[N])."""
    check_split(split, SPLITS)
    from sklearn.datasets import load_digits  # slow import (scipy): only when used

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    n_train = int(0.8 * len(perm))
    rows = perm[:n_train] if split == "train" else perm[n_train:]
    images = (digits.images[rows] / 16.0).astype(np.float32)[..., None]
    labels = digits.target[rows].astype(np.int32)
    for array in (images, labels, rows):
        array.flags.writeable = False  # shared by every source instance
    return images, labels, rows


class _DigitsBase:
    """Shared split loading and class metadata."""

    splits: tuple[str, ...] = SPLITS
    num_classes: int = 10
    class_names: list[str] = DIGIT_NAMES

    def __init__(self, split: str = "train", size: int | None = None, noise: float = 0.0):
        self.split = split
        self.images, self.labels, self.rows = load_split(split)
        self._split_id = SPLITS.index(split)
        if size is not None and not 1 <= size <= len(self.labels):
            raise ValueError(f"size={size} must be in [1, {len(self.labels)}] (the {split} "
                             "split's images)")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise={noise} must be a pixel standard deviation in [0, 1]")
        self.size = len(self.labels) if size is None else size
        self.noise = float(noise)

    def image(self, i: int) -> np.ndarray:
        """Image i of the split, with this source's fixed noise."""
        image = self.images[i].copy()
        if self.noise:
            rng = np.random.default_rng([_SALT["noise"], self._split_id, i])
            image = np.clip(image + np.float32(self.noise) * rng.standard_normal(
                image.shape, dtype=np.float32), 0.0, 1.0)
        return image


class DigitsImage(_DigitsBase):
    """{"image": float32[8, 8, 1] in [0, 1], "label": int32[]}."""

    modalities: tuple[str, ...] = ("image",)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        check_index(i, self.size)
        return {"image": self.image(i), "label": np.int32(self.labels[i])}


class DigitsCaption(_DigitsBase):
    """DigitsImage plus "text": int32[32] byte ids of a caption (phrasing picked by index)."""

    modalities: tuple[str, ...] = ("image", "text")

    def __init__(self, split: str = "train", size: int | None = None, noise: float = 0.0):
        super().__init__(split, size, noise)
        self.tokenizer = ByteTokenizer()

    def __len__(self) -> int:
        return self.size

    def caption(self, i: int) -> str:
        rng = np.random.default_rng([_SALT["digits_caption"], self._split_id, i])
        return digit_captions(int(self.labels[i]), int(rng.integers(NUM_CAPTION_VARIANTS)))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        check_index(i, self.size)
        return {
            "image": self.image(i),
            "text": self.tokenizer.encode(self.caption(i), TEXT_LENGTH),
            "label": np.int32(self.labels[i]),
        }


class DigitsVideo(_DigitsBase):
    """4-frame clips: the label digit twice (two different images), two other digits once.

    {"video": float32[4, 8, 8, 1] in [0, 1], "label": int32[]}. Frame order is random
    per index, so a single frame is right at best half of the time.
    """

    modalities: tuple[str, ...] = ("video",)

    def __init__(self, split: str = "train", size: int | None = None, noise: float = 0.0):
        super().__init__(split, None, noise)
        self.size = VIDEO_SIZES[split] if size is None else size
        self._by_class = [np.flatnonzero(self.labels == c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.size

    def clip_positions(self, i: int) -> tuple[np.ndarray, int]:
        """(positions into this split of the 4 frames, label) for clip `i`."""
        if not 0 <= i < self.size:
            raise IndexError(f"clip {i} out of range [0, {self.size})")
        u = np.random.default_rng([_SALT["digits_video"], self._split_id, i]).random(10)
        label = i % self.num_classes  # balanced classes
        # Two distinct other digits: draw from the 9 others, then the 8 left.
        a, b = int(u[0] * 9), int(u[1] * 8)
        b += b >= a
        others = [d + (d >= label) for d in (a, b)]
        # Two distinct images of the label digit, one image of each other digit.
        same = self._by_class[label]
        j, k = int(u[2] * len(same)), int(u[3] * (len(same) - 1))
        k += k >= j
        pos = np.array([same[j], same[k]] + [self._by_class[c][int(x * len(self._by_class[c]))]
                                             for c, x in zip(others, u[4:6])])
        return pos[np.argsort(u[6:10])], label  # random frame order

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        pos, label = self.clip_positions(i)
        video = self.images[pos] if not self.noise else np.stack([self.image(p) for p in pos])
        return {"video": video, "label": np.int32(label)}
