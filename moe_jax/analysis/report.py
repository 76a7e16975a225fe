"""Writes a RoutingStats summary: routing.json (everything), routing.csv (one row per
layer and group), alignment.csv (one row per layer and pair of groups), PNG heatmaps
(expert load per layer: groups x experts; co-activation of all tokens per layer;
alignment: layers x pairs) and a printed summary."""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Any

import numpy as np

from moe_jax.analysis.stats import ALL

ROW_FIELDS = ("layer", "group", "tokens", "router_entropy", "dropped_slot_rate",
              "dropped_token_rate", "top1_share", "max_over_mean_load")


def _file_name(layer: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.@-]+", "_", layer).strip("_")


def write_tables(summary: dict[str, Any], out_dir: str, meta: dict[str, Any]) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, n) for n in ("routing.json", "routing.csv", "alignment.csv")]
  with open(paths[0], "w") as f:
    json.dump({"meta": meta, "layers": summary}, f, indent=1)
  with open(paths[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(ROW_FIELDS + ("expert_load",))
    for layer, entry in summary.items():
      for group, s in entry["groups"].items():
        w.writerow([layer, group] + [s[k] for k in ROW_FIELDS[2:]]
                   + [" ".join(f"{x:.4f}" for x in s["expert_load"])])
  with open(paths[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("layer", "group_a", "group_b", "js_divergence_bits", "load_js_divergence_bits"))
    for layer, entry in summary.items():
      for pair, js in entry["alignment"].items():
        w.writerow([layer, *pair.split("|", 1), f"{js:.6f}",
                    f"{entry['load_alignment'][pair]:.6f}"])
  return paths


def write_plots(summary: dict[str, Any], out_dir: str) -> list[str]:
  """PNG heatmaps (matplotlib, imported here: the tables need none)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("the plots need matplotlib: pip install matplotlib (or "
                     "'moe_jax[notebooks]'), or pass --plots=false") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  def heatmap(matrix, rows, cols, title, path, xlabel, ylabel):
    labels = [str(c) for c in cols]
    rotate = len(cols) > 16 or max(map(len, labels)) > 4
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(cols) + 3),
                                    max(3, 0.35 * len(rows) + (3 if rotate else 1.5))))
    im = ax.imshow(np.asarray(matrix, float), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), labels, fontsize=7, rotation=90 if rotate else 0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for layer, entry in summary.items():
    groups = entry["groups"]
    names = list(groups)
    E = len(groups[names[0]]["expert_load"])
    paths.append(heatmap([groups[g]["expert_load"] for g in names], names, list(range(E)),
                         f"expert load (share of slots): {layer}",
                         os.path.join(out_dir, f"load_{_file_name(layer)}.png"), "expert", "group"))
    pooled = groups.get(ALL, groups[names[0]])
    paths.append(heatmap(pooled["coactivation"], list(range(E)), list(range(E)),
                         f"co-activation (share of tokens): {layer}",
                         os.path.join(out_dir, f"coactivation_{_file_name(layer)}.png"),
                         "expert", "expert"))
  pairs = sorted({p for entry in summary.values() for p in entry["alignment"]})
  if pairs:
    layers = list(summary)
    matrix = [[summary[l]["alignment"].get(p, np.nan) for p in pairs] for l in layers]
    paths.append(heatmap(matrix, layers, [p.replace("|", " vs ") for p in pairs],
                         "routing divergence between groups (Jensen-Shannon, bits)",
                         os.path.join(out_dir, "alignment.png"), "groups", "layer"))
  return paths


def format_summary(summary: dict[str, Any]) -> str:
  """One line per layer and group; then the mean divergence per layer."""
  def fmt(v):
    return "-" if v is None else f"{v:.3f}"
  lines = [f"{'layer':<34} {'group':<14} {'tokens':>8} {'entropy':>8} {'drop':>6} "
           f"{'top-1':>6} {'max/mean':>8}"]
  for layer, entry in summary.items():
    for group, s in entry["groups"].items():
      lines.append(f"{layer[-34:]:<34} {group[:14]:<14} {s['tokens']:>8} "
                   f"{fmt(s['router_entropy']):>8} {s['dropped_slot_rate']:>6.3f} "
                   f"{s['top1_share']:>6.3f} {s['max_over_mean_load']:>8.2f}")
    if entry["alignment"]:
      js, load = list(entry["alignment"].values()), list(entry["load_alignment"].values())
      lines.append(f"{'':<34} JS divergence between groups: mean {np.mean(js):.3f}, "
                   f"max {np.max(js):.3f} bits over {len(js)} pair(s) (routing "
                   f"probabilities); expert loads: mean {np.mean(load):.3f}, max "
                   f"{np.max(load):.3f}")
  return "\n".join(lines)


def format_metric_change(before: dict[str, dict], after: dict[str, dict]) -> str:
  """Each task's eval metrics without and with steering, and the change."""
  lines = [f"{'task':<14} {'metric':<28} {'before':>9} {'steered':>9} {'change':>9}"]
  for task, metrics in before.items():
    for key, value in metrics.items():
      if key.startswith(("moe/", "eval_")) or key not in after.get(task, {}):
        continue
      new = after[task][key]
      lines.append(f"{task[:14]:<14} {key[:28]:<28} {value:>9.4f} {new:>9.4f} "
                   f"{new - value:>+9.4f}")
  return "\n".join(lines)
