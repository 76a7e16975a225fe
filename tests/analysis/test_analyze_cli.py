"""python -m experiments.analyze on a tiny trained IMP workdir: files, groups, errors."""
import csv
import json
import re
import os
import shutil
import subprocess
import sys

import pytest

from experiments.configs import imp_tiny
from moe_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def analyze(*args):
  return subprocess.run([sys.executable, "-m", "experiments.analyze", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("imp"))
  c = imp_tiny.get_config("smoke")
  for name in list(c.tasks.keys()):
    if name not in ("image_cls", "audio_cls"):
      del c.tasks[name]
  for t in c.tasks.values():
    t.batch_size = 8
  c.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2, tensorboard=False)
  train_and_evaluate(c, wd)
  return wd


def test_analyze_writes_tables_and_heatmaps_by_label_and_by_modality(workdir, tmp_path):
  out = str(tmp_path / "by_label")
  r = analyze(f"--workdir={workdir}", "--group_by=label", "--tasks=image_cls",
              "--max_batches=1", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert {"routing.json", "routing.csv", "alignment.csv", "alignment.png"} <= set(os.listdir(out))
  saved = json.load(open(os.path.join(out, "routing.json")))
  assert saved["meta"]["group_by"] == "label" and saved["meta"]["step"] == 2
  layers = saved["layers"]
  assert layers and all(f"load_{l.replace('/', '_')}.png" in os.listdir(out) for l in layers)
  for entry in layers.values():
    groups = entry["groups"]
    # One batch of 8 examples: the labels present, each example's tokens in its class.
    labelled = [g for g in groups if g != "all"]
    assert sum(groups[g]["tokens"] for g in labelled) == groups["all"]["tokens"]
    assert len(entry["alignment"]) == len(labelled) * (len(labelled) - 1) // 2
    assert all(0.0 <= js <= 1.0 for js in entry["alignment"].values())
  rows = list(csv.DictReader(open(os.path.join(out, "routing.csv"))))
  assert len(rows) == sum(len(e["groups"]) for e in layers.values())
  assert "JS divergence between groups" in r.stdout
  # By modality over both tasks: image and audio tokens, one alignment pair per layer.
  r = analyze(f"--workdir={workdir}", "--group_by=modality", "--max_batches=1",
              f"--out={tmp_path / 'by_modality'}", "--plots=false")
  assert r.returncode == 0, r.stderr[-3000:]
  saved = json.load(open(tmp_path / "by_modality" / "routing.json"))
  for entry in saved["layers"].values():
    assert set(entry["groups"]) == {"image", "audio", "all"}
    assert list(entry["alignment"]) == ["audio|image"]


@pytest.mark.parametrize("make, args, message", [
    ("no_checkpoint", (), r"has no checkpoint \(checkpoints/<step>\)$"),
    ("copy", ("--tasks=video_cls",), r"--tasks: 'video_cls' is not a task of this run; "
                                     r"its tasks: audio_cls, image_cls$"),
    ("copy", ("--step=7",), r"has no checkpoint 7; it has \[2\]$"),
    ("copy", ("--max_batches=-1",), r"--max_batches=-1 must be >= 0$"),
    ("copy", ("--steer=5:0=1",), r"steering layer 5 is out of range: the model has \d+ MoE "
                                 r"layers \(0\.\.\d+: encoder/"),
    ("copy", ("--steer=0:99=1",), r"steering expert 99 is out of range: layer 0 \(\S+\) has "
                                  r"\d+ experts"),
    ("copy", ("--steer_group=video_cls",), r"group 'video_cls' is not in the analysis; groups: "
                                           r"audio_cls, image_cls$"),
])
def test_bad_input_is_one_line(workdir, tmp_path, make, args, message):
  wd = str(tmp_path / "wd")
  if make == "copy":
    wd = workdir
  else:
    os.makedirs(wd)
    shutil.copy(os.path.join(workdir, "config.json"), wd)
  r = analyze(f"--workdir={wd}", *args)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), last


def test_steering_from_the_cli_reports_routing_and_metrics_before_and_after(workdir, tmp_path):
  out = tmp_path / "steer"
  r = analyze(f"--workdir={workdir}", "--tasks=image_cls", "--max_batches=1", f"--out={out}",
              "--plots=false", "--steer_group=image_cls", "--steer_top=1", "--steer_bias=1e4",
              "--steer_layers=0")
  assert r.returncode == 0, r.stderr[-3000:]
  saved = json.load(open(out / "steering.json"))
  (layer0, biases), = saved["steering"].items()
  assert layer0 == "0" and list(biases.values()) == [1e4]
  assert set(saved["before"]["image_cls"]) == set(saved["after"]["image_cls"])
  assert "accuracy" in saved["before"]["image_cls"]
  steered = json.load(open(out / "steered" / "routing.json"))
  assert steered["meta"]["steering"] == saved["steering"]
  assert "steered routing:" in r.stdout and "before   steered" in r.stdout
