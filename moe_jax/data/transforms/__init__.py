"""Named, composable preprocessing transforms selected per task in config.

`build_transforms("decode_image|resize(36)|random_crop(32)|flip|value_range", training=True)`
-> a callable `(example, rng) -> example`. Registered names (see each module):
features: keep, drop, rename; image/video: decode_image, value_range, resize,
center_crop, random_crop, flip, normalize, sample_frames; audio: audio_to_float,
resample, pad_crop, log_mel, standardize; text: tokenize, caption.
A new transform is a `Transform` subclass decorated with `@register("name")` in a
module imported here.
"""
from moe_jax.data.transforms import audio, features, image, text  # noqa: F401  (registers)
from moe_jax.data.transforms.base import (MASK_SUFFIX, TRANSFORMS, Pipeline, Transform,
                                          TransformError, build_transforms, register, split_spec)

__all__ = ["MASK_SUFFIX", "TRANSFORMS", "Pipeline", "Transform", "TransformError",
           "build_transforms", "register", "split_spec"]
