"""Deterministic, resumable batching of a random-access source, loaded with grain.

The global stream is a pure function of (seed, position):
- epoch e visits `np.random.default_rng([seed, e]).permutation(N)` (or 0..N-1 when
  not shuffling);
- global batch b of an epoch is the examples at epoch positions [b*B, (b+1)*B);
- process p of P keeps the contiguous slice [p*B/P, (p+1)*B/P) of it;
- the optional `transform(example, rng)` gets
  `rng = np.random.default_rng([seed, e * N + epoch_position])`.
So the iterator's whole state is the number of batches consumed (`get_state()`),
whatever the number of workers: a run may resume with other loader settings.

drop_remainder=False (eval) covers the whole split: the last batch is filled up to
B with copies of the epoch's last example and every batch carries "valid" (bool[B],
False on the fill), so shapes stay static and metrics can ignore the fill.

Loading: `batch_at` builds one batch synchronously (pure). Iterating goes through a
grain `MapDataset` over batch positions: `num_threads` batches are built ahead in
threads (decode and resize release the GIL), and `num_workers > 0` builds them in
worker processes instead (grain's mp_prefetch), for pipelines heavy in Python.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from moe_jax.data.transforms.base import TransformError
from moe_jax.tasks import VALID  # per-example mask of eval batches: False on the fill

Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]
_FOREVER = 1 << 62


class BatchIterator:
    """Infinite iterator over global batches (this process's slice), epoch after epoch."""

    def __init__(self, source: Any, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True, transform: Transform | None = None,
                 process_index: int = 0, process_count: int = 1, name: str = "batch",
                 num_workers: int = 0, num_threads: int = 0, prefetch: int = 2):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"{name}: batch_size={batch_size} must be >= 1 and divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if num_workers < 0 or num_threads < 0 or prefetch < 1:
            raise ValueError(f"num_workers={num_workers} and num_threads={num_threads} must be "
                             f">= 0 and prefetch={prefetch} >= 1")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.shuffle, self.drop_remainder, self.transform = shuffle, drop_remainder, transform
        self.process_index, self.process_count = process_index, process_count
        self.name = name  # says whose batch it is in errors (the task)
        self.num_workers, self.num_threads, self.prefetch = num_workers, num_threads, prefetch
        self.num_examples = len(source)
        if drop_remainder:
            self.batches_per_epoch = self.num_examples // batch_size
        else:
            self.batches_per_epoch = -(-self.num_examples // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{name}: source has {self.num_examples} examples: not one batch of "
                             f"{batch_size} (drop_remainder={drop_remainder})")
        self._position = 0
        self._stream: Iterator[Example] | None = None  # grain iterator from _position on
        self._order_cache: tuple[int, np.ndarray] | None = None  # (epoch, order)

    def __getstate__(self):  # what grain workers receive: no live iterator
        return {**self.__dict__, "_stream": None}

    # --- state -------------------------------------------------------------------------
    def get_state(self) -> dict[str, int]:
        """{"position": batches consumed}; enough to resume exactly."""
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._position = int(state["position"])
        self._stream = None

    # --- pure access -------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        cached = self._order_cache  # one read: grain threads may replace it meanwhile
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        self._order_cache = (epoch, order)
        return order

    def batch_at(self, position: int) -> Example:
        """The batch number `position` of the stream (pure: does not move the iterator)."""
        epoch, b = divmod(int(position), self.batches_per_epoch)
        per_process = self.batch_size // self.process_count
        start = b * self.batch_size + self.process_index * per_process
        local = np.arange(start, start + per_process)  # epoch positions; >= N is fill
        valid = local < self.num_examples
        order = self._order(epoch)
        n = self.num_examples
        examples = []
        for j in np.minimum(local, n - 1):
            example = self.source[int(order[j])]
            if self.transform is not None:
                rng = np.random.default_rng([self.seed, epoch * n + int(j)])
                try:
                    example = self.transform(example, rng)
                except (ValueError, ImportError) as e:  # say whose example, in one line
                    raise TransformError(f"{self.name}, example {int(order[j])}: {e}") from e
            examples.append(example)
        batch = {k: self._stack(k, [ex[k] for ex in examples]) for k in examples[0]}
        if not self.drop_remainder:
            batch[VALID] = valid
        return batch

    def _stack(self, key: str, values: list) -> np.ndarray:
        try:
            return np.stack(values)
        except (ValueError, TypeError) as e:
            shapes = sorted({str(np.shape(v)) for v in values})
            dtypes = sorted({str(np.asarray(v).dtype) for v in values})
            raise ValueError(
                f"{self.name}: feature {key!r} cannot be stacked into a batch: examples have "
                f"shapes {', '.join(shapes)} and dtypes {', '.join(dtypes)} (pad, crop or "
                f"resize them to one shape with the task's transforms, or drop the feature)"
            ) from e

    # --- iteration ---------------------------------------------------------------------
    def batches(self, start: int, stop: int = _FOREVER) -> Iterator[Example]:
        """Batches at positions [start, stop), built ahead by grain threads or workers."""
        if self.num_workers == 0 and self.num_threads == 0:
            return (self.batch_at(p) for p in range(start, stop))
        import grain  # noqa: PLC0415 -- only when loading in parallel

        ds = grain.MapDataset.range(start, stop).map(self.batch_at)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(self.num_threads, 1),
                                                  prefetch_buffer_size=self.prefetch))
        if self.num_workers:
            from absl import flags  # noqa: PLC0415

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; libraries never parse
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
        return iter(it)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Example:
        if self._stream is None:
            self._stream = self.batches(self._position)
        batch = next(self._stream)
        self._position += 1
        return batch

    def epoch_batches(self, epoch: int = 0) -> Iterator[Example]:
        """One pass over epoch `epoch` (for eval); leaves the iterator's state alone."""
        first = epoch * self.batches_per_epoch
        return self.batches(first, first + self.batches_per_epoch)

    def close(self) -> None:
        """Stops loader threads and worker processes (if any); iteration restarts where it was."""
        stream, self._stream = self._stream, None
        if hasattr(stream, "close"):
            stream.close()
