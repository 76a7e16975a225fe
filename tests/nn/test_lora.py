"""LoRA experts (layer "lora_moe", expert bank "lora") against plain references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.config import MoEConfig
from moe_jax.nn.dispatch import DISPATCHERS, CapacityOptions, get_dispatcher
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision
from moe_jax.nn.layers import make_moe_layer
from moe_jax.tasks import Task
from moe_jax.train import trainable

D, F, E, R = 8, 16, 4, 3


def lora_cfg(dispatch="sorted", k=2, **kw):
  return MoEConfig(num_experts=E, expert_hidden_dim=R, dispatch=dispatch, capacity_factor=4.0,
                   router=dict(name="top_k", k=k), layer=dict(name="lora_moe", mlp_dim=F), **kw)


def top_k_experts(params, x_TD, k):
  """Each token's k experts of largest router probability, in numpy."""
  logits = np.asarray(x_TD, np.float64) @ np.asarray(params["lora"]["router"]["w_DE"], np.float64)
  return np.argsort(-logits, axis=-1)[:, :k]


def reference(params, x_TD, top_TK):
  """FFN(x) + sum over the chosen experts of renormalized softmax gate * (x @ A_e) @ B_e,
  token by token (the selection fixed, the weights differentiable)."""
  mlp, lora = params["mlp"], params["lora"]
  ffn = (jax.nn.silu(x_TD @ mlp["w_gate_DF"]) * (x_TD @ mlp["w_up_DF"])) @ mlp["w_down_FD"]
  probs_TE = jax.nn.softmax(x_TD @ lora["router"]["w_DE"], axis=-1)
  rows = []
  for t in range(x_TD.shape[0]):
    top = top_TK[t]
    gate = probs_TE[t, top] / probs_TE[t, top].sum()
    rows.append(sum(gate[j] * (x_TD[t] @ lora["experts"]["w_up_EDF"][e])
                    @ lora["experts"]["w_down_EFD"][e] for j, e in enumerate(top)))
  return ffn + jnp.stack(rows)


def _init(cfg, x):
  layer = make_moe_layer(cfg, jnp.float32, jnp.float32)
  params = layer.init(jax.random.key(1), x)["params"]
  return layer, params


def test_b_starts_at_zero_so_the_layer_is_its_dense_ffn():
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  layer, params = _init(lora_cfg(), x)
  assert not np.any(params["lora"]["experts"]["w_down_EFD"])
  assert np.any(params["lora"]["experts"]["w_up_EDF"])  # A random, as in LoRA
  mlp = params["mlp"]
  x_TD = np.asarray(x, np.float64).reshape(-1, D)
  silu = lambda a: a / (1 + np.exp(-a))
  want = (silu(x_TD @ np.asarray(mlp["w_gate_DF"], np.float64)) * (x_TD @ np.asarray(
      mlp["w_up_DF"], np.float64))) @ np.asarray(mlp["w_down_FD"], np.float64)
  np.testing.assert_allclose(layer.apply({"params": params}, x).reshape(-1, D), want,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["sorted", "tiled", "einsum", "dense"])
def test_adapters_output_and_gradients_match_a_per_token_reference(dispatch):
  kx, kb, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 5, D))
  layer, params = _init(lora_cfg(dispatch), x)
  b = params["lora"]["experts"]["w_down_EFD"]  # nonzero B: the adapters now contribute
  params["lora"]["experts"]["w_down_EFD"] = jax.random.normal(kb, b.shape)
  cot = jax.random.normal(kc, (10, D))
  out = lambda p: jnp.sum(layer.apply({"params": p}, x).reshape(-1, D) * cot)
  top_TK = top_k_experts(params, x.reshape(-1, D), k=2)
  ref = lambda p: jnp.sum(reference(p, x.reshape(-1, D), top_TK) * cot)
  np.testing.assert_allclose(out(params), ref(params), rtol=1e-5)
  g, g_ref = jax.grad(out)(params), jax.grad(ref)(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert np.abs(g["lora"]["experts"]["w_up_EDF"]).max() > 0


def _lm(moe, num_layers=2, **stack):
  cfg = dict(name="lm", d_model=D, num_layers=num_layers, num_heads=2, mlp_dim=F, causal=True,
             vocab_size=11, **stack)
  if moe is not None:
    cfg.update(moe=moe, moe_every=1)
  return models.build_model(cfg)


def test_lm_with_lora_experts_equals_the_dense_lm_with_the_same_ffn_weights():
  task = Task("t", "lm", "x", modalities=("tokens",))
  batch = {"tokens": jax.random.randint(jax.random.key(0), (2, 6), 0, 11)}
  dense = _lm(None)
  dense_params = dense.init(jax.random.key(0), batch, task=task)["params"]
  lora = _lm(dict(num_experts=E, expert_hidden_dim=R, router=dict(name="top_k", k=2),
                  layer=dict(name="lora_moe", mlp_dim=F)))
  params = lora.init(jax.random.key(1), batch, task=task)["params"]
  # The dense checkpoint's block_i/mlp is the LoRA layer's block_i/moe/mlp; the rest maps 1:1.
  flat = dict(jax.tree_util.tree_flatten_with_path(dense_params)[0])
  moved = 0

  def take(path, leaf):
    nonlocal moved
    keys = [k.key for k in path]
    if "lora" in keys:
      return leaf
    if "moe" in keys:
      keys.remove("moe")
      moved += 1
    return flat[tuple(jax.tree_util.DictKey(k) for k in keys)]

  params = jax.tree_util.tree_map_with_path(take, params)
  assert moved == 2 * 3  # two layers' w_up, w_gate, w_down
  logits = lambda m, p: m.apply({"params": p}, batch["tokens"], method="logits")
  np.testing.assert_array_equal(logits(lora, params), logits(dense, dense_params))


@pytest.mark.parametrize("scan", [False, True])
def test_trainable_parameter_count_is_the_adapters_and_routers(scan):
  lm = _lm(dict(num_experts=E, expert_hidden_dim=R, layer=dict(name="lora_moe", mlp_dim=F)),
           num_layers=3, scan_layers=scan)  # scanned: one stacked leaf per weight
  params = jax.eval_shape(lambda: lm.init(jax.random.key(0), {"tokens": jnp.ones((1, 4), int)},
                                          task=Task("t", "lm", "x", modalities=("tokens",))))
  n_train, n_total = trainable.count(params["params"], ("/lora/",))
  assert n_train == 3 * (E * (D * R + R * D) + D * E)
  dense = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      lambda: _lm(None, 3).init(jax.random.key(0), {"tokens": jnp.ones((1, 4), int)},
                                task=Task("t", "lm", "x", modalities=("tokens",))))))
  assert n_total == dense + n_train


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="lora_moe needs mlp_dim"):
    MoEConfig(layer="lora_moe")
  with pytest.raises(ValueError, match="layer.mlp_dim=0 is out of range"):
    MoEConfig(layer=dict(name="lora_moe", mlp_dim=0))
  params = {"a": {"w": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"pattern\(s\) \['/lroa/'\] match no parameter"):
    trainable.trainable_mask(params, ["/lroa/"])
  with pytest.raises(ValueError, match="must be a list of regexes"):
    trainable.check_patterns("/lora/")
  with pytest.raises(ValueError, match="is not a regex"):
    trainable.check_patterns(["(lora"])


@pytest.mark.parametrize("name", DISPATCHERS.names())
def test_every_dispatcher_runs_linear_experts_like_a_numpy_loop(name):
  """y_t = sum_k w_tk (x_t @ A_e) @ B_e, with masked slots skipped (float64 loop)."""
  T, K = 12, 2
  kx, ka, kb, ki, kw = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(kx, (T, D))
  experts = ExpertWeights(w_up_EDF=jax.random.normal(ka, (E, D, R)),
                          w_down_EFD=jax.random.normal(kb, (E, R, D)), activation="linear")
  index_TK = jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(
      jax.random.split(ki, T)).astype(jnp.int32)
  weight_TK = jax.random.uniform(kw, (T, K), minval=0.1, maxval=1.0)
  mask_TK = jnp.arange(T * K).reshape(T, K) % 5 != 0
  decision = RoutingDecision(expert_index_TK=index_TK, weight_TK=weight_TK, mask_TK=mask_TK)
  y, _ = get_dispatcher(name)(x, decision, experts, CapacityOptions(float(E), None))
  a, b = (np.asarray(w, np.float64) for w in (experts.w_up_EDF, experts.w_down_EFD))
  want = np.zeros((T, D))
  for t in range(T):
    for k in range(K):
      if mask_TK[t, k]:
        e = int(index_TK[t, k])
        want[t] += float(weight_TK[t, k]) * (np.asarray(x[t], np.float64) @ a[e] @ b[e])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
