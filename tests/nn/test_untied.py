"""Modality-untied layers (Mixture-of-Transformers, arXiv:2411.04996): each modality's weights
on its own tokens with one global attention, against a reference written by hand (outputs
and gradients); the per-example modality fallback; the per-token modality reaching MoE
routers; config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import MoEConfig, TransformerConfig
from moe_jax.nn.context import Context
from moe_jax.nn.transformer import TransformerStack

B, S, D, H = 2, 6, 16, 2
Q = D // H
EPS = 1e-6
MODALITY = jnp.array([[0, 1, 1, 0, 2, 2], [2, 0, 0, 1, 1, 1]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1, 0], [1] * S], bool)


def _cfg(**kw):
  return TransformerConfig(**{"num_layers": 2, "d_model": D, "num_heads": H, "mlp_dim": 24,
                              "untied_layers": (0,), "num_modalities": 3, **kw})


def _init(stack, x, context):
  params = stack.init(jax.random.key(1), x, mask_BS=MASK, context=context)["params"]
  # Non-trivial norm scales, so a norm taken from the wrong modality shows.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p * (1 + jax.random.uniform(jax.random.key(len(str(path))), p.shape))
      if path[-1].key == "scale" else p, params)


def _rms(x, scale):
  scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * scale


def _swiglu(x, m):
  gate = x @ m["w_gate_DF"]
  return (gate * jax.nn.sigmoid(gate) * (x @ m["w_up_DF"])) @ m["w_down_FD"]


def _untied_reference(p, x, modality, mask, causal):
  """Token by token: its modality's norm and projections; one softmax attention over all
  tokens of the example; its modality's output projection, norm and FFN."""
  rows = []
  for b in range(B):
    mods = [p[f"modality_{int(m)}"] for m in modality[b]]
    qkv = jnp.stack([jnp.einsum("D,DZHQ->ZHQ", _rms(x[b, t], w["attention_norm"]["scale"]),
                                w["w_qkv_D3HQ"]) for t, w in enumerate(mods)])  # [S, 3, H, Q]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    if causal:  # RoPE as the decoder uses it (positions 0..S-1)
      from moe_jax.nn.attention import apply_rope
      q = apply_rope(q[None], jnp.arange(S)[None])[0]
      k = apply_rope(k[None], jnp.arange(S)[None])[0]
    scores = jnp.einsum("SHQ,THQ->HST", q, k) / np.sqrt(Q)
    allowed = mask[b][None, :] & (jnp.tril(jnp.ones((S, S), bool)) if causal else True)
    scores = jnp.where(allowed[None], scores, -1e30)
    o = jnp.einsum("HST,THQ->SHQ", jax.nn.softmax(scores, -1), v)
    h = jnp.stack([x[b, t] + jnp.einsum("HQ,HQD->D", o[t], w["w_out_HQD"])
                   for t, w in enumerate(mods)])
    rows.append(jnp.stack([h[t] + _swiglu(_rms(h[t], w["ffn_norm"]["scale"]), w["mlp"])
                           for t, w in enumerate(mods)]))
  return jnp.stack(rows)


def _dense_reference(p, x, mask):
  """An ordinary (tied) encoder block."""
  a = p["attention"]
  q, k, v = (jnp.einsum("BSD,DHQ->BHSQ", _rms(x, p["attention_norm"]["scale"]),
                        a["w_qkv_D3HQ"][:, j]) for j in range(3))
  scores = jnp.where(mask[:, None, None, :], jnp.einsum("BHSQ,BHTQ->BHST", q, k) / np.sqrt(Q),
                     -1e30)
  h = x + jnp.einsum("BHST,BHTQ,HQD->BSD", jax.nn.softmax(scores, -1), v, a["w_out_HQD"])
  return h + _swiglu(_rms(h, p["ffn_norm"]["scale"]), p["mlp"])


@pytest.mark.parametrize("causal", [False, True])
def test_untied_layer_equals_each_modality_on_its_own_tokens_with_shared_attention(causal):
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  context = Context(modality_BS=MODALITY)
  stack = TransformerStack(_cfg(causal=causal))
  params = _init(stack, x, context)
  assert set(params["layers"]["block_0"]) == {"modality_0", "modality_1", "modality_2"}
  cot = jax.random.normal(jax.random.key(2), (B, S, D))

  def ours(p):
    return jnp.sum(stack.apply({"params": p}, x, mask_BS=MASK, context=context) * cot)

  def ref(p):
    h = _untied_reference(p["layers"]["block_0"], x, MODALITY, MASK, causal)
    # Layer 1 is an ordinary block (the float64 attention reference has no RoPE).
    h = _layer1(stack, p, h) if causal else _dense_reference(p["layers"]["block_1"], h, MASK)
    return jnp.sum(_rms(h, p["final_norm"]["scale"]) * cot)

  np.testing.assert_allclose(ours(params), ref(params), rtol=1e-4)
  g, g_ref = jax.grad(ours)(params), jax.grad(ref)(params)
  flat, flat_ref = jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)
  for (path, a), b in zip(flat, flat_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  # A modality's weights learn from its own tokens only: with no token of modality 2, its
  # weights get exactly zero gradient.
  only01 = jnp.where(MODALITY == 2, 0, MODALITY)
  g01 = jax.grad(lambda p: jnp.sum(stack.apply({"params": p}, x, mask_BS=MASK,
                                               context=Context(modality_BS=only01)) * cot))(params)
  assert all(float(jnp.abs(leaf).max()) == 0.0
             for leaf in jax.tree.leaves(g01["layers"]["block_0"]["modality_2"]))
  assert float(jnp.abs(g01["layers"]["block_0"]["modality_1"]["w_qkv_D3HQ"]).max()) > 0


def _layer1(stack, params, h):
  """Layer 1 (an ordinary dense decoder block) applied on its own, via the library's Block:
  the causal test pins the untied layer; the dense block is pinned by test_transformer."""
  from moe_jax.nn.transformer import Block
  block = Block(stack.config)
  return block.apply({"params": params["layers"]["block_1"]}, h, MASK)


def test_per_example_modality_is_the_fallback():
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  stack = TransformerStack(_cfg())
  ids = jnp.array([2, 0], jnp.int32)
  per_example = Context(modality_id=ids)
  params = _init(stack, x, per_example)
  y = stack.apply({"params": params}, x, mask_BS=MASK, context=per_example)
  per_token = Context(modality_BS=jnp.broadcast_to(ids[:, None], (B, S)))
  np.testing.assert_array_equal(y, stack.apply({"params": params}, x, mask_BS=MASK,
                                               context=per_token))
  # ... and the modality matters: the other assignment gives another output.
  swapped = stack.apply({"params": params}, x, mask_BS=MASK, context=Context(modality_id=ids[::-1]))
  assert np.abs(np.asarray(swapped - y)).max() > 1e-3
  with pytest.raises(ValueError, match="an untied \\(per-modality\\) layer needs the context's "
                                       "modality"):
    stack.apply({"params": params}, x, mask_BS=MASK)


def test_per_token_modality_reaches_moe_routers_as_modality_id():
  ctx = Context(task_id=jnp.array([3, 4]), modality_BS=MODALITY)
  tok = ctx.per_token(B * S)
  np.testing.assert_array_equal(tok.modality_id, MODALITY.reshape(-1))
  np.testing.assert_array_equal(tok.task_id, [3] * S + [4] * S)
  assert tok.modality_BS is None
  with pytest.raises(ValueError, match=r"context.modality_BS has shape \(2, 6\), not one value "
                                       r"per token of the 10 tokens"):
    ctx.per_token(10)


MOE = MoEConfig(num_experts=4, expert_hidden_dim=8)


@pytest.mark.parametrize("fields, message", [
    (dict(moe=MOE, moe_layers=(0,)), r"layers \[0\] are both untied and MoE"),
    (dict(attention="moh"), r"untied_layers support plain multi-head attention only; unset "
                            r"attention='moh'"),
    (dict(num_kv_heads=1, qk_norm="head"), r"unset num_kv_heads, qk_norm"),
    (dict(untied_layers=(2,)), r"untied_layers\[i\]=2 is out of range"),
    (dict(num_modalities=0), r"num_modalities=0 is out of range"),
])
def test_bad_untied_settings_fail_in_one_line(fields, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**fields)


def test_untied_layers_refuse_kv_cache_decoding():
  stack = TransformerStack(_cfg(causal=True))
  x = jnp.ones((1, 3, D))
  with pytest.raises(ValueError, match="untied_layers do not support KV-cache decoding"):
    stack.init(jax.random.key(0), x, context=Context(modality_id=jnp.zeros((1,), jnp.int32)),
               decode=True)


@pytest.mark.parametrize("variant", [dict(untied_layers=(0, 2)),
                                     dict(untied_layers=(), attention="moh")],
                         ids=["untied", "moh"])
def test_scanned_stack_equals_loop(variant):
  """scan_layers (+ remat) over [untied, MoE] x 2, or MoH blocks: the loop's outputs, sown
  aux losses and gradients."""
  from moe_jax.nn.losses import sum_aux_losses
  from tests.nn.test_transformer import _stack_to_scanned
  moe = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=8,
                  dispatch="sorted")
  cfg = lambda **kw: _cfg(num_layers=4, moe=moe, moe_every=2, num_heads=4, **variant, **kw)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  ctx = Context(modality_BS=MODALITY)
  loop, scanned = TransformerStack(cfg()), TransformerStack(cfg(scan_layers=True, remat=True))
  params = loop.init(jax.random.key(1), x, context=ctx)["params"]
  untied = set(loop.config.untied_layers)
  pattern = tuple((i % 2 == 1, i in untied) if untied else i % 2 == 1 for i in range(4))
  sparams = _stack_to_scanned(params, pattern)
  assert jax.tree.structure(sparams) == jax.tree.structure(
      scanned.init(jax.random.key(1), x, context=ctx)["params"])
  run = lambda m, p: m.apply({"params": p}, x, mask_BS=MASK, context=ctx, mutable=["aux_loss"])
  (y_loop, st_loop), (y_scan, st_scan) = run(loop, params), run(scanned, sparams)
  np.testing.assert_allclose(y_scan, y_loop, rtol=1e-5, atol=1e-5)
  assert sum_aux_losses(st_loop) > 0  # the stacks sowed their balance losses
  np.testing.assert_allclose(sum_aux_losses(st_scan), sum_aux_losses(st_loop), rtol=1e-5)
  g = lambda m, p: jax.grad(lambda p: jnp.sum(run(m, p)[0] ** 3))(p)
  for a, b in zip(jax.tree.leaves(g(scanned, sparams)),
                  jax.tree.leaves(_stack_to_scanned(g(loop, params), pattern))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
