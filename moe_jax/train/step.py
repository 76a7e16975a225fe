"""Train state, optimizer and the per-task train / eval step functions.

A step function takes ONE task (static) and its batch; `agd.StepCache` jits it
once per task. RNGs are derived from (seed, step), so a resumed run draws the
same dropout / jitter / DropToken noise as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.nn import losses
from moe_jax.nn.routing import ROUTER_STATE
from moe_jax.train import trainable
from moe_jax.train.agd import Task
from moe_jax.parallel.partitioning import state_shardings
from moe_jax.parallel.sharding import DEFAULT_RULES

RNG_STREAMS = ("dropout", "jitter", "droptoken")
MOE_COLLECTIONS = [losses.AUX_LOSS_COLLECTION, losses.METRICS_COLLECTION]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key: plain arrays checkpoint everywhere
  # Routing state updated by the forward pass, not the optimizer ({} when no router has any).
  router_state: Any = flax.struct.field(default_factory=dict)

  def variables(self) -> dict[str, Any]:
    """What model.apply takes: params and, when there is any, the router state."""
    return _variables(self.params, self.router_state)


def _variables(params, router_state) -> dict[str, Any]:
  return {"params": params, **({ROUTER_STATE: router_state} if router_state else {})}


def make_schedule(opt_cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warmup, then cosine decay to end_lr_factor x peak."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg["learning_rate"], warmup_steps=opt_cfg["warmup_steps"],
      decay_steps=max(num_steps, opt_cfg["warmup_steps"] + 1),
      end_value=opt_cfg["learning_rate"] * opt_cfg.get("end_lr_factor", 0.0))


def make_optimizer(opt_cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, no decay on vectors;
  only the parameters `optimizer.trainable` matches when it is set (train/trainable.py)."""
  schedule = make_schedule(opt_cfg, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(opt_cfg["grad_clip_norm"]),
      optax.adamw(schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.999),
                  weight_decay=opt_cfg["weight_decay"], mask=decay_mask))
  patterns = trainable.check_patterns(opt_cfg.get("trainable"))
  if not patterns:
    return tx
  # optimizer.trainable: frozen parameters get zero updates and no Adam moments (the
  # clip norm counts the trainable gradients only).
  labels = lambda params: jax.tree.map(lambda m: "train" if m else "frozen",
                                       trainable.trainable_mask(params, patterns))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


_MAX_OF = {"expert_load_E": "max_expert_load", "processed_load_E": "max_processed_load"}


def summarize_moe(collections: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Mean over MoE layers of each sown router metric (expert load -> its max share)."""
  groups: dict[str, list[jax.Array]] = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(collections.get(losses.METRICS_COLLECTION, {}))
  for path, value in leaves:
    name = path[-1].key
    if name in _MAX_OF:  # a per-expert vector: report its largest share
      name, value = _MAX_OF[name], value.max(-1)
    groups.setdefault(f"moe/{name}", []).append(jnp.ravel(value))
  return {k: jnp.mean(jnp.concatenate(v)) for k, v in groups.items()}


TELEMETRY_PREFIX = "moe_layers"


def layer_telemetry(collections: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Per MoE layer: expert load [E] (share of slots requested), dropped slot and unrouted
  token fractions, router entropy.

  Keys are f"moe_layers/<layer path>/<metric>"; a layer called several times in one step
  (a shared encoder per modality) is averaged over its calls; scanned layers, sown with
  a leading [repeats] axis, are split into "<path>[i]".
  """
  wanted = ("expert_load_E", "dropped_slot_fraction", "unrouted_token_fraction",
            "router_entropy")
  calls: dict[tuple[str, str], list[jax.Array]] = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(collections.get(losses.METRICS_COLLECTION, {}))
  for path, value in leaves:
    metric = path[-1].key
    if metric not in wanted:
      continue
    names = [k.key for k in path[:-1] if isinstance(k, jax.tree_util.DictKey)]
    layer = "/".join(n for n in names[:-1] if n not in ("layers",))  # drop the sow name "moe"
    calls.setdefault((layer, metric), []).append(value)
  out = {}
  for (layer, metric), values in calls.items():
    value = jnp.mean(jnp.stack(values), axis=0)
    if value.ndim == (1 if metric == "expert_load_E" else 0):
      out[f"{TELEMETRY_PREFIX}/{layer}/{metric}"] = value
    else:  # scanned: one row per repeated layer
      for i in range(value.shape[0]):
        out[f"{TELEMETRY_PREFIX}/{layer}[{i}]/{metric}"] = value[i]
  return out


def _split_microbatches(batch, n: int):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


NONFINITE_POLICIES = ("abort", "skip_step")
GRAD_FINITE_PREFIX = "grad_finite/"  # per parameter group: 1.0 when every gradient is finite


def _group(path) -> str:
  """A parameter's group for non-finite reports: its first three path names."""
  names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  return "/".join(names[:3])


def grad_finite_groups(grads) -> dict[str, jax.Array]:
  """{GRAD_FINITE_PREFIX + group: 1.0 if every gradient of the group is finite else 0.0}."""
  groups: dict[str, list[jax.Array]] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    groups.setdefault(_group(path), []).append(jnp.all(jnp.isfinite(g)))
  return {GRAD_FINITE_PREFIX + k: jnp.all(jnp.stack(v)).astype(jnp.float32)
          for k, v in groups.items()}


def make_train_step(model, tx: optax.GradientTransformation, aux_loss_weight: float = 1.0,
                    telemetry: bool = False, nonfinite: str = "abort"):
  """(state, batch, task) -> (state, metrics) for one AGD task.

  With `telemetry`, metrics also hold `layer_telemetry` (per layer, per expert).

  Non-finite loss or gradients: metrics carry `grad_finite/<group>` flags so the trainer
  can name the group; with `nonfinite="skip_step"` such a step leaves params, optimizer
  and router state as they were (metric `skipped_step` = 1), with "abort" it applies the
  update and the trainer stops before the state reaches a checkpoint.

  Router state (e.g. a balancing bias) goes into each forward pass and its updated
  value comes out with the gradients; microbatches and mixed-mode tasks see it in
  turn, as consecutive steps would.
  """

  def loss_fn(params, router_state, batch, task, rngs):
    (loss, metrics), coll = model.apply(_variables(params, router_state), batch, task=task,
                                        deterministic=False, rngs=rngs,
                                        mutable=MOE_COLLECTIONS + [ROUTER_STATE])
    aux = losses.sum_aux_losses(coll)
    metrics = {**metrics, **summarize_moe(coll), "aux_loss": aux,
               **(layer_telemetry(coll) if telemetry else {})}
    return loss + aux_loss_weight * aux, (metrics, coll.get(ROUTER_STATE, router_state))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def task_grads(params, router_state, batch, task, rng):
    """((loss, metrics), grads, new router state), averaged over the microbatches."""
    rngs = dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS))))
    if task.microbatches == 1:
      (total, (metrics, router_state)), grads = grad_fn(params, router_state, batch, task, rngs)
      return (total, metrics), grads, router_state

    def accumulate(carry, xs):
      acc, rs = carry
      mb, i = xs
      mb_rngs = {k: jax.random.fold_in(r, i) for k, r in rngs.items()}
      (total, (metrics, rs)), grads = grad_fn(params, rs, mb, task, mb_rngs)
      return (jax.tree.map(jnp.add, acc, ((total, metrics), grads)), rs), None

    mbs = _split_microbatches(batch, task.microbatches)
    # task is static (not an array): close over it rather than pass it to eval_shape.
    (total0, (metrics0, _)), grads0 = jax.eval_shape(
        lambda p, rs, mb, r: grad_fn(p, rs, mb, task, r), params, router_state,
        jax.tree.map(lambda x: x[0], mbs), rngs)
    zero = jax.tree.map(jnp.zeros_like, ((total0, metrics0), grads0))
    (sums, router_state), _ = jax.lax.scan(accumulate, (zero, router_state),
                                           (mbs, jnp.arange(task.microbatches)))
    (total, metrics), grads = jax.tree.map(lambda x: x / task.microbatches, sums)
    return (total, metrics), grads, router_state

  def apply_grads(state: TrainState, grads, metrics, router_state, total):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    metrics = {**metrics, "grad_norm": grad_norm, **grad_finite_groups(grads)}
    if nonfinite == "skip_step":  # keep the old state where anything went non-finite
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      router_state = keep(router_state, state.router_state)
      metrics["skipped_step"] = 1.0 - finite.astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         router_state=router_state), metrics

  def train_step(state: TrainState, batch, task: Task):
    rng = jax.random.fold_in(state.rng, state.step)
    (total, metrics), grads, router_state = task_grads(state.params, state.router_state, batch,
                                                        task, rng)
    return apply_grads(state, grads, {**metrics, "total_loss": total}, router_state, total)

  def mixed_step(state: TrainState, batches, tasks: "MixedTasks"):
    """Baseline: every task each step, losses (and so gradients) summed."""
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics, router_state, totals = None, {}, state.router_state, 0.0
    for i, task in enumerate(tasks.tasks):
      (total, m), g, router_state = task_grads(state.params, router_state, batches[task.name],
                                               task, jax.random.fold_in(rng, i))
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      metrics.update({f"{task.name}/{k}": v for k, v in m.items()})
      metrics[f"{task.name}/total_loss"] = total
      totals = totals + total
    return apply_grads(state, grads, metrics, router_state, totals)

  return train_step, mixed_step


def pin_state_sharding(step_fn, shardings):
  """The step with its new state constrained to `shardings` (the old state's layout):
  sharding propagation may otherwise pick another, and donation needs them equal."""

  def step(state, batch, task):
    state, metrics = step_fn(state, batch, task)
    return jax.lax.with_sharding_constraint(state, shardings), metrics

  return step


@flax.struct.dataclass
class MixedTasks:
  """All tasks at once (mixed-batch baseline); hashable so it can be a static jit arg."""

  tasks: tuple[Task, ...] = flax.struct.field(pytree_node=False)
  name: str = flax.struct.field(pytree_node=False, default="mixed")

  def __hash__(self):
    return hash(self.tasks)


def make_eval_step(model):
  """(variables, batch, task, zero_shot) -> metrics, deterministic; variables as
  TrainState.variables() gives them (params and any router state)."""

  def eval_step(variables, batch, task: Task, zero_shot: bool = False):
    (_, metrics), coll = model.apply(variables, batch, task=task, deterministic=True,
                                     zero_shot=zero_shot, mutable=MOE_COLLECTIONS)
    return {**metrics, **({} if zero_shot else summarize_moe(coll))}

  return jax.jit(eval_step, static_argnames=("task", "zero_shot"))


def _init_fn(model, tasks: Sequence[Task]):
  """rng, batches -> {"params": ..., "router_state": ...}: every task's init, deep-merged."""

  def init_all(rng, batches):
    merged: dict[str, Any] = {"params": {}, ROUTER_STATE: {}}
    for task in tasks:
      variables = flax.core.unfreeze(model.init(rng, batches[task.name], task=task))
      for col in merged:
        merged[col] = _deep_merge(merged[col], variables.get(col, {}))
    return merged
  return init_all


def init_variables(model, example_batches: Mapping[str, Any], tasks: Sequence[Task], seed: int,
                   out_shardings: Any = None) -> dict[str, Any]:
  """{"params", "router_state"} touched by any task: every task's init, deep-merged, in
  one compile.

  Flax derives each module's init rng from its path, so modules shared between
  tasks (the encoder) get identical values from every task's init. With
  `out_shardings`, each device computes only its own shards.
  """
  init_all = jax.jit(_init_fn(model, tasks), out_shardings=out_shardings)
  return init_all(jax.random.PRNGKey(seed), {t.name: example_batches[t.name] for t in tasks})


def init_train_state(model, tx: optax.GradientTransformation, example_batches: Mapping[str, Any],
                     tasks: Sequence[Task], seed: int, mesh, rules=DEFAULT_RULES):
  """(state, state shardings) laid out on `mesh` (call under `jax.set_mesh(mesh)`).

  eval_shape gives the shapes, the logical axis rules their shardings, and jit with
  out_shardings builds every shard where it lives: full unsharded parameters or
  optimizer state never exist on one device. Router state is sharded like the
  parameters (its names carry axis letters too: bias_E follows the expert axis).
  """
  batches = {t.name: example_batches[t.name] for t in tasks}
  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(_init_fn(model, tasks), rng, batches)
  var_sh = {col: state_shardings(mesh, tree, rules) for col, tree in abstract.items()}
  variables = init_variables(model, batches, tasks, seed, out_shardings=var_sh)
  params = variables["params"]
  opt_sh = state_shardings(mesh, jax.eval_shape(tx.init, abstract["params"]), rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  rep = NamedSharding(mesh, P())
  shardings = TrainState(step=rep, params=var_sh["params"], opt_state=opt_sh, rng=rep,
                         router_state=var_sh[ROUTER_STATE])
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state, rng=jax.device_put(jax.random.PRNGKey(seed + 1), rep),
                     router_state=variables[ROUTER_STATE])
  return state, shardings


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    if k in out and isinstance(out[k], dict) and isinstance(v, dict):
      out[k] = _deep_merge(out[k], v)
    elif k in out and jax.tree.structure(out[k]) == jax.tree.structure(v) and jax.tree.map(
        jnp.shape, out[k]) != jax.tree.map(jnp.shape, v):
      raise ValueError(f"parameter {k!r} has different shapes in different tasks: "
                       f"{jax.tree.map(jnp.shape, out[k])} vs {jax.tree.map(jnp.shape, v)}")
    else:
      out[k] = v
  return out
