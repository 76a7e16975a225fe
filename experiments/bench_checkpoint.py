r"""How long a checkpoint save blocks training, synchronous vs background writes.

  python -m experiments.bench_checkpoint

A state the size of lm_tiny's (2.30M parameters plus AdamW's two moments: 28 MB in 40
arrays) is saved 8 times per mode, 0.3 s apart (training in between); prints the median,
min and max time `Checkpointer.save` blocks. Interleaved sync / async / sync / async.
"""
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from moe_jax.train.checkpoint import Checkpointer


def main() -> None:
  rng = np.random.default_rng(0)
  state = {f"p{i}": jnp.asarray(rng.standard_normal(57_500 * 3, dtype=np.float32))
           for i in range(40)}
  for async_save in (False, True, False, True):
    ckpt = Checkpointer(tempfile.mkdtemp(), keep=2, async_save=async_save)
    ckpt.save(0, state, {"t": {"position": 0}})
    ckpt.wait()
    times = []
    for step in range(1, 9):
      t0 = time.perf_counter()
      ckpt.save(step, state, {"t": {"position": step}})
      times.append(time.perf_counter() - t0)
      time.sleep(0.3)
    ckpt.close()
    print(f"async_save={async_save}: save() blocks {np.median(times) * 1e3:.0f} ms median "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})", flush=True)


if __name__ == "__main__":
  main()
