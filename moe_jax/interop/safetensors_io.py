"""Lazy reading and sharded writing of safetensors checkpoints (Hugging Face layout).

A directory holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: file}}). `TensorReader`
memory-maps each file and reads one tensor (or one slice of it) when asked, so a
checkpoint is never loaded whole. The format is an 8-byte header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the raw bytes; it is read here directly
because safetensors' numpy loader has no bfloat16, the dtype most checkpoints ship in.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


def read_header(path: str) -> tuple[int, dict]:
  """(offset of the data, {tensor name: {"dtype", "shape", "data_offsets"}})."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  return 8 + size, header


class TensorReader:
  """name -> numpy array, read on demand from a (sharded) safetensors directory."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self._file_of = dict(json.load(f)["weight_map"])
    elif os.path.exists(os.path.join(directory, SINGLE)):
      self._file_of = {name: SINGLE for name in read_header(os.path.join(directory, SINGLE))[1]}
    else:
      raise ValueError(f"{directory} has no {SINGLE} and no {INDEX}")
    self._headers: dict[str, tuple[int, dict]] = {}

  def names(self) -> set[str]:
    return set(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entry(name)[1]["shape"])

  def dtype(self, name: str) -> str:
    return self._entry(name)[1]["dtype"]

  def get(self, name: str) -> np.ndarray:
    """A copy of the tensor (read through a memory map: only its bytes; a copy, so the
    file may be rewritten while the array lives)."""
    path, entry, start = self._entry(name)
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name} has dtype {entry['dtype']}, which is not supported")
    begin, end = entry["data_offsets"]
    if end == begin:
      return np.zeros(entry["shape"], DTYPES[entry["dtype"]])
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return np.array(raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"]))

  def _entry(self, name: str) -> tuple[str, dict, int]:
    if name not in self._file_of:
      raise KeyError(name)
    file = self._file_of[name]
    path = os.path.join(self.directory, file)
    if file not in self._headers:
      if not os.path.exists(path):
        raise ValueError(f"{INDEX} names {file} for {name}, but {path} does not exist")
      self._headers[file] = read_header(path)
    start, header = self._headers[file]
    if name not in header:
      raise ValueError(f"{INDEX} puts {name} in {file}, but that file does not hold it")
    return path, header[name], start


def write_file(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """One safetensors file (any dtype in DTYPES, bfloat16 included)."""
  names = {np.dtype(v): k for k, v in DTYPES.items()}
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  arrays = {}
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in names:
      raise ValueError(f"tensor {name} has dtype {array.dtype}, which safetensors cannot hold")
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays[name] = array
    offset += array.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for name in sorted(arrays):
      f.write(arrays[name].tobytes())


def write_tensors(directory: str, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int = 2 * 1024**3) -> list[str]:
  """Writes `tensors` as one model.safetensors or, past `max_shard_bytes`, as numbered
  shards plus the index; returns the files written."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  if len(shards) == 1:
    write_file(os.path.join(directory, SINGLE), shards[0])
    return [SINGLE]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file(os.path.join(directory, file), shard)
    files.append(file)
    weight_map.update({name: file for name in shard})
  total = sum(int(np.asarray(t).nbytes) for t in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return files + [INDEX]
