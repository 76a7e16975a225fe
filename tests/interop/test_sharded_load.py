"""Loading a sharded Hugging Face checkpoint straight onto a data=2 x expert=4 mesh of 8
(simulated) devices: each shard reads only its own experts; logits and the export equal
the one-device ones."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.interop import hf
from moe_jax.interop.safetensors_io import TensorReader
from moe_jax.models import build_model
from moe_jax.parallel.sharding import make_mesh

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mixtral")


def test_expert_banks_load_shard_by_shard_onto_the_mesh(tmp_path, monkeypatch):
  assert "model.safetensors.index.json" in os.listdir(FIXTURE)  # 5 shard files
  mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 4, "model": 1})
  experts_read = []
  real = hf.read_slice

  def recording(reader, e, index):
    if e.stacked:
      experts_read.append(len(range(len(e.hf))[index[0]]))
    return real(reader, e, index)

  monkeypatch.setattr(hf, "read_slice", recording)
  model, variables = hf.load_hf(FIXTURE, mesh=mesh)
  params = variables["params"]
  bank = params["decoder"]["layers"]["block_0"]["moe"]["experts"]["w_up_EDF"]
  assert bank.shape == (4, 32, 24) and bank.sharding.spec[0] == "expert"
  assert {s.data.shape for s in bank.addressable_shards} == {(1, 32, 24)}
  assert experts_read and max(experts_read) == 1  # never a whole bank at once
  ref = np.load(os.path.join(FIXTURE, "reference.npz"))
  module = build_model(model)
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, t: module.apply({"params": p}, t, method=module.logits))(
        params, jnp.asarray(ref["tokens"]))
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
  # The export gathers every shard back: the same tensors as the files it came from.
  hf.save_hf(model, variables, str(tmp_path), json.load(open(os.path.join(FIXTURE,
                                                                       "config.json"))))
  a, b = TensorReader(FIXTURE), TensorReader(str(tmp_path))
  assert a.names() == b.names()
  for name in a.names():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
