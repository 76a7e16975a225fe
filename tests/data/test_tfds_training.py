"""Training the IMP encoder on locally prepared TFDS datasets with transforms from config.

The datasets are written in the test (array_record, see tiny_tfds.py): images of varying
size, int16 clips of varying length, text; `experiments.train` trains on all of them
with `experiments/configs/tfds_imp.py` and a few overrides.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import tfds_imp
from moe_jax.data import BatchIterator, make_source
from moe_jax.data.transforms import Pipeline
from moe_jax.train import agd
from tests.data import tiny_tfds

pytest.importorskip("tensorflow_datasets")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tiny_tfds.write_all(path)
    return path


def _tasks(data_dir, **extra):
    arg = f"image=tiny_images,audio=tiny_speech,text=tiny_text,data_dir={data_dir}," \
          "sample_rate=8000,size=8,batch=4"
    config = tfds_imp.get_config(arg + "".join(f",{k}={v}" for k, v in extra.items()))
    return agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))


def test_config_transforms_give_every_task_static_shapes(data_dir):
    for task in _tasks(data_dir):
        source = make_source(task.source, **dict(task.source_args))
        it = BatchIterator(source, 4, seed=0, name=task.name,
                           transform=Pipeline(task.transforms, training=True,
                                              class_names=task.class_names))
        shapes = [{k: v.shape for k, v in it.batch_at(p).items()} for p in range(6)]
        assert all(s == shapes[0] for s in shapes), (task.name, shapes)
        assert "file_name" not in shapes[0]  # strings are dropped
        expected = {"image_cls": {"image": (4, 8, 8, 3)},
                    "image_text": {"image": (4, 8, 8, 3), "text": (4, 32), "text_mask": (4, 32)},
                    "audio_cls": {"audio": (4, 61, 32), "audio_mask": (4, 61)},
                    "text_cls": {"text": (4, 128), "text_mask": (4, 128)}}[task.name]
        assert {k: shapes[0][k] for k in expected} == expected
        assert task.class_names == tuple(tiny_tfds.NAMES) and task.num_classes == 3


def test_without_transforms_the_error_names_task_feature_and_shapes(data_dir):
    source = make_source("tfds:tiny_images:train", data_dir=data_dir,
                         feature_map={"image": "image", "label": "label"})
    with pytest.raises(ValueError, match=r"task 'x': feature 'image' cannot be stacked .* "
                                         r"shapes \(1\d, \d+, 3\)"):
        BatchIterator(source, 4, seed=0, name="task 'x'").batch_at(0)


def test_a_transform_on_the_wrong_feature_is_one_line_before_training(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = _train(data_dir, workdir, "--config.tasks.audio_cls.transforms=log_mel(sample_rate=8000)",
                    dataset_args="audio=tiny_speech")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"error: task 'audio_cls' \((train tfds:tiny_speech:train|eval "
                    r"tfds:tiny_speech:test)\), example \d+: transform log_mel: ", last), last
    assert "is int16 PCM; add audio_to_float before log_mel" in last
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))


def _train(data_dir, workdir, *overrides, dataset_args="image=tiny_images,audio=tiny_speech,"
           "text=tiny_text", steps=4):
    arg = (f"{dataset_args},data_dir={data_dir},sample_rate=8000,size=8,batch=4,steps={steps}")
    cmd = [sys.executable, "-m", "experiments.train", f"--config=experiments/configs/tfds_imp.py:{arg}",
           f"--workdir={workdir}", "--config.model.num_layers=2", "--config.model.moe_last=1",
           "--config.train.tensorboard=False", "--config.agd.sampler=interval", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_train_on_tfds_image_audio_text_one_compile_per_task_and_whole_eval_split(
        data_dir, tmp_path):
    result = _train(data_dir, str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    tasks = ["audio_cls", "image_cls", "image_text", "text_cls"]
    assert summary["compiles"] == {name: 1 for name in tasks}  # round robin: each task once
    for name in tasks:  # 10 test examples: 4 + 4 + 2 real (the last batch filled and masked)
        result_of = summary["eval"][name]
        assert result_of["eval_examples"] == 10 and result_of["eval_batches"] == 3, name
        # Accuracies are counts of 10 real examples: weighting by real examples makes them
        # whole tenths (weighting the 2-example batch like the others would not).
        for k, v in result_of.items():
            if k.endswith("accuracy"):
                assert abs(10 * v - round(10 * v)) < 1e-4, (name, k, v)
    assert "zero_shot_accuracy" in summary["eval"]["image_text"]
