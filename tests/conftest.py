"""Suite-wide JAX settings (strict rank promotion, fast compiles on 2 CPU cores) and test
order (the longest first)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Small shapes: compile time dominates, so skip most XLA optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)

# The longest tests (a minute or more each, measured in CI) go first: pytest-xdist hands
# tests out in collection order, and collected last they left one of the two workers idle
# while the other finished them.
SLOW_FIRST = ("tests/train/test_kill_anywhere.py", "tests/parallel/test_two_processes.py",
              "tests/test_notebooks.py", "tests/data/test_tfds_training.py",
              "tests/interop/test_upcycle.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = lambda item: next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)),
                           len(SLOW_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order
