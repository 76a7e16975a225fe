"""Log-mel spectrograms in numpy: periodic-Hann STFT frames through a triangular mel bank.

Framing has no centering or padding: frame t covers samples [t * hop, t * hop + n_fft),
so a clip of N >= n_fft samples has 1 + (N - n_fft) // hop frames, and padding a clip
at its end never changes its earlier frames (what makes padding masks exact). The
window is scaled by 1 / its sum; mel scale is HTK's 2595 log10(1 + f / 700).
"""
from __future__ import annotations

import functools

import numpy as np


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int, f_min: float,
                   f_max: float) -> np.ndarray:
    """Triangular filters float32[num_mels, n_fft // 2 + 1], equally spaced in mel, peak 1."""
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), num_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    fb = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    fb.flags.writeable = False
    return fb


def num_frames(num_samples: int, n_fft: int, hop: int) -> int:
    return 0 if num_samples < n_fft else 1 + (num_samples - n_fft) // hop


@functools.lru_cache(maxsize=None)
def _frames_and_window(frames: int, n_fft: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    index = hop * np.arange(frames)[:, None] + np.arange(n_fft)[None, :]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return index, (window / window.sum()).astype(np.float32)


def log_mel(wave: np.ndarray, *, sample_rate: int, n_fft: int, hop: int, num_mels: int,
            f_min: float, f_max: float, eps: float = 1e-6) -> np.ndarray:
    """float32[..., N] waveforms -> log(eps + mel power) float32[..., frames, num_mels]."""
    frames = num_frames(wave.shape[-1], n_fft, hop)
    if frames == 0:
        raise ValueError(f"a waveform of {wave.shape[-1]} samples is shorter than one STFT "
                         f"window (n_fft={n_fft})")
    index, window = _frames_and_window(frames, n_fft, hop)
    spectrum = np.fft.rfft(wave[..., index] * window, axis=-1)  # [..., frames, n_fft / 2 + 1]
    power = spectrum.real**2 + spectrum.imag**2
    mel = power @ mel_filterbank(num_mels, n_fft, sample_rate, f_min, f_max).T
    return np.log(eps + mel).astype(np.float32)
