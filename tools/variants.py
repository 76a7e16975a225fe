"""Trains named model variants on the embedded benchmarks and tabulates them (docs/variants.md).

A benchmark program, not a test: each variant is one `python -m experiments.train` run
(a subprocess, so runs share nothing but the disk) in ROOT/<variant>; a finished run is
not trained again. The table reads each run's summary.json and config.json and adds
parameters (total and active per token), forward FLOPs per token from XLA's cost
analysis of the eval forward pass (what the compiled program does, dispatch included),
wall time and the command.

  .venv/bin/python tools/variants.py --list
  .venv/bin/python tools/variants.py --root=/tmp/variants lm_top2 lm_null   # train
  .venv/bin/python tools/variants.py --root=/tmp/variants --table lm        # markdown
  .venv/bin/python tools/variants.py --root=/tmp/variants --table imp_claims --seeds=0,1,2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM, IMP = "experiments/configs/lm_tiny.py", "experiments/configs/imp_tiny.py"
# The lm rows: lm_tiny (4 layers, MoE in layers 1 and 3, 8 experts of 256, top-2) for
# 300 steps, the router comparison's setting (README); dropless sorted dispatch so no
# mechanism is judged through capacity drops.
LM_RUN = ("--config.train.num_steps=300", "--config.train.eval_every=300",
          "--config.train.checkpoint_every=300", "--config.model.moe.dispatch=sorted")
MOE = "--config.model.moe."
INIT = "--config.train.init_params="
LM_DENSE, LORA = "experiments/configs/lm_tiny_dense.py", "experiments/configs/lm_tiny_lora.py"


@dataclasses.dataclass(frozen=True)
class Variant:
  group: str  # rows of one table share task, steps and baseline
  label: str
  config: str
  overrides: tuple[str, ...] = ()  # "{root}" is the --root directory
  # Before training: `python -m experiments.upcycle` with these arguments, unless its
  # --dst exists (e.g. a dense run's FFNs copied into experts).
  upcycle: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "lm_top2": Variant("lm", "top-2 softmax (baseline)", LM, LM_RUN),
    "lm_dense": Variant("lm", "dense FFN, same active width", LM_DENSE, LM_RUN[:3]),
    "lm_null": Variant("lm", "null experts (AdaMoE): 4 nulls, k=3", LM,
                       LM_RUN + (MOE + "router.null_experts=4", MOE + "router.k=3")),
    "lm_dense_to_sparse": Variant(
        "lm", "dense-to-sparse gate (EvoMoE): tau 2 -> 0.3 over 150 steps, top-1 from 200",
        LM + ":dense_to_sparse", LM_RUN + (MOE + "router.anneal_steps=150",
                                           MOE + "router.switch_step=200")),
    "lm_moh": Variant("lm", "top-2 MoE + mixture-of-head attention (2 shared + top-1 of 2)", LM,
                      LM_RUN + ("--config.model.attention=moh",)),
    "lm_residual": Variant("lm", "residual MoE: top-2 MoE x c0 + 256-wide MLP x c1", LM,
                           LM_RUN + (MOE + "layer.name=residual",)),
    "lm_pyramid": Variant("lm", "pyramid: 4 then 8 experts", LM,
                          LM_RUN + ("--config.model.moe_num_experts=(4,8)",)),
    "lm_pr_moe": Variant("lm", "PR-MoE: residual + pyramid (4, 8)", LM,
                         LM_RUN + ("--config.model.moe_num_experts=(4,8)",
                                   MOE + "layer.name=residual")),
    # From lm_dense's 300 steps: 300 more steps dense, upcycled to top-2 MoE, or with
    # frozen FFNs and LoRA experts (only the adapters and their routers train).
    "lmu_dense": Variant("lm_upcycle", "dense, 300 more steps", LM_DENSE,
                         LM_RUN[:3] + (INIT + "{root}/lm_dense",)),
    "lmu_moe": Variant("lm_upcycle", "upcycled: 8 copies of the FFN, top-2 (sparse upcycling)",
                       LM, LM_RUN + ("--config.model.moe_every=1",
                                     "--config.model.moe.expert_hidden_dim=512",
                                     INIT + "{root}/lmu_moe_init/params"),
                       ("--src={root}/lm_dense", "--dst={root}/lmu_moe_init", f"--config={LM}",
                        "--config.model.moe_every=1", "--config.model.moe.expert_hidden_dim=512",
                        "--config.model.moe.dispatch=sorted")),
    "lmu_lora": Variant("lm_upcycle", "frozen FFN + 4 rank-8 LoRA experts, top-2 (lm_tiny_lora)",
                        LORA, LM_RUN[:3] + (INIT + "{root}/lmu_lora_init/params",),
                        ("--src={root}/lm_dense", "--dst={root}/lmu_lora_init",
                         f"--config={LORA}")),
    # Mechanisms on the hard IMP benchmark (seed 0; baseline imp_hard: expert choice).
    "imp_top1": Variant("imp", "top-1 (Switch), dropless, balance loss 1e-2", IMP + ":hard",
                        (MOE + "router={'name':'top_k','k':1}", MOE + "dispatch=sorted",
                         MOE + "load_balance_weight=0.01")),
    "imp_soft": Variant("imp", "Soft MoE, 4 slots per expert", IMP + ":hard",
                        (MOE + "layer={'name':'soft_moe','slots_per_expert':4}",)),
    "imp_untied": Variant("imp", "modality-untied layers 0, 1 (MoT) + MoE layers 2, 3",
                          IMP + ":hard", ("--config.model.untied_layers=(0,1)",)),
    "imp_prompts": Variant("imp", "+ mixture of 8 soft prompts (SMoP, top-1), all trained",
                           "experiments/configs/imp_tiny_prompts.py:hard",
                           ("--config.optimizer.trainable=()",)),
    # The IMP claims: MoE vs dense encoder, AGD vs mixed batches, on the hard benchmark.
    "imp_hard": Variant("imp_claims", "MoE encoder, AGD (imp_tiny.py:hard)", IMP + ":hard"),
    "imp_hard_dense": Variant("imp_claims", "dense encoder, AGD (:hard_dense)", IMP + ":hard_dense"),
    "imp_hard_mixed": Variant("imp_claims", "MoE encoder, mixed batches (:hard_mixed)",
                              IMP + ":hard_mixed"),
}


def workdir(root: str, name: str, seed: int | None) -> str:
  return os.path.join(root, name if seed is None else f"{name}_s{seed}")


def command(v: Variant, wd: str, seed: int | None, root: str) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.train", f"--config={v.config}", f"--workdir={wd}",
         *(o.replace("{root}", root) for o in v.overrides)]
  return cmd + ([f"--config.seed={seed}"] if seed is not None else [])


def finished(wd: str) -> bool:
  try:
    with open(os.path.join(wd, "summary.json")) as f:
      s = json.load(f)
    with open(os.path.join(wd, "config.json")) as f:
      return s["final_step"] >= json.load(f)["train"]["num_steps"] and s.get("status") != "running"
  except (OSError, KeyError, ValueError):
    return False


def train(root: str, names: list[str], seeds: list[int | None]) -> None:
  for name in names:
    for seed in seeds:
      wd = workdir(root, name, seed)
      if finished(wd):
        print(f"{name} seed {seed}: done before, kept", flush=True)
        continue
      t0 = time.time()
      v = VARIANTS[name]
      with open(wd + ".log", "w") as log:
        up = [a.replace("{root}", root) for a in v.upcycle]
        dst = next((a.split("=", 1)[1] for a in up if a.startswith("--dst=")), None)
        if up and not os.path.exists(dst):
          print(f"{name}: experiments.upcycle {' '.join(up)}", flush=True)
          subprocess.check_call([sys.executable, "-m", "experiments.upcycle", *up], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        print(f"{name} seed {seed}: training in {wd}", flush=True)
        rc = subprocess.call(command(v, wd, seed, root), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
      print(f"{name} seed {seed}: exit {rc} after {time.time() - t0:.0f} s (log {wd}.log)",
            flush=True)


def _k_eff(moe: dict, eval_metrics: dict) -> float | None:
  """Experts a token runs through on average: a measured metric when the router varies
  it, else top-k's k or expert choice's capacity factor."""
  for task in eval_metrics.values():
    for key in ("moe/real_experts_per_token", "moe/active_experts_per_token"):
      if key in task:
        return float(task[key])
  router = moe.get("router") or {}
  router = {"name": router} if isinstance(router, str) else dict(router)
  if router.get("name") == "expert_choice":
    return float(moe.get("eval_capacity_factor") or moe.get("capacity_factor", 1.0))
  return float(router["k"]) if "k" in router else None


def cost(wd: str, eval_metrics: dict) -> dict[str, float]:
  """Parameters (all tasks'; active: less the expert weights a token does not use) and
  forward FLOPs per token (lm) or per example of the first task (imp), from XLA's cost
  analysis of the compiled eval step."""
  # pylint: disable=import-outside-toplevel  (jax only for --table)
  import jax
  import numpy as np
  from ml_collections import config_dict
  from moe_jax import models
  from moe_jax.data import make_source
  from moe_jax.train import agd, step
  from moe_jax.train.trainer import first_train_batches
  with open(os.path.join(wd, "config.json")) as f:
    config = config_dict.ConfigDict(json.load(f))
  tasks = agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))
  model = models.build_model(config.model)
  batches = jax.tree.map(np.asarray, first_train_batches(tasks))
  variables = step.init_variables(model, batches, tasks, 0)  # every task's parameters
  task, batch = tasks[0], batches[tasks[0].name]
  analysis = step.make_eval_step(model).lower(variables, batch, task=task).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  rows = batch["tokens"].size if task.kind == "lm" else len(batch[task.modalities[0]])
  total = active = 0.0
  moe = config.model.get("moe")
  k_eff = _k_eff(moe.to_dict(), eval_metrics) if moe else None
  for path, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    keys = [getattr(p, "key", "") for p in path]
    total += x.size
    if "experts" in keys and k_eff is not None and x.ndim >= 3:  # a routed bank [.., E, ..]
      active += x.size * min(k_eff / x.shape[-3], 1.0)
    else:
      active += x.size
  return {"params": total, "active": active if moe is None or k_eff is not None else float("nan"),
          "flops": analysis["flops"] / rows,
          "per": "token" if task.kind == "lm" else f"{task.name} example"}


# The metric columns of each group's table: (summary eval key, header, format).
COLUMNS = {
    "lm": [("stdlib_lm/loss", "val loss (nats/byte)", "{:.3f}"),
           ("stdlib_lm/accuracy", "next-byte acc", "{:.3f}")],
    "imp": [("image_cls/accuracy", "image", "{:.3f}"), ("video_cls/accuracy", "video", "{:.3f}"),
            ("audio_cls/accuracy", "audio", "{:.3f}"),
            ("image_text/zero_shot_accuracy", "image 0-shot", "{:.3f}"),
            ("audio_text/zero_shot_accuracy", "audio 0-shot", "{:.3f}")],
}


def _metric(summary: dict, key: str) -> float:
  task, _, name = key.partition("/")
  return float(summary["eval"][task][name])


# Rows shown in another group's table too: its baseline run (variant, seeds).
BASELINE_OF = {"imp": ("imp_hard", [0]), "lm_upcycle": ("lm_dense", [None])}


def table(root: str, group: str, seeds: list[int | None]) -> str:
  import numpy as np  # pylint: disable=import-outside-toplevel
  cols = COLUMNS["lm" if group.startswith("lm") else "imp"]
  head = ["variant", *[c[1] for c in cols], "params", "active params", "fwd MFLOPs", "wall",
          "command"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  names = [n for n, v in VARIANTS.items() if v.group == group]
  base, base_seeds = BASELINE_OF.get(group, (None, None))
  for name in ([base] if base else []) + names:
    v = VARIANTS[name]
    runs = [workdir(root, name, s) for s in (base_seeds if name == base else seeds)]
    runs = [wd for wd in runs if finished(wd)]
    if not runs:
      continue
    summaries = []
    for wd in runs:
      with open(os.path.join(wd, "summary.json")) as f:
        summaries.append(json.load(f))
    cells = [v.label]
    for key, _, fmt in cols:
      vals = np.array([_metric(s, key) for s in summaries])
      cells.append(fmt.format(vals.mean()) + (f" ± {vals.std(ddof=1):.3f}" if len(vals) > 1 else ""))
    c = cost(runs[0], summaries[0]["eval"])
    walls = [s["wall_time_s"] for s in summaries]
    cells += [f"{c['params'] / 1e6:.2f}M", f"{c['active'] / 1e6:.2f}M",
              f"{c['flops'] / 1e6:.2f} / {c['per']}",
              f"{np.mean(walls):.0f} s", "`" + " ".join(
                  ["--config=" + v.config, *v.overrides]) + "`"]
    if len(runs) > 1:
      cells[0] += f" (seeds {', '.join(r.rsplit('_s', 1)[1] for r in runs)})"
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("names", nargs="*", help="variants to train (default: none)")
  ap.add_argument("--root", default="/tmp/variants")
  ap.add_argument("--seeds", default="", help="comma list, e.g. 0,1,2 (default: the config's)")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--table", default="", help="print the markdown table of this group")
  args = ap.parse_args()
  if args.list:
    for name, v in VARIANTS.items():
      print(f"{name:24s} [{v.group}] {v.label}: {v.config} {' '.join(v.overrides)}")
    return 0
  unknown = sorted(set(args.names) - set(VARIANTS))
  if unknown:
    print(f"error: unknown variant(s) {unknown}; --list shows them", file=sys.stderr)
    return 2
  seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
  train(args.root, args.names, seeds)
  if args.table:
    print(table(args.root, args.table, seeds))
  return 0


if __name__ == "__main__":
  sys.exit(main())
