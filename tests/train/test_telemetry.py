"""Per-layer, per-expert telemetry: the step's extraction and the log window's summary."""
import jax.numpy as jnp
import numpy as np

from moe_jax.train.metrics import LoadWindow
from moe_jax.train.step import layer_telemetry


def _call(load, dropped, entropy):
  return {"expert_load_E": jnp.asarray(load), "dropped_slot_fraction": jnp.asarray(dropped),
          "router_entropy": jnp.asarray(entropy), "z_loss": jnp.asarray(9.0)}


def test_layer_telemetry_averages_calls_and_splits_scanned_layers():
  coll = {"moe_metrics": {
      "encoder": {"layers": {"block_1": {"moe": {"moe": (
          _call([0.5, 0.5, 0.0], 0.1, 1.0), _call([0.25, 0.25, 0.5], 0.3, 2.0))}}},
                  "scan_0": {"block_0": {"moe": {"moe": (
                      _call([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], [0.0, 0.2], [0.5, 0.7]),)}}}}}}
  t = layer_telemetry(coll)
  np.testing.assert_allclose(t["moe_layers/encoder/block_1/moe/expert_load_E"], [0.375, 0.375, 0.25])
  np.testing.assert_allclose(t["moe_layers/encoder/block_1/moe/dropped_slot_fraction"], 0.2)
  np.testing.assert_allclose(t["moe_layers/encoder/block_1/moe/router_entropy"], 1.5)
  np.testing.assert_allclose(t["moe_layers/encoder/scan_0/block_0/moe[1]/expert_load_E"],
                             [0.0, 0.5, 0.5])
  np.testing.assert_allclose(t["moe_layers/encoder/scan_0/block_0/moe[1]/dropped_slot_fraction"], 0.2)
  assert not any("z_loss" in k for k in t)
  assert len(t) == 9


def test_load_window_max_over_mean_and_dead_experts():
  w = LoadWindow()
  w.add({"a": [0.5, 0.5, 0.0, 0.0], "b": [0.25] * 4})
  w.add({"a": [0.7, 0.3, 0.0, 0.0], "b": [0.25] * 4})
  scalars, loads = w.pop()
  # a: mean load [0.6, 0.4, 0, 0], mean 0.25 -> max/mean 2.4; experts 2, 3 never used.
  assert loads["a"] == [0.6, 0.4, 0.0, 0.0]
  np.testing.assert_allclose(scalars["a/max_over_mean_load"], 2.4)
  assert scalars["a/dead_experts"] == 2 and scalars["b/dead_experts"] == 0
  np.testing.assert_allclose(scalars["b/max_over_mean_load"], 1.0)
  assert w.pop() == ({}, {})  # the window starts afresh
