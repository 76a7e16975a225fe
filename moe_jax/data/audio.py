"""Embedded audio source: noisy DTMF keypad tones of the digits 0-9 as log-mel spectrograms.

Each example is synthesised from (split, index): a two-tone DTMF burst of random
duration (0.15-0.35 s), onset, amplitude and phases inside a 0.5 s clip at 8 kHz,
plus white Gaussian noise at 5-10 dB SNR (relative to the tone's power). The
spectrogram is a numpy STFT (periodic Hann, n_fft 256, hop 120 -> 32 frames) through
a hand-made 32-band triangular mel filterbank (300-3400 Hz, the telephone band),
log(1e-6 + mel), normalised with fixed constants measured on the train split.
Difficulty knob (source_args): `snr_db=(low, high)` draws the SNR from another range
(imp_tiny.py:hard uses (-16, -10)).
"""
from __future__ import annotations

import numpy as np

from moe_jax.data import spectrogram
from moe_jax.data.digits import check_split
from moe_jax.data.text import DIGIT_NAMES, ByteTokenizer

SPLITS: tuple[str, ...] = ("train", "test")
SIZES = {"train": 2000, "test": 400}
SAMPLE_RATE = 8000
CLIP_SAMPLES = 4000  # 0.5 s
N_FFT, HOP, NUM_FRAMES, NUM_MELS = 256, 120, 32, 32  # 1 + (4000 - 256) // 120 == 32
F_MIN, F_MAX = 300.0, 3400.0
TEXT_LENGTH = 32
# mean / std of log(1e-6 + mel) over train examples 0..999 (fixed, not per batch).
LOGMEL_MEAN, LOGMEL_STD = -8.56, 1.77
_SALT = 21

# Standard DTMF keypad: digit -> (row Hz, column Hz).
DTMF_FREQS: dict[int, tuple[float, float]] = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}

TONE_TEMPLATES: tuple[str, ...] = (
    "the keypad tone of {name}",
    "the phone key {name} pressed",
    "a dial tone for the digit {digit}",
    "the touch-tone sound of {name}",
    "pressing {digit} on a telephone keypad",
)


def dtmf_tone(digit: int, num_samples: int, *, amplitude: float = 1.0,
              phases: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Noiseless DTMF tone float32[num_samples]: mean of the row and column sines."""
    t = np.arange(num_samples, dtype=np.float32) / np.float32(SAMPLE_RATE)  # float32: 5x faster sin
    row, col = DTMF_FREQS[digit]
    wave = (np.sin(np.float32(2 * np.pi * row) * t + np.float32(phases[0]))
            + np.sin(np.float32(2 * np.pi * col) * t + np.float32(phases[1])))
    return np.float32(0.5 * amplitude) * wave


def synthesize(digit: int, rng: np.random.Generator,
               snr_db: tuple[float, float] = (5.0, 10.0)) -> np.ndarray:
    """A 0.5 s clip float32[4000]: a random DTMF burst of `digit` in white noise."""
    duration = int(rng.uniform(0.15, 0.35) * SAMPLE_RATE)
    onset = int(rng.integers(0, CLIP_SAMPLES - duration + 1))
    amplitude = rng.uniform(0.1, 1.0)
    snr = rng.uniform(*snr_db)
    tone = dtmf_tone(digit, duration, amplitude=amplitude, phases=tuple(rng.uniform(0, 2 * np.pi, 2)))
    noise_std = np.sqrt(amplitude**2 / 4 / 10 ** (snr / 10))  # tone power is amplitude**2 / 4
    clip = rng.standard_normal(CLIP_SAMPLES, dtype=np.float32) * np.float32(noise_std)
    clip[onset:onset + duration] += tone
    return clip


def mel_filterbank() -> np.ndarray:
    """The 32-band telephone-band filterbank float32[32, 129] of the DTMF spectrograms."""
    return spectrogram.mel_filterbank(NUM_MELS, N_FFT, SAMPLE_RATE, F_MIN, F_MAX)


def log_mel(clips: np.ndarray) -> np.ndarray:
    """float32[..., 4000] waveforms -> normalised log-mel float32[..., 32 frames, 32 mels]."""
    mel = spectrogram.log_mel(clips, sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP,
                              num_mels=NUM_MELS, f_min=F_MIN, f_max=F_MAX)
    return (mel - np.float32(LOGMEL_MEAN)) / np.float32(LOGMEL_STD)


class DtmfAudio:
    """{"audio": float32[32, 32] (frames, mels), "label": int32[], "text": int32[32]}."""

    modalities: tuple[str, ...] = ("audio", "text")
    splits: tuple[str, ...] = SPLITS
    num_classes: int = 10
    class_names: list[str] = DIGIT_NAMES

    def __init__(self, split: str = "train", size: int | None = None,
                 snr_db: tuple[float, float] = (5.0, 10.0)):
        check_split(split, SPLITS)
        if not hasattr(snr_db, "__len__") or len(snr_db) != 2 or not snr_db[0] <= snr_db[1]:
            raise ValueError(f"snr_db={snr_db!r} must be (low, high) dB with low <= high")
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.split = split
        self.size = SIZES[split] if size is None else size
        self._split_id = SPLITS.index(split)
        self.tokenizer = ByteTokenizer()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"example {i} out of range [0, {self.size})")
        rng = np.random.default_rng([_SALT, self._split_id, i])
        label = i % self.num_classes  # balanced classes
        caption = TONE_TEMPLATES[int(rng.integers(len(TONE_TEMPLATES)))].format(
            name=DIGIT_NAMES[label], digit=label)
        return {
            "audio": log_mel(synthesize(label, rng, self.snr_db)),
            "label": np.int32(label),
            "text": self.tokenizer.encode(caption, TEXT_LENGTH),
        }
