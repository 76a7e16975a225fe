"""Mixture-of-head attention (MoH, arXiv:2410.11842): multi-head attention when every head
is on at weight 1; the two-stage weights and the head balance loss on hand-made routing
tables; outputs and gradients against an independent per-head reference; config errors;
cached decoding equals full-sequence logits."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import TransformerConfig
from moe_jax.nn import losses
from moe_jax.nn.attention import MoHAttention, SelfAttention
from moe_jax.nn.attention.moh import head_balance_loss, head_weights

B, S, D, H, Q = 2, 5, 16, 4, 4
MASK = jnp.array([[1, 1, 1, 0, 0], [1] * S], bool)


def _x():
  return jax.random.normal(jax.random.key(0), (B, S, D))


def _params(module, x, scale_routers=None):
  p = dict(module.init(jax.random.key(1), x, mask_BS=MASK)["params"])
  for name in ("w_shared_DH", "w_routed_DH", "w_stage_D2"):
    if name in p and scale_routers is not None:
      p[name] = p[name] * scale_routers
  return p


@pytest.mark.parametrize("shared, k", [(H, None), (0, H), (2, 2)],
                         ids=["all_shared", "all_routed", "two_and_two"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_head_on_at_unit_weight_is_multi_head_attention(shared, k, causal):
  """With routers at 0 (uniform softmaxes) and every head active, unit_scale gives each head
  weight 1: the output is SelfAttention's from the same q/k/v/o weights."""
  x = _x()
  moh = MoHAttention(H, Q, causal=causal, rope=causal, shared_heads=shared, k=k)
  params = _params(moh, x, scale_routers=0.0)
  mha = SelfAttention(H, Q, causal=causal, rope=causal)
  want = mha.apply({"params": {n: params[n] for n in ("w_qkv_D3HQ", "w_out_HQD")}}, x,
                   mask_BS=MASK)
  got = moh.apply({"params": params}, x, mask_BS=MASK)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A non-uniform router changes it (the weights do reach the output).
  bent = moh.apply({"params": _params(moh, x, scale_routers=3.0)}, x, mask_BS=MASK)
  assert np.abs(np.asarray(bent - want)).max() > 1e-3


def test_two_stage_weights_on_a_hand_made_table():
  """One shared head, three routed heads, k=1; probabilities chosen by hand (logits = log p)."""
  routed_p = np.array([[.5, .3, .2], [.1, .6, .3]])
  stage_p = np.array([[.25, .75], [.5, .5]])
  shared_logits = jnp.zeros((2, 1))
  args = (shared_logits, jnp.log(routed_p), jnp.log(stage_p), 1)
  g, probs, chosen = head_weights(*args, unit_scale=False)  # the formula as printed
  np.testing.assert_allclose(g, [[.25, .75 * .5, 0, 0], [.5, 0, .5 * .6, 0]], rtol=1e-6)
  np.testing.assert_allclose(probs, routed_p, rtol=1e-6)
  np.testing.assert_array_equal(chosen, [[1, 0, 0], [0, 1, 0]])
  g, _, _ = head_weights(*args, unit_scale=True)  # x h_s, renormalised x k, stages x 2
  np.testing.assert_allclose(g, [[.5, 1.5, 0, 0], [1, 0, 1, 0]], rtol=1e-6)
  # k=2: the two largest, renormalised over them.
  g, _, chosen = head_weights(shared_logits, jnp.log(routed_p), jnp.log(stage_p), 2)
  np.testing.assert_array_equal(chosen, [[1, 1, 0], [0, 1, 1]])
  np.testing.assert_allclose(g[0], [.5, 1.5 * 2 * .5 / .8, 1.5 * 2 * .3 / .8, 0], rtol=1e-6)


def test_head_balance_loss_on_a_hand_made_table():
  p = np.array([[.5, .3, .2], [.1, .6, .3], [.7, .2, .1], [.25, .15, .6]])
  chosen = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)
  # f = (2/4, 1/4, 1/4), P = (1.55, 1.25, 1.2) / 4; 3 * sum f P.
  np.testing.assert_allclose(head_balance_loss(jnp.asarray(p), jnp.asarray(chosen)),
                             3 * (.5 * 1.55 / 4 + .25 * 1.25 / 4 + .25 * 1.2 / 4), rtol=1e-6)
  # The last token is padding: f = (2/3, 1/3, 0), P = (1.3, 1.1, .6) / 3.
  valid = jnp.array([1, 1, 1, 0], jnp.float32)
  np.testing.assert_allclose(head_balance_loss(jnp.asarray(p), jnp.asarray(chosen), valid),
                             3 * (2 / 3 * 1.3 / 3 + 1 / 3 * 1.1 / 3), rtol=1e-6)
  # A uniform router over 3 heads choosing 1: the loss is k = 1.
  uniform = jnp.full((3, 3), 1 / 3)
  np.testing.assert_allclose(head_balance_loss(uniform, jnp.eye(3)), 1.0, rtol=1e-6)


def _reference(params, x, mask, shared, k, unit_scale):
  """MoH written out head by head (jnp, so it has gradients): per-head softmax attention,
  the two-stage weights, sum_i g_i H^i W_O^i."""
  w_qkv, w_out = params["w_qkv_D3HQ"], params["w_out_HQD"]
  x_TD = x.reshape(-1, D)
  softmax = lambda z: jnp.exp(z - z.max(-1, keepdims=True)) / jnp.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p_s = (softmax(x_TD @ params["w_shared_DH"]) if "w_shared_DH" in params
         else jnp.ones((B * S, 1)))  # one shared head has no router
  p_r = softmax(x_TD @ params["w_routed_DH"])
  a = softmax(x_TD @ params["w_stage_D2"])
  rank = jnp.argsort(jnp.argsort(-p_r, axis=-1), axis=-1)  # 0 = largest
  top = (rank < k).astype(x.dtype)
  if unit_scale:
    g_s = 2 * a[:, :1] * shared * p_s
    g_r = 2 * a[:, 1:] * k * p_r * top / (p_r * top).sum(-1, keepdims=True)
  else:
    g_s, g_r = a[:, :1] * p_s, a[:, 1:] * p_r * top
  g = jnp.concatenate([g_s, g_r], -1).reshape(B, S, H)
  out = jnp.zeros((B, S, D))
  for h in range(H):
    q, kk, v = (jnp.einsum("BSD,DQ->BSQ", x, w_qkv[:, j, h]) for j in range(3))
    s = jnp.einsum("BSQ,BTQ->BST", q, kk) / np.sqrt(Q)
    s = jnp.where(mask[:, None, :], s, -1e30)
    head = jnp.einsum("BST,BTQ->BSQ", softmax(s), v)
    out = out + g[:, :, h, None] * jnp.einsum("BSQ,QD->BSD", head, w_out[h])
  lb_valid = mask.reshape(-1).astype(jnp.float32)
  f = (top * lb_valid[:, None]).sum(0) / lb_valid.sum()
  P = (p_r * lb_valid[:, None]).sum(0) / lb_valid.sum()
  return out, (H - shared) * jnp.sum(f * P)


@pytest.mark.parametrize("unit_scale", [True, False])
def test_outputs_gradients_and_aux_loss_equal_a_per_head_reference(unit_scale):
  x = _x()
  moh = MoHAttention(H, Q, shared_heads=1, k=2, unit_scale=unit_scale, balance_weight=0.5)
  params = _params(moh, x, scale_routers=4.0)  # sharp routers: distinct weights per token
  cot = jax.random.normal(jax.random.key(2), (B, S, D))

  def ours(p):
    y, coll = moh.apply({"params": p}, x, mask_BS=MASK, mutable=["aux_loss", "moe_metrics"])
    return jnp.sum(y * cot) + losses.sum_aux_losses(coll), (y, coll)

  def ref(p):
    y, lb = _reference(p, x, MASK, 1, 2, unit_scale)
    return jnp.sum(y * cot) + 0.5 * lb, (y, lb)

  (_, (y, coll)), g = jax.value_and_grad(ours, has_aux=True)(params)
  (_, (y_ref, lb_ref)), g_ref = jax.value_and_grad(ref, has_aux=True)(params)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  metrics = coll["moe_metrics"]["moh"][0]
  np.testing.assert_allclose(metrics["head_balance_loss"], lb_ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["active_head_fraction"], 3 / 4, rtol=1e-6)
  for name in g_ref:
    np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("attention, message", [
    (dict(name="moh", shared_heads=5), r"attention.shared_heads=5 is out of range"),
    (dict(name="moh", shared_heads=2, k=3), r"attention.k=3 is out of range"),
    (dict(name="moh", shared_heads=4, k=1), r"attention.k=1: every one of the 4 heads"),
    (dict(name="moh", top_k=2), r"unknown option\(s\) \['top_k'\] for attention 'moh'"),
    ("mixture", r"attention='mixture' is not registered; registered: 'mha', 'moh'"),
])
def test_bad_moh_settings_fail_in_one_line(attention, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(num_heads=4, d_model=16, attention=attention)


def test_cached_decoding_equals_full_sequence_logits():
  """A tiny causal LM with MoH in every layer: token-by-token decoding through the KV cache
  (Generator) gives the logits of one uncached call over the whole sequence."""
  from moe_jax.inference import Generator, SamplingConfig, decode_model_config
  from moe_jax.models import build_model
  model = dict(name="lm", d_model=32, num_layers=2, num_heads=4, mlp_dim=64, causal=True,
               vocab_size=64, attention=dict(name="moh", shared_heads=1, k=2))
  module = build_model(decode_model_config(model))
  variables = dict(module.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32),
                               method=module.logits))
  prompts = [[5, 9, 13], [7, 3, 11, 2, 8], [30]]
  outs, logits = Generator(model, variables)(prompts, SamplingConfig(max_new_tokens=4),
                                             return_logits=True)
  sequences = [p + o for p, o in zip(prompts, outs)]
  width = max(map(len, sequences))
  full = np.asarray(module.apply(variables, jnp.asarray([s + [0] * (width - len(s))
                                                         for s in sequences], jnp.int32),
                                 method=module.logits))
  for b, prompt in enumerate(prompts):
    for t in range(len(outs[b])):
      np.testing.assert_allclose(logits[t, b], full[b, len(prompt) - 1 + t], atol=1e-4, rtol=0,
                                 err_msg=f"row {b} step {t}")


@pytest.mark.parametrize("model, shown", [(dict(attention="moh"), "attention='moh'"),
                                          (dict(untied_layers=[0]), "untied_layers=(0,)")])
def test_export_to_hugging_face_refuses_moh_and_untied_models(tmp_path, model, shown):
  """No HF family holds head routers or per-modality weights: refuse rather than drop them."""
  from moe_jax.interop.hf import save_hf
  with pytest.raises(ValueError, match=rf"export to Hugging Face needs plain multi-head "
                                       rf"attention; this model has .*{re.escape(shown)}"):
    save_hf(dict(name="lm", **model), {}, str(tmp_path), {"model_type": "mixtral"})
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model, shown", [
    (dict(moe=dict(layer=dict(name="residual"))), "moe.layer='residual'"),
    (dict(moe=dict(router=dict(name="dense_to_sparse"))), "moe.router='dense_to_sparse'"),
    (dict(moe=dict(router=dict(name="top_k", null_experts=2))), "router.null_experts=2"),
    (dict(moe=dict(), moe_num_experts=(4, 8)), "moe_num_experts=(4, 8)")])
def test_export_to_hugging_face_refuses_moe_variants_no_family_holds(tmp_path, model, shown):
  from moe_jax.interop.hf import save_hf
  with pytest.raises(ValueError, match=rf"export to Hugging Face needs a plain top-k MoE layer "
                                       rf"with one expert count; this model has {re.escape(shown)}"):
    save_hf(dict(name="lm", **model), {}, str(tmp_path), {"model_type": "mixtral"})
  assert not list(tmp_path.iterdir())
