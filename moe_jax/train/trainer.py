"""`train_and_evaluate(config, workdir)`: AGD multitask training with eval, checkpoints, logs.

One task per optimizer step (config.agd.mode="agd"), or every task each step with
summed losses (mode="mixed", the baseline). Resumes automatically from the latest
checkpoint in `workdir`; writes TensorBoard events, `summary.json` and console
progress. See experiments/configs/*.py for the config fields.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import models
from moe_jax import validation as V
from moe_jax.train import agd, barriers, faults
from moe_jax.train import checkpoint
from moe_jax.train.checkpoint import Checkpointer, RestoreError, SaveError
from moe_jax.config import MoEConfig
from moe_jax.data import BatchIterator, make_source
from moe_jax.data.transforms import Pipeline
from moe_jax.data.transforms.text import vocab_needed
from moe_jax.tokenizer import ByteTokenizer
from moe_jax.train.metrics import (Averager, LoadWindow, Progress, SummaryWriter,
                                   format_duration)
from moe_jax.parallel.partitioning import check_mesh_fits, global_batch, mesh_from_config
from moe_jax.parallel.sharding import DEFAULT_RULES, initialize_distributed
from moe_jax.tasks import VALID
from moe_jax.train.preemption import Interrupted, StopRequests
from moe_jax.train import run_record, trainable
from moe_jax.train.step import (GRAD_FINITE_PREFIX, NONFINITE_POLICIES, MixedTasks,
                                init_train_state, make_eval_step, make_optimizer,
                                make_schedule,
                                make_train_step, pin_state_sharding)

log = logging.getLogger("moe_jax.train")
MODES = ("agd", "mixed")
BARRIER_TIMEOUT_S = 600  # multi-host: the longest wait for a process at start-up / a save


class TrainingError(RuntimeError):
  """A run that cannot go on (diverged loss, unusable workdir); message is one line."""


def _say(msg: str) -> None:
  if jax.process_index():  # multi-process: one console, process 0's
    return
  print(msg, flush=True)
  log.info(msg)


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def task_iterator(task: agd.Task, spec: str, seed: int, train: bool,
                  loader: Mapping[str, Any]) -> BatchIterator:
  """The task's batches from `spec`: train (shuffled, full batches) or eval (the whole
  split in order, the last batch filled up and masked)."""
  args = task.source_args if train or task.eval_source_args is None else task.eval_source_args
  source = make_source(spec, **dict(args))
  calls = task.transforms if train or task.eval_transforms is None else task.eval_transforms
  class_names = task.class_names or tuple(getattr(source, "class_names", ()) or ())
  # Even with no transforms: the pipeline drops string features the model cannot take.
  transform = Pipeline(calls, training=train, class_names=class_names)
  batch_size = task.batch_size if train else task.eval_batch_size or task.batch_size
  if train and len(source) < batch_size:
    raise ValueError(f"task {task.name!r}: source {spec!r} has {len(source)} examples, fewer "
                     f"than batch_size={batch_size}")
  # Eval passes are short and restart each time: threads, never worker processes.
  workers = int(loader.get("num_workers", 0)) if train else 0
  return BatchIterator(source, batch_size, seed=seed, shuffle=train, drop_remainder=train,
                       transform=transform, process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       name=f"task {task.name!r} ({'train' if train else 'eval'} {spec})",
                       num_workers=workers, num_threads=int(loader.get("num_threads", 1)),
                       prefetch=int(loader.get("prefetch", 2)))


def first_train_batches(tasks, seed: int = 0, loader: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
  """{task name: its first training batch, as the trainer builds it}: example inputs for
  shapes (initialising variables, cost analysis) outside a run."""
  batches = {}
  for i, task in enumerate(tasks):
    it = task_iterator(task, task.source, seed + 1000 * i, True, loader or {})
    try:
      batches[task.name] = it.batch_at(0)
    finally:
      it.close()
  return batches


def check_train_config(config) -> None:
  """One-line errors for optimizer and train fields that would train wrongly or crash late
  (a negative learning rate ascends, num_steps <= 0 "finishes" at once, *_every=0 divides
  by zero after compiling)."""
  opt, tcfg = config.optimizer, config.train
  V.check_positive("optimizer.learning_rate", opt.get("learning_rate"))
  V.check_int_range("optimizer.warmup_steps", opt.get("warmup_steps", 0), lo=0)
  for key in ("weight_decay", "end_lr_factor"):
    if key in opt and not (V.is_number(opt[key]) and opt[key] >= 0):
      raise ValueError(f"optimizer.{key}={opt[key]!r} must be a number >= 0")
  if "grad_clip_norm" in opt:
    V.check_positive("optimizer.grad_clip_norm", opt["grad_clip_norm"])
  trainable.check_patterns(opt.get("trainable"))
  V.check_int_range("train.num_steps", tcfg.get("num_steps"), lo=1)
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    V.check_int_range(f"train.{key}", tcfg.get(key), lo=1)
  V.check_int_range("train.eval_batches", tcfg.get("eval_batches", 0), lo=0)
  V.check_choice("train.nonfinite", tcfg.get("nonfinite", "abort"), NONFINITE_POLICIES)
  V.check_int_range("train.max_consecutive_skips", tcfg.get("max_consecutive_skips", 10), lo=0)
  V.check_positive("train.barrier_timeout_s", tcfg.get("barrier_timeout_s", BARRIER_TIMEOUT_S))


def check_vocab(model_cfg: Mapping[str, Any], tasks) -> None:
  """A tokenizer with more ids than the model's embedding is a one-line error now."""
  vocab = int(model_cfg.get("vocab_size", ByteTokenizer.vocab_size))
  for task in tasks:
    for calls in (task.transforms, task.eval_transforms or ()):
      need = vocab_needed(calls)
      if need > vocab:
        raise ValueError(f"task {task.name!r}: its tokenizer has {need} ids but "
                         f"config.model.vocab_size={vocab}; set --config.model.vocab_size={need}")


def nonfinite_report(metrics: Mapping[str, float]) -> str | None:
  """What went non-finite in a step's metrics, naming the first gradient group; None if
  nothing did."""
  bad = {k: v for k, v in metrics.items()
         if (k.endswith("loss") or k == "grad_norm") and not np.isfinite(v)}
  groups = [k[len(GRAD_FINITE_PREFIX):] for k, v in metrics.items()
            if k.startswith(GRAD_FINITE_PREFIX) and v < 1]
  if not bad and not groups:
    return None
  what = ", ".join(f"{k}={v}" for k, v in bad.items()) or "gradients"
  where = f"; first non-finite gradient group: {groups[0]} (of {len(groups)})" if groups else ""
  return what + where


def _finite_or_raise(step: int, task_name: str, metrics: Mapping[str, float],
                     last_checkpoint: int | None) -> None:
  report = nonfinite_report(metrics)
  if report:
    raise TrainingError(f"non-finite values at step {step} (task {task_name}): {report}; "
                        f"stopped. The last good checkpoint (step {last_checkpoint}) is "
                        "untouched")


def _restore_latest_usable(ckpt: Checkpointer, state, workdir: str):
  """(step, state, data state) of the newest checkpoint that restores; (0, state, None)
  when there is none. An unreadable step (truncated or missing file, empty metadata) is
  set aside with a warning naming it, and the previous one is tried; a checkpoint that
  does not fit the model is a config error, never skipped."""
  unreadable: list[tuple[int, str]] = []
  for step in reversed(ckpt.all_steps()):
    run_record.check_restorable(os.path.join(ckpt.directory, str(step)), state)
    details = os.path.join(workdir, f"restore_error_{step}"
                           + (f".process{jax.process_index()}" if jax.process_count() > 1 else "")
                           + ".log")
    try:
      restored, data_state = ckpt.restore(step, state, details_path=details)
    except RestoreError as e:
      unreadable.append((step, f"{e}; details in {details}"))
      continue
    # Only once an older step restored are the newer, unreadable ones set aside (so that a
    # later save of the same step number can happen); nothing moves when none restores.
    for bad, why in unreadable:
      moved = ckpt.set_aside(bad)
      _say(f"warning: checkpoint {bad} is unreadable ({why}); moved to {moved}, resuming "
           f"from {step}")
    return step, restored, data_state
  if unreadable:
    raise TrainingError(f"no checkpoint in {workdir}/checkpoints restores (steps "
                        f"{[s for s, _ in unreadable]}; newest: {unreadable[0][1]}); nothing was "
                        "moved and nothing trains from scratch over them: use a new workdir or "
                        "move them away")
  return 0, state, None


def _init_params_from(path: str, state, shardings, tx):
  """`state` with the params saved at `path`, each read straight into its sharding on the
  mesh, and a fresh optimizer state for them. `path`: experiments.convert / upcycle output
  (DST/params), or a training run (its workdir: the latest checkpoint; or one
  checkpoints/<step>) whose optimizer state and step are left behind."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  item_dir, what = checkpoint.find_saved_params(path, flag="train.init_params")
  run_record.check_restorable(os.path.dirname(item_dir), state,
                              item=os.path.basename(item_dir),
                              what=f"train.init_params {item_dir}")
  target = {"params": state.params}
  target_shardings = {"params": shardings.params}
  # Routing state saved with them (DeepSeek-V3's correction bias) comes along.
  saved = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  if state.router_state and "router_state" in saved:
    target["router_state"] = state.router_state
    target_shardings["router_state"] = shardings.router_state
  restore_args = jax.tree.map(
      lambda x, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=x.shape, dtype=x.dtype),
      target, target_shardings)
  # partial: a training checkpoint also holds the step and the optimizer state.
  restored = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  params = restored["params"]
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return state.replace(params=params, opt_state=opt_state,
                       router_state=restored.get("router_state", state.router_state))


def evaluate(eval_step, variables, tasks, eval_iters, max_batches: int = 0,
             put=lambda batch: batch, after_batch=lambda: None) -> dict[str, dict]:
  """Metrics of every task (+ zero-shot) over its whole eval split (or `max_batches`
  batches when > 0), each batch weighted by its real examples ("valid"), so the fill
  of the last batch counts for nothing.

  `put` turns a process-local batch into the global arrays the step takes;
  `after_batch` runs after each batch (the fault-injection tests kill mid-eval there)."""
  results = {}
  for task in tasks:
    if task.name not in eval_iters:
      continue
    sums: dict[str, float] = {}
    n = examples = 0
    for batch in eval_iters[task.name].epoch_batches():
      if max_batches and n >= max_batches:
        break
      batch = put(batch)
      # Metrics are means over the global batch's real examples: weight by their number.
      real = (int(jax.device_get(jnp.sum(batch[VALID]))) if VALID in batch
              else next(int(v.shape[0]) for v in batch.values() if np.ndim(v)))
      metrics = eval_step(variables, batch, task)
      if task.kind == "contrastive" and task.class_names and task.modalities[1] == "text":
        metrics = {**metrics, **eval_step(variables, batch, task, zero_shot=True)}
      for k, v in jax.device_get(metrics).items():
        sums[k] = sums.get(k, 0.0) + float(v) * real
      n += 1
      examples += real
      after_batch()
    results[task.name] = ({k: v / max(examples, 1) for k, v in sums.items()}
                          | {"eval_batches": n, "eval_examples": examples})
  return results


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary.

  `config.mesh` (data, fsdp, expert, model; all 1 = one device) lays the state and
  batches out over devices; on multi-process launches every process runs this with
  the same config and reads its own share of each batch.
  """
  check_train_config(config)  # before any device work
  initialize_distributed(float(config.train.get("barrier_timeout_s", BARRIER_TIMEOUT_S)))
  mesh = mesh_from_config(config.get("mesh"))
  with jax.set_mesh(mesh):  # MoE layers read the expert axis from the mesh in context
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config, workdir: str, mesh) -> dict[str, Any]:
  t_start = time.perf_counter()
  check_workdir(workdir)
  tcfg, seed = config.train, int(config.seed)
  rules = tuple(config.get("logical_rules", DEFAULT_RULES))
  mode = config.agd.get("mode", "agd")
  if mode not in MODES:
    raise ValueError(f"agd.mode={mode!r} is not supported; allowed: {', '.join(MODES)}")
  tasks = agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))
  model = models.build_model(config.model)
  check_vocab(config.model, tasks)
  moe_cfg = config.model.get("moe")
  pyramid = models.stack_config(model).moe_num_experts  # per-layer counts: checked per layer
  check_mesh_fits(mesh, models.stack_config(model).moe_experts_by_layer() if pyramid
                  else MoEConfig(**moe_cfg).num_experts if moe_cfg else None,
                  {t.name: t.batch_size for t in tasks}
                  | {f"{t.name} (eval)": t.eval_batch_size or t.batch_size
                     for t in tasks if t.eval_source}, rules)
  sampler = agd.TaskSampler(tasks, config.agd.get("sampler", "weighted"), seed)
  loader = dict(config.get("data", None) or {})
  train_iters = {t.name: task_iterator(t, t.source, seed + 1000 * i, True, loader)
                 for i, t in enumerate(tasks)}
  eval_iters = {t.name: task_iterator(t, t.eval_source, seed, False, loader)
                for t in tasks if t.eval_source}
  put = lambda batch: global_batch(mesh, batch, rules)
  for it in eval_iters.values():  # a bad eval transform fails now, not after training
    it.batch_at(0)

  # Multi-host: every process has opened its data and runs the same config before the
  # first collective (a timeout names the processes that did not get here).
  barrier_timeout = float(tcfg.get("barrier_timeout_s", BARRIER_TIMEOUT_S))
  barriers.check_same_config(json.dumps(run_record.config_dict(config), sort_keys=True),
                             barrier_timeout)
  num_steps = int(tcfg.num_steps)
  tx = make_optimizer(config.optimizer, num_steps)
  examples = {t.name: put(train_iters[t.name].batch_at(0)) for t in tasks}
  state, state_shardings = init_train_state(model, tx, examples, tasks, seed, mesh, rules)
  params = state.params
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_expert = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                 if "experts" in jax.tree_util.keystr(p))
  mesh_str = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
  _say(f"model {config.model.get('name', 'imp')}: {n_params / 1e6:.2f}M parameters "
       f"({n_expert / 1e6:.2f}M in experts); tasks: {', '.join(t.name for t in tasks)}; "
       f"mesh {mesh_str} ({mesh.size} device{'s' if mesh.size > 1 else ''})")
  if config.optimizer.get("trainable"):  # parameter-efficient fine-tuning: say what trains
    n_train, _ = trainable.count(params, config.optimizer.trainable)
    _say(f"trainable: {n_train:,} of {n_params:,} parameters "
         f"({100 * n_train / n_params:.2f}%) match optimizer.trainable="
         f"{tuple(config.optimizer.trainable)}")

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(tcfg.keep_checkpoints),
                      async_save=bool(tcfg.get("async_checkpoints", False)),
                      barrier_timeout_s=barrier_timeout)
  changes = run_record.check_config(workdir, config, bool(ckpt.latest_step()),
                                    str(tcfg.get("on_config_change", "warn")))
  if changes:
    _say(f"warning: resuming with {len(changes)} changed config field(s): "
         + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else ""))
  barriers.wait_for_processes("restore", barrier_timeout)
  start, state, data_state = _restore_latest_usable(ckpt, state, workdir)
  if not start and tcfg.get("init_params"):  # a fresh run fine-tuning given parameters
    state = _init_params_from(str(tcfg.init_params), state, state_shardings, tx)
    _say(f"parameters from {tcfg.init_params} (optimizer state fresh)")
  run_record.write_config(workdir, config)
  if start:  # restored straight into this mesh's layout, whatever mesh wrote it
    for name, it in train_iters.items():
      it.set_state(data_state[name])
    _say(f"resumed from {workdir}/checkpoints at step {start}")
  last_checkpoint = start or None

  telemetry = bool(tcfg.get("moe_telemetry", False))
  nonfinite = str(tcfg.get("nonfinite", "abort"))
  max_skips = int(tcfg.get("max_consecutive_skips", 10))
  skips = {"total": 0, "in_a_row": 0}
  train_step, mixed_step = make_train_step(model, tx, float(config.get("aux_loss_weight", 1.0)),
                                           telemetry=telemetry, nonfinite=nonfinite)
  step_cache = agd.StepCache(pin_state_sharding(mixed_step if mode == "mixed" else train_step,
                                                state_shardings),
                             on_recompile=str(tcfg.get("on_recompile", "error")))
  eval_step = make_eval_step(model)
  lead = jax.process_index() == 0  # writes events and summary.json
  writer = SummaryWriter(workdir if tcfg.get("tensorboard", True) and lead else None,
                         purge_step=start + 1 if start else None)
  writer.text("config", "```\n" + json.dumps(run_record.config_dict(config), indent=1) + "\n```")
  schedule = make_schedule(config.optimizer, num_steps)
  averager, progress, loads = Averager(), Progress(start, num_steps), LoadWindow()
  log_every, eval_every = int(tcfg.log_every), int(tcfg.eval_every)
  ckpt_every, eval_batches = int(tcfg.checkpoint_every), int(tcfg.get("eval_batches", 0))
  mixed = MixedTasks(tuple(tasks))
  pending = None  # (step, task name, device metrics): fetched one step late
  history: list[dict[str, Any]] = []
  final: dict[str, dict] | None = None  # eval results at num_steps

  def drain():
    nonlocal pending
    if pending is None:
      return
    step, name, metrics = pending
    pending = None
    host = jax.device_get(metrics)
    # Expert-load vectors (telemetry) go to the load window, whatever the task.
    loads.add({k.split("/", 1)[-1].rsplit("/", 1)[0]: v for k, v in host.items()
               if k.endswith("/expert_load_E") and "moe_layers/" in k})
    host = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
    if nonfinite == "skip_step" and host.get("skipped_step", 0.0) > 0:
      skips["total"] += 1
      skips["in_a_row"] += 1
      if skips["in_a_row"] > max_skips:
        raise TrainingError(f"{skips['in_a_row']} non-finite steps in a row up to step {step} "
                            f"(task {name}, train.max_consecutive_skips={max_skips}): "
                            f"{nonfinite_report(host)}; stopped. The last checkpoint (step "
                            f"{last_checkpoint}) holds no skipped update")
      _say(f"warning: step {step} (task {name}) skipped: {nonfinite_report(host)}")
      return  # nothing of this step is averaged
    skips["in_a_row"] = 0
    _finite_or_raise(step, name, host, last_checkpoint)
    host = {k: v for k, v in host.items() if not k.startswith(GRAD_FINITE_PREFIX)}
    averager.add("train" if mode == "mixed" else f"train/{name}", host)

  def save(step: int) -> int:
    """Checkpoints `state` and every task's data position at `step`; returns the step."""
    barriers.wait_for_processes(f"save-{step}", barrier_timeout)
    ckpt.save(step, state, {n: it.get_state() for n, it in train_iters.items()})
    return step

  def write_segment(status: str, end_step: int) -> dict[str, Any]:
    wall = time.perf_counter() - t_start
    segment = {"start_step": start, "end_step": end_step, "status": status, "wall_time_s": wall,
               "compile_seconds": dict(step_cache.compile_seconds),
               "compiles": dict(step_cache.compiles), "train_history": history,
               "config": run_record.config_dict(config), "code_version": run_record.code_version(),
               "packages": run_record.package_versions(), "skipped_steps": skips["total"]}
    latest = {"final_step": end_step, "resumed_from": start or None, "mode": mode, "eval": final,
              "compile_seconds": step_cache.compile_seconds, "compiles": step_cache.compiles,
              "wall_time_s": wall, "parameters": n_params, "mesh": dict(mesh.shape),
              "train_history": history}
    return run_record.write_summary(workdir, segment, latest)

  stops = StopRequests()
  faults.at("start")
  try:
    stops.install()
    for step in range(start, num_steps):
      if mode == "mixed":
        name, batch, task = "mixed", {t.name: next(train_iters[t.name]) for t in tasks}, mixed
      else:
        task = sampler.task_at(step)
        name, batch = task.name, next(train_iters[task.name])
      first = task.name not in step_cache.compile_seconds
      if first:
        _say(f"task {task.name}: compiling (first step)")
      state, metrics = step_cache(state, put(batch), task)
      if first:
        seconds = step_cache.compile_seconds[task.name]
        progress.exclude(seconds)
        _say(f"task {task.name}: compiled and ran its first step in {seconds:.1f} s")
      drain()  # the previous step's metrics; this step is already queued
      pending = (step + 1, name, metrics)
      done = step + 1
      faults.at("step", done)
      if done % log_every == 0 or done == num_steps:
        drain()
        rate, eta = progress.update(done)
        means = averager.pop()
        load_stats, load_vectors = loads.pop()
        load_stats = {f"moe_layers/{k}": v for k, v in load_stats.items()}
        writer.scalars(done, {**means, **load_stats, "train/steps_per_second": rate,
                              "train/learning_rate": float(schedule(done))})
        for layer, load in load_vectors.items():
          writer.histogram(done, f"moe_layers/{layer}/expert_load", load)
        losses_str = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in sorted(means.items())
                              if k.endswith("/loss") and k.count("/") == 2)
        if load_vectors:
          worst = max(v for k, v in load_stats.items() if k.endswith("max_over_mean_load"))
          dead = sum(v for k, v in load_stats.items() if k.endswith("dead_experts"))
          losses_str += f" | max/mean expert load {worst:.2f}, dead experts {dead:.0f}"
        _say(f"step {done}/{num_steps} {losses_str} | {rate:.1f} steps/s, ETA {eta}")
        history.append({"step": done, **means, **load_stats,
                        **{f"moe_layers/{k}/expert_load": v for k, v in load_vectors.items()}})
      if done % ckpt_every == 0 or done == num_steps:
        drain()
        last_checkpoint = save(done)
        write_segment("running", done)  # a killed run keeps its record up to here
        faults.at("save_issued", done)
      stop = stops.requested(done)
      if stop:  # preemption or Ctrl-C: save this step (waiting for the write), then leave
        drain()
        if last_checkpoint != done:
          last_checkpoint = save(done)
        ckpt.wait()  # committed before we say so
        write_segment(f"stopped by {stop}", done)
        raise Interrupted(stop, done, saved=True)
      if eval_iters and (done % eval_every == 0 or done == num_steps):
        t_eval = time.perf_counter()
        _say(f"eval at step {done}: {len(eval_iters)} task(s), "
             f"{'whole splits' if not eval_batches else f'up to {eval_batches} batches each'}")
        results = evaluate(eval_step, state.variables(), tasks, eval_iters, eval_batches, put,
                           after_batch=lambda: faults.at("eval", done))
        eval_seconds = time.perf_counter() - t_eval
        progress.exclude(eval_seconds)
        final = results if done == num_steps else None
        writer.scalars(done, {f"eval/{t}/{k}": v for t, m in results.items() for k, v in m.items()})
        for t, m in results.items():
          _say(f"  eval {t} @ {done}: " + " ".join(
              f"{k}={v}" if isinstance(v, int) else f"{k}={v:.3f}"  # counts stay integers
              for k, v in m.items() if not k.startswith("moe/")))
        _say(f"eval at step {done} done in {format_duration(eval_seconds)}")
    drain()
  finally:
    stops.restore()
    writer.flush()
    writer.close()
    ckpt.close()
    for it in train_iters.values():  # stops loader threads / worker processes
      it.close()

  if final is None:  # e.g. resumed from the final checkpoint: nothing ran
    final = evaluate(eval_step, state.variables(), tasks, eval_iters, eval_batches, put,
                     after_batch=lambda: faults.at("eval", num_steps))
  faults.at("finish")
  summary = write_segment("finished", num_steps)
  compiled = ", ".join(f"{k}={v:.1f}" for k, v in step_cache.compile_seconds.items())
  _say(f"done in {format_duration(summary['wall_time_s'])}; " + (
      f"compile seconds per task: {compiled}" if compiled else
      f"no step left to train (the checkpoint is at step {num_steps}): evaluated only"))
  return summary
