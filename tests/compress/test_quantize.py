"""Expert quantization (qwix) within its error bound, bit allocation against brute force
under the budget, and one-line errors."""
import itertools

import numpy as np
import pytest

from moe_jax.compress import allocate_bits, expert_banks, quantize_matrix, quantize_params
from moe_jax.compress.quantize import packed_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantized_weights_are_within_half_a_step_of_their_group(bits):
  rng = np.random.default_rng(bits)
  w = rng.normal(size=(64, 6)).astype(np.float32)
  w[5, 2] = 9.0  # an outlier widens only its own group's step (rows 0..31, column 2)
  q = quantize_matrix(w, bits, group_size=32)
  # Symmetric absmax: step = absmax of (32 rows of one column) / (2^(bits-1) - 0.5).
  for g in range(2):
    rows = slice(32 * g, 32 * g + 32)
    step = np.abs(w[rows]).max(0) / (2.0 ** (bits - 1) - 0.5)
    assert np.all(np.abs(q[rows] - w[rows]) <= step / 2 + 1e-6), (bits, g)
  assert np.unique(q[32:, 0]).size <= 2 ** bits  # at most 2^bits levels per group
  if bits == 8:
    np.testing.assert_allclose(q, w, atol=0.05)


def test_bit_allocation_is_the_brute_force_optimum_and_respects_the_budget():
  rng = np.random.default_rng(0)
  widths = (2, 3, 4, 8)
  for trial in range(5):
    n = 5
    imp = rng.random(n)
    err = np.sort(rng.random((n, 4)), axis=1)[:, ::-1] * np.array([1, 0.3, 0.1, 0.001])
    sizes = rng.integers(1, 4, n).astype(float)
    avg = float(rng.choice([2.5, 3.0, 4.0]))
    got = allocate_bits(imp, err, sizes, widths, avg)
    assert np.dot(sizes, got) <= avg * sizes.sum() + 1e-9
    best = min((c for c in itertools.product(range(4), repeat=n)
                if np.dot(sizes, [widths[j] for j in c]) <= avg * sizes.sum() + 1e-9),
               key=lambda c: sum(imp[i] * err[i, j] for i, j in enumerate(c)))
    want = sum(imp[i] * err[i, j] for i, j in enumerate(best))
    have = sum(imp[i] * err[i, widths.index(b)] for i, b in enumerate(got))
    assert have == pytest.approx(want, rel=1e-9, abs=1e-12), trial


def test_quantize_params_touches_only_the_listed_experts_and_counts_their_bytes():
  rng = np.random.default_rng(1)
  bank = {"w_up_EDF": rng.normal(size=(3, 32, 8)).astype(np.float32),
          "w_gate_EDF": rng.normal(size=(3, 32, 8)).astype(np.float32),
          "w_down_EFD": rng.normal(size=(3, 8, 32)).astype(np.float32)}
  params = {"decoder": {"layers": {"block_1": {"moe": {"experts": bank, "router": {}}}}}}
  (entry,) = expert_banks(params)
  assert entry["name"] == "decoder/layers/block_1/moe" and entry["num_experts"] == 3
  bits = {("decoder/layers/block_1/moe", 0): 2, ("decoder/layers/block_1/moe", 1): 8}
  out, sizes = quantize_params(params, bits, group_size=32)
  new = out["decoder"]["layers"]["block_1"]["moe"]["experts"]
  np.testing.assert_array_equal(new["w_up_EDF"][2], bank["w_up_EDF"][2])  # not listed
  assert not np.array_equal(new["w_up_EDF"][0], bank["w_up_EDF"][0])
  np.testing.assert_array_equal(params["decoder"]["layers"]["block_1"]["moe"]["experts"]
                                ["w_up_EDF"], bank["w_up_EDF"])  # the input is not changed
  per_expert = 3 * 256
  assert sizes["params"] == 3 * per_expert
  # Scales: one per column per 32-row group (w_down's 8 rows: one group).
  want = (2 * (256 * 2 / 8 + 8 * 4) + (256 * 2 / 8 + 32 * 4)  # expert 0 at 2 bits
          + 2 * (256 + 8 * 4) + (256 + 32 * 4)  # expert 1 at 8 bits
          + per_expert * 4)  # expert 2 in float32
  assert sizes["packed_bytes"] == pytest.approx(want)
  assert packed_bytes((32, 8), 4, 32) == 32 * 8 / 2 + 8 * 4


def test_unsupported_widths_and_budgets_are_one_line():
  with pytest.raises(ValueError, match=r"^5-bit quantization is not supported; widths: 2, 3, 4, 8$"):
    quantize_matrix(np.ones((4, 4)), 5, 32)
  with pytest.raises(ValueError, match=r"^avg_bits=1.5 is outside the widths' range: "
                                       r"2 <= avg_bits <= 8$"):
    allocate_bits([1.0], [[1, 0.5, 0.1, 0.0]], [1.0], (2, 3, 4, 8), 1.5)
