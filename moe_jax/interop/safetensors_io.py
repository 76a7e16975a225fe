"""Lazy reading and sharded writing of safetensors checkpoints (Hugging Face layout).

A directory holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: file}}). `TensorReader`
opens each file memory-mapped and reads one tensor when asked, so a checkpoint is never
loaded whole.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorReader:
  """name -> numpy array, read on demand from a (sharded) safetensors directory."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self._file_of = dict(json.load(f)["weight_map"])
    elif os.path.exists(os.path.join(directory, SINGLE)):
      with safe_open(os.path.join(directory, SINGLE), "np") as f:
        self._file_of = {name: SINGLE for name in f.keys()}
    else:
      raise ValueError(f"{directory} has no {SINGLE} and no {INDEX}")
    self._open: dict[str, object] = {}

  def names(self) -> set[str]:
    return set(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handle(name).get_slice(name).get_dtype()

  def get(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)

  def _handle(self, name: str):
    if name not in self._file_of:
      raise KeyError(name)
    file = self._file_of[name]
    if file not in self._open:
      path = os.path.join(self.directory, file)
      if not os.path.exists(path):
        raise ValueError(f"{INDEX} names {file} for {name}, but {path} does not exist")
      self._open[file] = safe_open(path, "np")
    return self._open[file]


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
    save_file(shards[0], os.path.join(directory, SINGLE), metadata={"format": "pt"})
    return [SINGLE]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    files.append(file)
    weight_map.update({name: file for name in shard})
  total = sum(int(np.asarray(t).nbytes) for t in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return files + [INDEX]
