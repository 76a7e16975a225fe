"""Deterministic, resumable batching of a random-access source (numpy only).

The global stream is a pure function of (seed, position):
- epoch e visits `np.random.default_rng([seed, e]).permutation(N)` (or 0..N-1 when
  not shuffling);
- global batch b of an epoch is the examples at epoch positions [b*B, (b+1)*B);
- process p of P keeps the contiguous slice [p*B/P, (p+1)*B/P) of it;
- the optional `transform(example, rng)` gets
  `rng = np.random.default_rng([seed, e * N + epoch_position])`.
So the iterator's whole state is the number of batches consumed (`get_state()`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]


class BatchIterator:
    """Infinite iterator over global batches (this process's slice), epoch after epoch."""

    def __init__(self, source: Any, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True, transform: Transform | None = None,
                 process_index: int = 0, process_count: int = 1, name: str = "batch"):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.shuffle, self.drop_remainder, self.transform = shuffle, drop_remainder, transform
        self.process_index, self.process_count = process_index, process_count
        self.name = name  # says whose batch it is in errors (the task)
        self.num_examples = len(source)
        if drop_remainder:
            self.batches_per_epoch = self.num_examples // batch_size
        else:
            self.batches_per_epoch = -(-self.num_examples // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"source has {self.num_examples} examples: not one batch of "
                             f"{batch_size} (drop_remainder={drop_remainder})")
        self._position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None  # (epoch, order)

    # --- state -------------------------------------------------------------------------
    def get_state(self) -> dict[str, int]:
        """{"position": batches consumed}; enough to resume exactly."""
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._position = int(state["position"])

    # --- pure access -------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch_at(self, position: int) -> Example:
        """The batch number `position` of the stream (pure: does not move the iterator)."""
        epoch, b = divmod(position, self.batches_per_epoch)
        start = b * self.batch_size
        stop = min(start + self.batch_size, self.num_examples)
        local = np.array_split(np.arange(start, stop), self.process_count)[self.process_index]
        order = self._order(epoch)
        examples = [self.source[int(order[j])] for j in local]
        if self.transform is not None:
            examples = [
                self.transform(ex, np.random.default_rng([self.seed, epoch * self.num_examples + int(j)]))
                for ex, j in zip(examples, local)]
        if not examples:  # a short final batch can leave a process nothing: empty arrays
            template = self.source[int(order[0])]
            return {k: np.stack([np.asarray(v)])[:0] for k, v in template.items()}
        return {k: self._stack(k, [ex[k] for ex in examples]) for k in examples[0]}

    def _stack(self, key: str, values: list) -> np.ndarray:
        try:
            return np.stack(values)
        except (ValueError, TypeError) as e:
            shapes = sorted({str(np.shape(v)) for v in values})
            dtypes = sorted({str(np.asarray(v).dtype) for v in values})
            raise ValueError(
                f"{self.name}: feature {key!r} cannot be stacked into a batch: examples have "
                f"shapes {', '.join(shapes)} and dtypes {', '.join(dtypes)} (pad, crop or "
                f"resize them to one shape, or drop the feature with source_args.feature_map)"
            ) from e

    # --- iteration ---------------------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Example:
        batch = self.batch_at(self._position)
        self._position += 1
        return batch

    def epoch_batches(self, epoch: int = 0) -> Iterator[Example]:
        """One pass over epoch `epoch` (for eval); leaves the iterator's state alone."""
        for b in range(self.batches_per_epoch):
            yield self.batch_at(epoch * self.batches_per_epoch + b)
