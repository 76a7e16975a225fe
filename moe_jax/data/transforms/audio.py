"""Audio transforms: waveform to float, resample, pad/crop with a mask, log-mel, standardize.

A padded waveform carries its mask in "<key>_mask" (bool per sample); log_mel turns
it into a mask per frame (a frame is real when it lies inside the clip), which
the audio tokenizer turns into a mask per token, so padding never reaches attention,
routing or pooling.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from moe_jax.data import spectrogram
from moe_jax.data.transforms.base import MASK_SUFFIX, Example, Transform, register

_WAVE = "a waveform [samples] or [samples, channels]"


@register("audio_to_float")
@dataclasses.dataclass(frozen=True)
class AudioToFloat(Transform):
    """int16 / int32 / uint8 PCM or float -> float32 [-1, 1] mono [samples] (channels averaged)."""

    key: str = "audio"

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1, 2), what=_WAVE)
        if x.dtype == np.uint8:
            x = (x.astype(np.float32) - 128.0) / 128.0
        elif x.dtype.kind in "iu":
            x = x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1))
        else:
            x = x.astype(np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1)
        return {**example, self.key: x}


@register("resample")
@dataclasses.dataclass(frozen=True)
class Resample(Transform):
    """Polyphase resampling from `from_rate` to `to_rate` Hz (scipy.signal.resample_poly)."""

    from_rate: int = 16000
    to_rate: int = 16000
    key: str = "audio"

    def __post_init__(self):
        if self.from_rate <= 0 or self.to_rate <= 0:
            raise ValueError(f"resample: rates {self.from_rate}, {self.to_rate} must be positive")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1,), what="a float mono waveform [samples] "
                       "(add audio_to_float first)")
        if self.from_rate == self.to_rate:
            return example
        from scipy.signal import resample_poly  # scipy comes with scikit-learn

        g = math.gcd(self.from_rate, self.to_rate)
        y = resample_poly(x.astype(np.float32), self.to_rate // g, self.from_rate // g)
        return {**example, self.key: y.astype(np.float32)}


@register("pad_crop")
@dataclasses.dataclass(frozen=True)
class PadCrop(Transform):
    """Fixed length: `samples`, or `seconds` at `sample_rate`. Longer clips are cropped
    (a random window while training, the central one at eval), shorter ones padded with
    zeros at the end; "<key>_mask" marks the real samples."""

    samples: int | None = None
    seconds: float | None = None
    sample_rate: int | None = None
    key: str = "audio"

    def __post_init__(self):
        if (self.samples is None) == (self.seconds is None):
            raise ValueError("pad_crop: give exactly one of samples=... or seconds=... "
                             "(with sample_rate=...)")
        if self.seconds is not None and not self.sample_rate:
            raise ValueError("pad_crop: seconds=... needs sample_rate=...")
        if self.length < 1:
            raise ValueError(f"pad_crop: the length ({self.length} samples) must be >= 1")

    @property
    def length(self) -> int:
        return self.samples if self.samples is not None else round(self.seconds * self.sample_rate)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1, 2), what=_WAVE)
        mask_key = self.key + MASK_SUFFIX
        mask = np.asarray(example.get(mask_key, np.ones(x.shape[0], bool)), bool)
        n, length = x.shape[0], self.length
        if n > length:
            start = int(rng.integers(n - length + 1)) if self.training else (n - length) // 2
            x, mask = x[start:start + length], mask[start:start + length]
        elif n < length:
            x = np.concatenate([x, np.zeros((length - n,) + x.shape[1:], x.dtype)])
            mask = np.concatenate([mask, np.zeros(length - n, bool)])
        return {**example, self.key: x, mask_key: mask}


@register("log_mel")
@dataclasses.dataclass(frozen=True)
class LogMel(Transform):
    """Float waveform [samples] -> log(eps + mel power) float32 [frames, num_mels].

    Frames: n_fft-sample periodic-Hann windows every `hop` samples, no centering
    (see moe_jax.data.spectrogram); f_max=None is sample_rate / 2.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    num_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None
    eps: float = 1e-6
    key: str = "audio"

    def __post_init__(self):
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0 <= self.f_min < f_max <= self.sample_rate / 2:
            raise ValueError(f"log_mel: need 0 <= f_min < f_max <= sample_rate / 2; got f_min="
                             f"{self.f_min}, f_max={f_max}, sample_rate={self.sample_rate}")
        if self.n_fft < 2 or self.hop < 1 or self.num_mels < 1:
            raise ValueError(f"log_mel: n_fft={self.n_fft}, hop={self.hop}, num_mels="
                             f"{self.num_mels} must be positive (n_fft >= 2)")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1,), what="a mono waveform [samples] "
                       "(add audio_to_float before log_mel)")
        if x.dtype.kind != "f":
            raise self.fail(f"feature {self.key!r} is {x.dtype} PCM; add audio_to_float before "
                            "log_mel")
        if x.shape[0] < self.n_fft:
            raise self.fail(f"a clip of {x.shape[0]} samples is shorter than n_fft={self.n_fft}; "
                            "add pad_crop before log_mel")
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        mel = spectrogram.log_mel(x, sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop,
                                  num_mels=self.num_mels, f_min=self.f_min, f_max=f_max,
                                  eps=self.eps)
        out = {**example, self.key: mel}
        mask_key = self.key + MASK_SUFFIX
        if mask_key in example:
            # A frame is real when it lies wholly inside the clip (its last sample is real),
            # so the real frames and their values do not depend on how much padding follows;
            # the first frame counts whenever the clip is not empty (clips under n_fft).
            samples = np.asarray(example[mask_key], bool)
            starts = self.hop * np.arange(mel.shape[0])
            frames = samples[starts + self.n_fft - 1]
            frames[0] |= samples[0]
            out[mask_key] = frames
        return out


@register("standardize")
@dataclasses.dataclass(frozen=True)
class Standardize(Transform):
    """(x - mean) / std. With mean and std given: fixed (dataset) statistics; without:
    per example, over its real rows only ("<key>_mask" along axis 0), padding set to 0."""

    mean: float | None = None
    std: float | None = None
    key: str = "audio"
    eps: float = 1e-5

    def __post_init__(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("standardize: give both mean and std (dataset statistics) or "
                             "neither (per example)")
        if self.std is not None and self.std <= 0:
            raise ValueError(f"standardize: std={self.std} must be positive")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        x = self.array(example, self.key, ranks=(1, 2, 3), what="a numeric array").astype(
            np.float32)
        mask = example.get(self.key + MASK_SUFFIX)
        real = np.ones(x.shape[0], bool) if mask is None else np.asarray(mask, bool)
        if self.mean is not None:
            y = (x - np.float32(self.mean)) / np.float32(self.std)
        else:
            values = x[real]
            if values.size == 0:
                return {**example, self.key: np.zeros_like(x)}
            y = (x - values.mean()) / (values.std() + np.float32(self.eps))
        y[~real] = 0.0
        return {**example, self.key: y.astype(np.float32)}
