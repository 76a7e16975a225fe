"""Mixture of soft prompts end to end: AGD over two IMP tasks trains only the prompts and
their router under optimizer.trainable, and resumes from its checkpoint."""
import numpy as np

from experiments.configs import imp_tiny_prompts
from moe_jax.train import train_and_evaluate
from tests.train.runs import final_state, flatten


def _config(num_steps):
  c = imp_tiny_prompts.get_config("smoke")
  for name in list(c.tasks.keys()):
    if name not in ("image_cls", "image_text"):
      del c.tasks[name]
  for t in c.tasks.values():
    t.batch_size = 8
    del t["eval_source"]  # no eval: one compile per task per run
  c.optimizer.trainable = ("prompts/",)
  c.train.update(num_steps=num_steps, log_every=1, checkpoint_every=1, keep_checkpoints=4,
                 async_checkpoints=False)
  return c


def test_agd_trains_only_the_prompts_and_resumes(tmp_path, capsys):
  workdir = str(tmp_path)
  summary = train_and_evaluate(_config(3), workdir)
  assert set(summary["compiles"]) == {"image_cls", "image_text"}  # both tasks ran (AGD)
  E, S, D = 8, 4, 64
  assert f"trainable: {E * S * D + D * E:,} of " in capsys.readouterr().out
  p1, p3 = (dict(flatten(final_state(workdir, s)["params"])) for s in (1, 3))
  assert sorted(k for k in p1 if k.startswith("prompts/")) == ["prompts/prompts_ESD",
                                                               "prompts/router_DE"]
  for k in p1:
    assert np.array_equal(p1[k], p3[k]) == (not k.startswith("prompts/")), k
  summary = train_and_evaluate(_config(4), workdir)
  assert "resumed from" in capsys.readouterr().out and summary["final_step"] == 4
  p4 = dict(flatten(final_state(workdir, 4)["params"]))
  for k in p1:
    assert np.array_equal(p3[k], p4[k]) == (not k.startswith("prompts/")), k
