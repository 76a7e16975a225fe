"""Image and video transforms on numpy arrays [..., H, W, C] (video: [T, H, W, C]).

decode_image (Pillow), value_range, resize (shorter side or exact), center_crop,
random_crop (center at eval), flip (random horizontal, training only), normalize,
sample_frames (video). Spatial ops act on the last three axes, so a video's frames
share one crop and one flip.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from moe_jax.data.transforms.base import Example, Transform, register

_IMAGE = "an image [H, W, C] or video [T, H, W, C] array (decode encoded images first)"


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding and resizing images needs Pillow: pip install pillow") from None
    return Image


def _pair(size: Any, what: str) -> tuple[int, int]:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{what}: size={size!r} must be a positive int or (height, width)")


@register("decode_image")
@dataclasses.dataclass(frozen=True)
class DecodeImage(Transform):
    """Encoded bytes (PNG, JPEG, ...) -> uint8 [H, W, channels] (channels 1 or 3)."""

    key: str = "image"
    channels: int = 3

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"decode_image: channels={self.channels} must be 1 or 3")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        value = self.feature(example, self.key)
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            raise self.fail(f"feature {self.key!r} is already decoded ({value.dtype}"
                            f"{list(value.shape)}); drop decode_image from the transforms")
        data = value.item() if isinstance(value, np.ndarray) else value
        if not isinstance(data, bytes):
            raise self.fail(f"feature {self.key!r} is {type(data).__name__}, expected encoded "
                            "image bytes")
        image = _pil().open(io.BytesIO(data)).convert("L" if self.channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
        return {**example, self.key: array.reshape(array.shape[:2] + (self.channels,))}


@register("value_range")
@dataclasses.dataclass(frozen=True)
class ValueRange(Transform):
    """uint8 [0, 255] (or float [0, 1]) -> float32 [vmin, vmax]."""

    vmin: float = 0.0
    vmax: float = 1.0
    key: str = "image"

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(2, 3, 4), what=_IMAGE)
        unit = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else \
            x.astype(np.float32)
        return {**example, self.key: np.float32(self.vmin) + unit * np.float32(self.vmax - self.vmin)}


def _resize_hw(x: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resizes the H, W axes of [..., H, W, C] with Pillow (uint8 or per-channel float)."""
    Image = _pil()
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST, "area": Image.BOX}[method]
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    frames = x.reshape((-1, h, w, c))
    out = np.empty((frames.shape[0], height, width, c), x.dtype if x.dtype == np.uint8 else
                   np.float32)
    for f, frame in enumerate(frames):
        if x.dtype == np.uint8 and c in (1, 3):
            img = Image.fromarray(frame[..., 0] if c == 1 else frame)
            out[f] = np.asarray(img.resize((width, height), resample)).reshape(height, width, c)
        else:  # float, or channel counts Pillow has no mode for: one 'F' image per channel
            for ch in range(c):
                img = Image.fromarray(frame[..., ch].astype(np.float32), mode="F")
                out[f, ..., ch] = np.asarray(img.resize((width, height), resample))
    return out.reshape(lead + (height, width, c))


@register("resize")
@dataclasses.dataclass(frozen=True)
class Resize(Transform):
    """size=int: shorter side to `size`, aspect kept; size=(h, w): exactly that."""

    size: Any = 32
    key: str = "image"
    method: str = "bilinear"

    def __post_init__(self):
        if isinstance(self.size, list):
            object.__setattr__(self, "size", tuple(self.size))
        _pair(self.size, "resize")
        if self.method not in ("bilinear", "bicubic", "nearest", "area"):
            raise ValueError(f"resize: method={self.method!r}; allowed: bilinear, bicubic, "
                             "nearest, area")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(3, 4), what=_IMAGE)
        h, w = x.shape[-3:-1]
        if isinstance(self.size, int):
            scale = self.size / min(h, w)
            height, width = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        else:
            height, width = self.size
        if (height, width) == (h, w):
            return example
        return {**example, self.key: _resize_hw(x, height, width, self.method)}


def _crop(x: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    return x[..., top:top + height, left:left + width, :]


@dataclasses.dataclass(frozen=True)
class _Crop(Transform):
    size: Any = 32
    key: str = "image"

    def __post_init__(self):
        if isinstance(self.size, list):
            object.__setattr__(self, "size", tuple(self.size))
        _pair(self.size, self.name)

    def window(self, x: np.ndarray) -> tuple[int, int, int, int]:
        height, width = _pair(self.size, self.name)
        h, w = x.shape[-3:-1]
        if h < height or w < width:
            raise self.fail(f"feature {self.key!r} is {h}x{w}, smaller than the crop "
                            f"{height}x{width}; resize first")
        return h, w, height, width


@register("center_crop")
@dataclasses.dataclass(frozen=True)
class CenterCrop(_Crop):
    """The central size x size (or (h, w)) window."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(3, 4), what=_IMAGE)
        h, w, height, width = self.window(x)
        return {**example, self.key: _crop(x, (h - height) // 2, (w - width) // 2, height, width)}


@register("random_crop")
@dataclasses.dataclass(frozen=True)
class RandomCrop(_Crop):
    """A uniformly placed window while training; the central one at eval."""

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(3, 4), what=_IMAGE)
        h, w, height, width = self.window(x)
        if self.training:
            top, left = int(rng.integers(h - height + 1)), int(rng.integers(w - width + 1))
        else:
            top, left = (h - height) // 2, (w - width) // 2
        return {**example, self.key: _crop(x, top, left, height, width)}


@register("flip")
@dataclasses.dataclass(frozen=True)
class Flip(Transform):
    """Left-right flip with probability `p` while training; the identity at eval."""

    key: str = "image"
    p: float = 0.5

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(3, 4), what=_IMAGE)
        if self.training and rng.random() < self.p:
            return {**example, self.key: np.ascontiguousarray(x[..., ::-1, :])}
        return example


@register("normalize")
@dataclasses.dataclass(frozen=True)
class Normalize(Transform):
    """(x - mean) / std per channel (mean, std: a number or one per channel)."""

    mean: Any = 0.5
    std: Any = 0.5
    key: str = "image"

    def __post_init__(self):
        if np.any(np.asarray(self.std, np.float64) <= 0):
            raise ValueError(f"normalize: std={self.std!r} must be positive")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1, 2, 3, 4), what="a numeric array").astype(
            np.float32)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if mean.ndim and mean.shape[-1] != x.shape[-1] or std.ndim and std.shape[-1] != x.shape[-1]:
            raise self.fail(f"mean/std have {mean.size}/{std.size} values but feature "
                            f"{self.key!r} has {x.shape[-1]} channels")
        return {**example, self.key: (x - mean) / std}


@register("sample_frames")
@dataclasses.dataclass(frozen=True)
class SampleFrames(Transform):
    """Video [T, H, W, C] -> num_frames frames `stride` apart.

    The window starts at random while training and at the center at eval; a clip
    shorter than the window repeats its last frame.
    """

    num_frames: int = 8
    stride: int = 1
    key: str = "video"

    def __post_init__(self):
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(f"sample_frames: num_frames={self.num_frames} and stride="
                             f"{self.stride} must be >= 1")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(4,), what="a video [T, H, W, C] array")
        span = (self.num_frames - 1) * self.stride + 1
        slack = max(0, x.shape[0] - span)
        start = int(rng.integers(slack + 1)) if self.training else slack // 2
        index = np.minimum(start + self.stride * np.arange(self.num_frames), x.shape[0] - 1)
        return {**example, self.key: x[index]}
