"""Write examples as a TFDS dataset in the array_record format, without TensorFlow.

`write_tfds_dataset("my_sounds", features, {"train": examples, "test": ...}, data_dir)`
prepares `data_dir/my_sounds/1.0.0/` so that `make_source("tfds:my_sounds:train",
data_dir=data_dir)` reads it, exactly like a dataset made with `tfds build
--file_format=array_record`. Tests use it for tiny datasets; users can use it for
their own files (images as PIL images, paths or encoded bytes; audio as int16 arrays
in a `tfds.features.Tensor(shape=(None,), dtype=np.int16)`: TFDS's Audio feature
needs TensorFlow to write).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def write_tfds_dataset(name: str, features: Any, splits: Mapping[str, Iterable[Mapping[str, Any]]],
                       data_dir: str, version: str = "1.0.0") -> str:
    """Writes every split's examples (dicts matching `features`); returns the dataset path."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 -- heavy, only when writing

    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"TFDS dataset name {name!r} must be a lower-case identifier")
    split_examples = {split: list(examples) for split, examples in splits.items()}
    dataset_name = name

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name  # not registered: a process may write many datasets
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in split_examples}

        def _generate_examples(self, split):
            for i, example in enumerate(split_examples[split]):
                yield i, dict(example)

    builder = _Builder(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir
