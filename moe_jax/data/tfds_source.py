"""Random-access TFDS source (`tfds.data_source`: array_record files, no TensorFlow).

Never downloads: a dataset must already be prepared in `data_dir` in the
array_record format. Anything else raises a one-line `ValueError` that says how to
prepare it on a machine with network.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _unknown_name(tfds: Any, name: str) -> str | None:
    """The one-line reason when `name` is neither a TFDS dataset nor one in data_dir."""
    import difflib  # noqa: PLC0415

    base = name.split("/")[0].split(":")[0]
    known = tfds.list_builders(with_community_datasets=False)
    if base in known:
        return None
    close = difflib.get_close_matches(base, known, n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"{base!r} is not a TFDS dataset name{hint}"


def _cause(tfds: Any, name: str, data_dir: str | None, error: Exception) -> str:
    """Short reason for a failed load: "not prepared" when that is the case."""
    try:
        if not tfds.builder(name, data_dir=data_dir, try_gcs=False).is_prepared():
            return "it is not prepared there"
    except Exception:  # noqa: BLE001 -- e.g. an unknown name: report the original error
        pass
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first_line}"


class TfdsSource:
    """`source[i]` -> {our key: numpy array} for the features named in `feature_map`.

    feature_map: our key -> TFDS feature key, e.g. {"image": "image", "label": "label"};
    None keeps every top-level feature under its own name. Image and video features
    become float32 in [0, 1]; "label" becomes int32.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 feature_map: dict[str, str] | None = None):
        import tensorflow_datasets as tfds  # heavy import, only for TFDS sources

        self.name, self.split = name, split
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                        download=False, try_gcs=False)
        except Exception as e:  # noqa: BLE001 -- tfds raises many unrelated types here
            where = data_dir or f"{tfds.core.constants.DATA_DIR} (the TFDS default)"
            unknown = _unknown_name(tfds, name)
            if unknown:  # no dataset of that name in data_dir, and TFDS has none either
                raise ValueError(
                    f"TFDS dataset {name!r} (split {split!r}) is not in data_dir={where}, "
                    f"and {unknown}: check the name, or write your own data there "
                    "(moe_jax.data.tfds_writer, README 'Train on your own TFDS "
                    "dataset')") from None
            raise ValueError(
                f"TFDS dataset {name!r} (split {split!r}) cannot be loaded offline from "
                f"data_dir={where} ({_cause(tfds, name, data_dir, e)}); on a machine with "
                f"network run `tfds build {name} --data_dir={data_dir or tfds.core.constants.DATA_DIR} "
                f"--file_format=array_record` and copy the directory here") from None
        features = self._ds.dataset_info.features
        self.feature_map = dict(feature_map) if feature_map else {k: k for k in features.keys()}
        missing = sorted(set(self.feature_map.values()) - set(features.keys()))
        if missing:
            raise ValueError(f"TFDS dataset {name!r} has no features {missing}; "
                             f"it has {sorted(features.keys())}")
        visual = (tfds.features.Image, tfds.features.Video)
        self._float_keys = {k for k, v in self.feature_map.items() if isinstance(features[v], visual)}
        label = features[self.feature_map["label"]] if "label" in self.feature_map else None
        self.class_names: list[str] = list(getattr(label, "names", None) or [])
        self.num_classes: int = len(self.class_names)
        self.modalities: tuple[str, ...] = tuple(k for k in self.feature_map if k != "label")

    def __len__(self) -> int:
        return len(self._ds)

    def _convert(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for key, tfds_key in self.feature_map.items():
            value = np.asarray(raw[tfds_key])
            if key in self._float_keys and value.dtype == np.uint8:
                value = value.astype(np.float32) / np.float32(255.0)
            elif key == "label":
                value = value.astype(np.int32)
            out[key] = value
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self._convert(self._ds[int(i)])
