"""Tiny TFDS datasets written in the test (array_record, no TensorFlow): variable-size
images, variable-length int16 audio and text, each with class names."""
from __future__ import annotations

import numpy as np

NAMES = ["red", "green", "blue"]
SPLITS = {"train": 24, "test": 10}  # test: batches of 4 leave a partial batch of 2


def _image(label: int, rng: np.random.Generator):
    from PIL import Image

    h, w = (int(v) for v in rng.integers(8, 21, 2))  # 8..20 pixels a side, any aspect
    pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    pixels[..., label] += 150  # the class is the dominant colour
    return Image.fromarray(pixels)


def _audio(label: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(3000, 12000))  # 0.4 to 1.5 s at 8 kHz: padded and cropped
    t = np.arange(n) / 8000.0
    wave = np.sin(2 * np.pi * (400 + 600 * label) * t) + 0.1 * rng.standard_normal(n)
    return (8000 * wave).astype(np.int16)


def write_all(data_dir: str) -> None:
    import tensorflow_datasets as tfds

    from moe_jax.data.tfds_writer import write_tfds_dataset

    label = tfds.features.ClassLabel(names=NAMES)
    features = {
        "tiny_images": {"image": tfds.features.Image(shape=(None, None, 3)), "label": label,
                        "file_name": tfds.features.Text()},  # a string the model never sees
        "tiny_speech": {"audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                        "label": label},
        "tiny_text": {"text": tfds.features.Text(), "label": label},
    }
    make = {
        "tiny_images": lambda y, rng, i: {"image": _image(y, rng), "label": y,
                                         "file_name": f"img_{i}.png"},
        "tiny_speech": lambda y, rng, i: {"audio": _audio(y, rng), "label": y},
        "tiny_text": lambda y, rng, i: {"text": f"this one is {NAMES[y]} number {i}", "label": y},
    }
    for name, feats in features.items():
        splits = {}
        for split, size in SPLITS.items():
            rng = np.random.default_rng([len(name), size])
            splits[split] = [make[name](i % 3, rng, i) for i in range(size)]
        write_tfds_dataset(name, tfds.features.FeaturesDict(feats), splits, data_dir)
