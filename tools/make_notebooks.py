"""Writes colab/routing_analysis.ipynb and colab/compress_and_generate.ipynb (their cells
live here so they can be reviewed as code; rerun after editing). Each starts with an
"Open in Colab" badge and an install cell; CI runs each top to bottom with
MOE_JAX_NOTEBOOK_SMOKE=1 (shrunk settings), tests/test_notebooks.py."""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No public URL of this repository is confirmed: the badge and the install cell name a
# placeholder the reader replaces with where their copy lives.
OWNER_REPO = "<OWNER>/moe_jax"


def badge(name):
  return (f'<a href="https://colab.research.google.com/github/{OWNER_REPO}/blob/main/colab/{name}">'
          '<img src="https://colab.research.google.com/assets/colab-badge.svg" '
          'alt="Open In Colab"/></a> (replace `<OWNER>` in the link and in the install cell '
          'with the account that hosts your copy of moe_jax)')


INSTALL = '''# Install (Colab only; locally run from a clone after `pip install -e '.[notebooks,compress]'`).
REPO_URL = "https://github.com/<OWNER>/moe_jax"  # placeholder: the git URL of your copy
import os, subprocess, sys
if "google.colab" in sys.modules:
    if "<OWNER>" in REPO_URL:
        raise SystemExit("set REPO_URL to the git URL of your moe_jax copy, then rerun")
    if not os.path.isdir("moe_jax"):
        subprocess.check_call(["git", "clone", "-q", REPO_URL, "moe_jax"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e",
                           "moe_jax[notebooks,compress]"])
    os.chdir("moe_jax")
    sys.path.insert(0, os.getcwd())
SMOKE = os.environ.get("MOE_JAX_NOTEBOOK_SMOKE") == "1"  # CI: shrunk settings'''


def routing_analysis():
  cells = [
      new_markdown_cell(f"""# moe_jax: how a trained MoE routes, and steering it

{badge("routing_analysis.ipynb")}

Trains a tiny multimodal MoE encoder (imp_tiny: images, DTMF audio, image captions) with AGD,
then looks inside: per-layer expert load, router entropy, co-activation, and how differently
the modalities are routed (Jensen-Shannon divergence between their routing distributions,
as in "Multilingual Routing in Mixture-of-Experts", arXiv:2510.04694). Last, it steers the
routers, promoting the experts image tokens use most, and measures what that does to each
task. The same runs from the command line: `python -m experiments.analyze --workdir=DIR
--group_by=modality --steer_group=image --steer_top=1 --steer_bias=2`."""),
      new_code_cell(INSTALL),
      new_code_cell('''import tempfile
from experiments.configs import imp_tiny
from moe_jax.train import train_and_evaluate

config = imp_tiny.get_config("smoke" if SMOKE else None)
for name in [n for n in config.tasks if n not in ("image_cls", "audio_cls", "image_text")]:
    del config.tasks[name]
config.model.moe.router = {"name": "top_k", "k": 2}   # token choice: loads differ per modality
config.model.moe.dispatch = "sorted"
steps = 20 if SMOKE else 300
config.train.update(num_steps=steps, log_every=steps // 2, eval_every=steps,
                    checkpoint_every=steps, eval_batches=2, tensorboard=False)
workdir = tempfile.mkdtemp(prefix="moe_routing_")
summary = train_and_evaluate(config, workdir)
print({task: round(m.get("accuracy", m.get("zero_shot_accuracy", 0.0)), 3)
       for task, m in summary["eval"].items()})'''),
      new_code_cell('''# Routing of the held-out data, grouped by modality (tables and heatmaps as the CLI writes).
from experiments.workdirs import Run
from moe_jax.analysis import report

run = Run.load(workdir, max_batches=1 if SMOKE else 8)
routing = run.routing(group_by="modality")
print(report.format_summary(routing))
out = os.path.join(workdir, "analysis")
files = report.write_tables(routing, out, {"group_by": "modality"}) + report.write_plots(routing, out)
print("\\n".join(sorted(os.path.basename(f) for f in files)))'''),
      new_code_cell('''# Expert load per modality in each MoE layer, and the divergence between modalities.
import matplotlib.pyplot as plt
import numpy as np

layers = list(routing)
fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4 * (len(layers) + 1), 3))
for ax, layer in zip(axes, layers):
    groups = [g for g in routing[layer]["groups"] if g != "all"]
    ax.imshow([routing[layer]["groups"][g]["expert_load"] for g in groups], aspect="auto")
    ax.set_yticks(range(len(groups)), groups); ax.set_xlabel("expert"); ax.set_title(layer, fontsize=8)
pairs = sorted({p for l in layers for p in routing[l]["alignment"]})
for pair in pairs:
    axes[-1].plot(range(len(layers)), [routing[l]["alignment"].get(pair, np.nan) for l in layers],
                  marker="o", label=pair.replace("|", " vs "))
axes[-1].set_xticks(range(len(layers)), [str(i) for i in range(len(layers))])
axes[-1].set_xlabel("MoE layer"); axes[-1].set_ylabel("JS divergence (bits)"); axes[-1].legend(fontsize=7)
plt.tight_layout(); plt.show()
for layer in layers:
    assert all(0.0 <= js <= 1.0 for js in routing[layer]["alignment"].values())'''),
      new_code_cell('''# Steering: add a logit bias to the expert image tokens use most, in the last MoE layer.
from moe_jax.analysis.steering import moe_layers, most_used_experts

layers_in_order = moe_layers(run.variables["params"])
last = len(layers_in_order) - 1
expert = most_used_experts(routing[layers_in_order[last]["name"]], "image", 1)[0]
steering = {last: {expert: 2.0}}
before, after = run.evaluate(), run.evaluate(steering=steering)
print(f"steering {steering} (layer {last} = {layers_in_order[last]['name']})")
print(report.format_metric_change(before, after))
steered = run.routing(group_by="modality", steering=steering)
name = layers_in_order[last]["name"]
share = lambda r: r[name]["groups"]["all"]["expert_load"][expert]
print(f"expert {expert}'s share of the slots: {share(routing):.3f} -> {share(steered):.3f}")
assert share(steered) >= share(routing)'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                            "display_name": "Python 3"}})


def compress_and_generate():
  cells = [
      new_markdown_cell(f"""# moe_jax: import a Hugging Face MoE, compress it, generate

{badge("compress_and_generate.ipynb")}

Imports a tiny Qwen3-MoE checkpoint (the repository's test fixture: random weights, so the
text is noise; point `SRC` at a real Hugging Face MoE directory for a real one), fine-tunes
it briefly, then compresses its experts: a width per expert (2/3/4/8 bits, group-wise
scales, through qwix) chosen from how much each expert is used under an average-bit
budget (MC-MoE, arXiv:2410.06270), plus dynamic pruning of a token's low-weight experts at
inference. Last, it generates from the compressed model. Each step is one of the
repository's commands (`experiments.convert`, `.train`, `.compress`, `.generate`)."""),
      new_code_cell(INSTALL),
      new_code_cell('''import json, subprocess, sys, tempfile

def sh(*args):
    """Runs one of the repository's commands and shows its output."""
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-1500:] if result.returncode else "")
    assert result.returncode == 0, result.stderr[-3000:]
    return result

SRC = "tests/interop/fixtures/qwen3_moe"
work = tempfile.mkdtemp(prefix="moe_compress_")
sh("experiments.convert", "--from=hf", f"--src={SRC}", f"--dst={work}/import")
steps = "4" if SMOKE else "100"
sh("experiments.train", f"--config={work}/import/experiment.py" + (":smoke" if SMOKE else ""),
   f"--workdir={work}/finetune", f"--config.train.num_steps={steps}",
   f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}")'''),
      new_code_cell('''# Quantize the experts at several average-bit budgets, pruning at beta = 0.5 as well.
rows = []
for avg_bits in ([3.0] if SMOKE else [2.5, 3.0, 4.0, 8.0]):
    out = f"{work}/compressed_{avg_bits}"
    sh("experiments.compress", f"--workdir={work}/finetune", f"--avg_bits={avg_bits}",
       "--prune_beta=0.5", "--max_batches=2", f"--out={out}")
    record = json.load(open(f"{out}/compress.json"))
    m = record["metrics"]
    rows.append((avg_bits, record["avg_bits"], record["compression"], m["float"]["stdlib_lm"]["loss"],
                 m["quantized"]["stdlib_lm"]["loss"], m["quantized+pruned"]["stdlib_lm"]["loss"],
                 m["quantized+pruned"]["stdlib_lm"]["moe/pruned_slot_fraction"]))
    assert record["avg_bits"] <= avg_bits + 1e-9
print(f"{'budget':>6} {'bits':>5} {'size':>6} {'float':>7} {'quant':>7} {'+prune':>7} {'skipped':>8}")
for r in rows:
    print(f"{r[0]:>6.1f} {r[1]:>5.2f} {r[2]:>5.1f}x {r[3]:>7.3f} {r[4]:>7.3f} {r[5]:>7.3f} {r[6]:>8.1%}")'''),
      new_code_cell('''# Generate from the compressed model (its workdir prunes at inference: config.json).
result = sh("experiments.generate", f"--workdir={work}/compressed_3.0", "--prompt_ids=1,15,27",
            "--max_new_tokens=8")
print("generated (byte-decoded; the fixture's weights are random):", result.stdout.splitlines()[-1:])'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                            "display_name": "Python 3"}})


if __name__ == "__main__":
  for name, nb in (("routing_analysis.ipynb", routing_analysis()),
                   ("compress_and_generate.ipynb", compress_and_generate())):
    nbformat.write(nb, os.path.join(REPO, "colab", name))
    print("wrote", name)
