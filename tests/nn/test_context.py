"""Context reaches every router through the stack: loop, scan and remat alike."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import Context, MoEConfig, TransformerConfig, TransformerStack
from moe_jax.nn.routing import ROUTERS, RoutingDecision, router_logits


@ROUTERS.register("test_task_pick")
class TaskPickRouter(nn.Module):
  """Sends every token of an example to expert task_id % E, gated by its softmax prob."""

  num_experts: int

  @nn.compact
  def __call__(self, x_TD, context=None, *, deterministic=True, token_mask_T=None):
    logits_TE = router_logits(self, x_TD, self.num_experts, 0.0, deterministic, jnp.float32)
    index_T = (context.task_id % self.num_experts).astype(jnp.int32)
    prob_T = jnp.take_along_axis(jax.nn.softmax(logits_TE), index_T[:, None], 1)[:, 0]
    zero = jnp.zeros((), jnp.float32)
    return RoutingDecision(expert_index_TK=index_T[:, None], weight_TK=prob_T[:, None],
                           aux={"load_balance_loss": zero, "z_loss": zero,
                                "dropped_fraction": zero, "router_entropy": zero,
                                "expert_load_E": jnp.zeros((self.num_experts,))})


@pytest.mark.parametrize("scan, remat", [(False, False), (True, True)], ids=["loop", "scan_remat"])
def test_each_example_uses_the_expert_of_its_task(scan, remat):
  moe = MoEConfig(num_experts=4, expert_hidden_dim=8, router="test_task_pick")
  cfg = TransformerConfig(num_layers=2, d_model=8, num_heads=2, mlp_dim=16, moe=moe,
                          moe_every=1, scan_layers=scan, remat=remat)
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  ctx = Context.for_batch(2, task_id=1)
  ctx = ctx.replace(task_id=jnp.array([1, 6]))  # example 0 -> expert 1, example 1 -> expert 2
  params = stack.init(jax.random.key(1), x, context=ctx)["params"]
  grads = jax.grad(lambda p: jnp.sum(stack.apply({"params": p}, x, context=ctx) ** 2))(params)
  w_up = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if getattr(path[-1], "key", "") == "w_up_EDF"]
  assert len(w_up) == (1 if scan else 2)
  for g in w_up:
    used_E = np.abs(np.asarray(g)).reshape(-1, 4, 8 * 8).transpose(1, 0, 2).reshape(4, -1).max(1)
    assert used_E[1] > 0 and used_E[2] > 0 and used_E[0] == 0 and used_E[3] == 0, used_E


def test_context_rows_expand_to_tokens():
  ctx = Context(task_id=jnp.array([3, 5]), condition_BU=jnp.arange(4.0).reshape(2, 2))
  per = ctx.per_token(6)
  np.testing.assert_array_equal(per.task_id, [3, 3, 3, 5, 5, 5])
  np.testing.assert_array_equal(per.condition_BU[:, 1], [1, 1, 1, 3, 3, 3])
  assert per.noise_level is None
  with pytest.raises(ValueError, match="context has 2 rows, which do not divide the 5 tokens"):
    ctx.per_token(5)
