"""optimizer.trainable: frozen parameters get zero updates and no optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import imp_tiny_prompts, lm_tiny_lora
from moe_jax.train.step import make_optimizer
from moe_jax.train.trainer import check_train_config

OPT = dict(learning_rate=0.1, warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.5)


def test_frozen_parameters_get_no_update_and_the_rest_train_as_if_alone():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"mlp": {"w_DF": jax.random.normal(k1, (3, 4))},
            "moe": {"lora": {"w_up_EDF": jax.random.normal(k2, (2, 3, 4)), "b_E": jnp.ones(2)}}}
  grads = jax.tree.map(lambda p: 10.0 * jax.random.normal(k3, p.shape), params)  # clipped

  def run(tx, params, grads, steps=2):
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(grads, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state, updates

  new, state, updates = run(make_optimizer(dict(OPT, trainable=("/lora/",)), 10), params, grads)
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * (2 * 3 * 4 + 2)  # mu, nu
  np.testing.assert_array_equal(updates["mlp"]["w_DF"], 0.0)
  np.testing.assert_array_equal(new["mlp"]["w_DF"], params["mlp"]["w_DF"])
  # The adapters move as AdamW moves them alone (the clip norm counts their gradients only).
  alone, _, _ = run(make_optimizer(OPT, 10), params["moe"], grads["moe"])
  assert not np.allclose(alone["lora"]["w_up_EDF"], params["moe"]["lora"]["w_up_EDF"])
  for a, b in zip(jax.tree.leaves(new["moe"]), jax.tree.leaves(alone)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_shipped_peft_configs_pass_the_train_checks():
  for module in (lm_tiny_lora, imp_tiny_prompts):
    for arg in (None, "smoke"):
      check_train_config(module.get_config(arg))
