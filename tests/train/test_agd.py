"""AGD pieces: task validation, the sampler, and one compile per task."""
import collections

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.train.agd import RecompileError, StepCache, Task, TaskSampler, tasks_from_config


def _task(name, **kw):
  return Task(name=name, **{"kind": "classify", "source": "digits_image", "num_classes": 10, **kw})


def test_weighted_sampler_follows_weights_and_is_a_function_of_step():
  tasks = [_task("a", weight=3.0), _task("b", weight=1.0)]
  sampler = TaskSampler(tasks, "weighted", seed=7)
  picks = [sampler.task_at(s).name for s in range(4000)]
  share_a = picks.count("a") / len(picks)
  assert 0.72 < share_a < 0.78  # 3 / (3 + 1), binomial sd ~0.007
  again = TaskSampler(tasks, "weighted", seed=7)
  assert [again.task_at(s).name for s in range(3990, 4000)] == picks[3990:]
  other = TaskSampler(tasks, "weighted", seed=8)
  assert [other.task_at(s).name for s in range(100)] != picks[:100]


def test_interval_sampler_runs_each_task_for_its_interval():
  sampler = TaskSampler([_task("a", weight=2), _task("b", weight=1)], "interval")
  assert [sampler.task_at(s).name for s in range(7)] == ["a", "a", "b", "a", "a", "b", "a"]


def test_step_cache_compiles_once_per_task():
  cache = StepCache(lambda state, batch, task: state + batch["x"].sum(), donate_state=False)
  a, b = _task("a"), _task("b")
  state = jnp.zeros(())
  for task, n in [(a, 4), (b, 6), (a, 4), (b, 6), (a, 4)]:
    state = cache(state, {"x": jnp.ones((n,))}, task)
  assert cache.compiles == {"a": 1, "b": 1}
  assert float(state) == 24.0
  assert set(cache.compile_seconds) == {"a", "b"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="segment"), r"kind='segment' is not supported"),
    (dict(kind="contrastive", modalities=("image",)), r"needs 2 modalities"),
    (dict(num_classes=1), r"num_classes=1 is out of range"),
    (dict(batch_size=10, microbatches=3), r"batch_size=10 is not divisible by microbatches=3"),
    (dict(modalities=("smell",)), r"modalities='smell' is not supported"),
    (dict(drop_rates=(("image", 1.0),)), r"drop_rates\[image\]=1.0 must be a number in \[0, 1\)"),
])
def test_task_rejects_bad_fields(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _task("t", **kwargs)


def test_tasks_from_config_lists_valid_keys_and_fills_classes():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['batchsize'\] in config.tasks.t; "
                                       r"valid keys: batch_size"):
    tasks_from_config({"t": {"kind": "classify", "source": "x", "batchsize": 4}})
  Src = collections.namedtuple("Src", "num_classes class_names")
  (t,) = tasks_from_config({"t": {"kind": "classify", "source": "x", "drop_rates": {"image": 0.5}}},
                           lambda spec, kw: Src(3, ["a", "b", "c"]))
  assert t.num_classes == 3 and t.class_names == ("a", "b", "c")
  assert t.drop_rate("image") == 0.5 and t.drop_rate("text") == 0.0


def test_zero_shot_prompts_use_the_tasks_own_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "photo": 3, "of": 4, "cat": 5, "dog": 6}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  path = str(tmp_path / "tokenizer.json")
  tokenizer.save(path)
  Src = collections.namedtuple("Src", "num_classes class_names")
  raw = {"kind": "contrastive", "source": "x", "modalities": ("image", "text"),
         "prompt_template": "a photo of {}", "transforms": f"tokenize(4, tokenizer={path!r})"}
  (t,) = tasks_from_config({"t": raw}, lambda spec, kw: Src(3, ["cat", "dog", "cow"]))
  # "a photo of cat" -> a photo of cat = 2 3 4 5, truncated at the length 4; cow is unknown.
  assert t.prompt_ids == ((2, 3, 4, 5), (2, 3, 4, 6), (2, 3, 4, 1))
  (b,) = tasks_from_config({"t": {**raw, "transforms": "tokenize(32)"}},
                           lambda spec, kw: Src(3, ["cat", "dog", "cow"]))
  assert b.prompt_ids[0] == tuple(c + 1 for c in b"a photo of cat")  # byte ids: byte + 1
  (n,) = tasks_from_config({"t": {**raw, "transforms": ""}},
                           lambda spec, kw: Src(3, ["cat", "dog", "cow"]))
  assert n.prompt_ids == ()  # no tokenize step: the model's byte tokens


def test_a_second_compile_for_a_task_names_what_changed(caplog):
  cache = StepCache(lambda state, batch, task: state + batch["x"].sum(), donate_state=False)
  a = _task("a")
  state = cache(jnp.zeros(()), {"x": jnp.ones((4,))}, a)
  with pytest.raises(RecompileError, match=r"task 'a' compiled a second time .*"
                                           r"\['batch'\]\['x'\]: \(4,\) float32 -> \(3,\) float32"):
    cache(state, {"x": jnp.ones((3,))}, a)
  warn = StepCache(lambda state, batch, task: state + batch["x"].sum(), donate_state=False,
                   on_recompile="warn")
  warn(jnp.zeros(()), {"x": jnp.ones((4,))}, a)
  out = warn(jnp.zeros(()), {"x": jnp.ones((2,), jnp.int32)}, a)
  assert float(out) == 2.0 and warn.compiles == {"a": 2}
  assert "(4,) float32 -> (2,) int32" in caplog.text


def test_a_batch_that_cannot_be_stacked_names_the_task_feature_and_shapes():
  from moe_jax.data import BatchIterator
  source = [{"audio": np.zeros(n, np.int16), "label": np.int32(1)} for n in (5, 7, 5, 9)]
  it = BatchIterator(source, 4, seed=0, shuffle=False, name="task 'digits'")
  with pytest.raises(ValueError, match=r"task 'digits': feature 'audio' cannot be stacked into "
                                       r"a batch: examples have shapes \(5,\), \(7,\), \(9,\) "
                                       r"and dtypes int16"):
    next(it)


def test_eval_source_args_reach_the_held_out_source_only():
  # pylint: disable-next=import-outside-toplevel
  from moe_jax.train.trainer import task_iterator
  from moe_jax.data import make_source  # pylint: disable=import-outside-toplevel
  cfg = {"t": dict(kind="classify", source="digits_image:train", eval_source="digits_image:test",
                   source_args=dict(size=40, noise=0.2), eval_source_args=dict(noise=0.2))}
  task, = tasks_from_config(cfg, lambda spec, kw: make_source(spec, **kw))
  assert len(task_iterator(task, task.source, 0, True, {}).source) == 40
  held_out = task_iterator(task, task.eval_source, 0, False, {}).source
  assert len(held_out) == 360 and held_out.noise == 0.2  # the whole test split, noisy
  plain, = tasks_from_config({"t": {**cfg["t"], "eval_source_args": None, "num_classes": 10}})
  assert len(task_iterator(plain, plain.eval_source, 0, False, {}).source) == 40  # source_args
