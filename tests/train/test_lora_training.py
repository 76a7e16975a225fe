"""LoRA-expert fine-tuning end to end: only the adapters and routers train, and resume."""
import jax
import numpy as np

from experiments.configs import lm_tiny_lora
from moe_jax.train import train_and_evaluate
from tests.train.runs import final_state, flatten

PER_LAYER = 4 * (128 * 8 + 8 * 128) + 128 * 4  # E * (D*R + R*D) + router D*E, smoke sizes


def _config(num_steps):
  c = lm_tiny_lora.get_config("smoke")
  del c.tasks.stdlib_lm["eval_source"]  # no eval: one compile per run
  c.train.update(num_steps=num_steps, log_every=1, checkpoint_every=1, keep_checkpoints=4,
                 async_checkpoints=False)
  return c


def test_only_adapters_train_frozen_ffn_stays_and_resume_continues(tmp_path, capsys):
  workdir = str(tmp_path)
  train_and_evaluate(_config(3), workdir)
  out = capsys.readouterr().out
  assert f"trainable: {2 * PER_LAYER:,} of " in out
  states = {s: final_state(workdir, s) for s in (1, 3)}
  p1, p3 = (dict(flatten(states[s]["params"])) for s in (1, 3))
  lora = [k for k in p1 if "/lora/" in k]
  assert len(lora) == 2 * 3 and sum(p1[k].size for k in lora) == 2 * PER_LAYER
  for k in p1:
    if k in lora:  # every adapter and router weight moves (step 1 runs at warmup's lr 0)
      assert not np.array_equal(p1[k], p3[k]), k
    else:
      np.testing.assert_array_equal(p1[k], p3[k], err_msg=k)
  assert all(np.any(p3[k]) for k in lora if k.endswith("w_down_EFD"))  # B left zero
  # Adam moments exist for the trainable parameters only (mu and nu: 2 per weight).
  moments = sum(x.size for _, x in flatten(states[3]["opt_state"]) if x.ndim >= 1)
  assert moments == 2 * 2 * PER_LAYER

  summary = train_and_evaluate(_config(4), workdir)  # resumes at 3, trains step 4
  assert "resumed from" in capsys.readouterr().out and summary["final_step"] == 4
  p4 = dict(flatten(final_state(workdir, 4)["params"]))
  for k in p1:
    assert np.array_equal(p3[k], p4[k]) == (k not in lora), k
