"""RoPE and self-attention against hand-worked rotations and numpy attention."""
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn.attention import SelfAttention, apply_rope
from tests import reference


def _rot(v, angle):
  """Rotate the 2-vector v by `angle` radians: [[cos, -sin], [sin, cos]] @ v."""
  c, s = np.cos(angle), np.sin(angle)
  return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def test_rope_rotates_each_feature_pair_by_position_times_frequency():
  # Q=4 features: pairs (0, 2) and (1, 3) (first half with second half); the
  # frequencies are 10000^(-i/2) for i = 0, 1, i.e. 1 and 0.01 radians per position.
  x = np.array([3.0, -1.0, 4.0, 2.0], np.float32)
  positions = np.array([[0, 2, 5]])
  out = np.asarray(apply_rope(jnp.asarray(np.tile(x, (1, 3, 1, 1))), jnp.asarray(positions)))
  for s, p in enumerate(positions[0]):
    pair0 = _rot([3.0, 4.0], p * 1.0)
    pair1 = _rot([-1.0, 2.0], p * 0.01)
    np.testing.assert_allclose(out[0, s, 0], [pair0[0], pair1[0], pair0[1], pair1[1]],
                               rtol=1e-5, atol=1e-6)


def test_rope_preserves_norms():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  pos = jax.random.randint(jax.random.key(1), (2, 5), 0, 1000)
  out = apply_rope(x, pos)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  kq, kk = jax.random.split(jax.random.key(2))
  q = jax.random.normal(kq, (1, 1, 1, 8))
  k = jax.random.normal(kk, (1, 1, 1, 8))
  score = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([[m]])) *
                                     apply_rope(k, jnp.array([[n]]))))
  base = score(7, 3)
  for shift in (1, 10, 123):
    np.testing.assert_allclose(score(7 + shift, 3 + shift), base, rtol=1e-4, atol=1e-5)
  assert abs(score(7, 4) - base) > 1e-3  # and it does depend on the offset


def test_attention_with_rope_is_invariant_to_a_constant_position_shift():
  attn = SelfAttention(num_heads=2, head_dim=4, causal=True, rope=True)
  x = jax.random.normal(jax.random.key(3), (2, 6, 8))
  params = attn.init(jax.random.key(4), x)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  y0 = attn.apply(params, x, positions_BS=pos)
  y1 = attn.apply(params, x, positions_BS=pos + 37)
  np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-5)
  y_far = attn.apply(params, x, positions_BS=pos * 3)  # a different spacing does change it
  assert not np.allclose(y0, y_far, atol=1e-3)


def test_attention_matches_numpy_with_padding_mask():
  """Encoder attention (no RoPE) against softmax(q k^T / sqrt(Q)) v written in numpy."""
  H, Q, D = 2, 4, 8
  attn = SelfAttention(num_heads=H, head_dim=Q)
  x = np.asarray(jax.random.normal(jax.random.key(5), (2, 5, D)), np.float64)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = attn.init(jax.random.key(6), jnp.asarray(x, jnp.float32))
  y = attn.apply(params, jnp.asarray(x, jnp.float32), mask_BS=jnp.asarray(mask))
  want = reference.np_attention(x, params["params"]["w_qkv_D3HQ"], params["params"]["w_out_HQD"],
                                mask)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
