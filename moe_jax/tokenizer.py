"""Byte-level text tokenizer shared by models (zero-shot prompts) and data (captions).

id = utf-8 byte + 1; id 0 is padding. Lives at the top of the package so models
need not import the data pipeline.
"""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """Byte-level tokenizer: id = utf-8 byte + 1, id 0 is padding."""

  pad_id: int = 0
  vocab_size: int = 257

  def encode(self, text: str, length: int) -> np.ndarray:
    """`text` -> int32[length], truncated or right-padded with 0."""
    return self.encode_bytes(text.encode("utf-8"), length)

  def encode_bytes(self, data: bytes, length: int | None = None) -> np.ndarray:
    """Raw bytes -> int32 ids; padded/truncated to `length` when given."""
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + 1
    if length is None:
      return ids
    out = np.zeros(length, np.int32)
    n = min(length, ids.size)
    out[:n] = ids[:n]
    return out

  def decode(self, ids: np.ndarray) -> str:
    """int ids -> text; padding (0) is dropped, invalid utf-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[ids > 0]
    return bytes((ids - 1).astype(np.uint8).tolist()).decode("utf-8", errors="replace")
