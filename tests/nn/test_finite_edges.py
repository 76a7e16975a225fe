"""Router scores, aux losses and gradients stay finite at the edges that produce NaNs
elsewhere: perfectly balanced (all-equal) logits, every token to one expert, and groups
whose tokens are all masked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoEConfig, MoELayer, sum_aux_losses

ROUTERS = {
    "top_k softmax": dict(router=dict(name="top_k", k=2), dispatch="einsum"),
    "top_k sigmoid + bias, sorted": dict(
        router=dict(name="top_k", k=2, score="sigmoid", bias_update_rate=0.01),
        dispatch="sorted"),
    "expert_choice": dict(router="expert_choice", dispatch="einsum"),
}


def _cases():
  rng = np.random.default_rng(0)
  spread = rng.standard_normal((2, 8, 8)).astype(np.float32)
  same = np.repeat(spread[:, :1], 8, axis=1)  # every token identical: all to one expert
  mask_some = np.ones((2, 8), bool)
  mask_some[1] = False  # the second sequence (a whole group) is padding
  return {
      "balanced (zero input, equal logits)": (np.zeros((2, 8, 8), np.float32), None),
      "all tokens to one expert": (same, None),
      "one group all masked": (spread, mask_some),
      "everything masked": (spread, np.zeros((2, 8), bool)),
  }


@pytest.mark.parametrize("router", list(ROUTERS))
def test_outputs_aux_losses_and_gradients_stay_finite(router):
  cfg = MoEConfig(num_experts=4, expert_hidden_dim=8, load_balance_weight=1e-2,
                  z_loss_weight=1e-3, sequence_groups=True, **ROUTERS[router])
  layer = MoELayer(cfg)
  variables = layer.init(jax.random.key(0), jnp.ones((2, 8, 8)))

  def loss(params, x, mask):
    y, state = layer.apply({**variables, "params": params}, x, token_mask=mask,
                           mutable=["aux_loss", "moe_metrics", "router_state"])
    return jnp.sum(y**2) + sum_aux_losses(state), state

  for case, (x, mask) in _cases().items():
    mask = None if mask is None else jnp.asarray(mask)
    (value, state), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x), mask)
    assert np.isfinite(float(value)), (router, case)
    for name, tree in (("param grads", g_params), ("input grads", g_x),
                       ("aux and metrics", {k: state[k] for k in ("aux_loss", "moe_metrics")})):
      for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), (router, case, name)
