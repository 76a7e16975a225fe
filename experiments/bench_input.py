r"""Input pipeline throughput vs the training step, per task (examples per second).

  python -m experiments.bench_input                       # imp_tiny's embedded tasks
  python -m experiments.bench_input --image_dataset=/tmp/bench_tfds   # + a TFDS image task

For every task: examples/s of the loader alone (serial, grain threads, grain worker
processes) and of the jitted train step alone (after compiling), in one process. The
loader keeps up when its rate exceeds the step's; on a 2-core machine both compete for
the same cores during training, so the rates are upper bounds there.
--image_dataset writes (once) a TFDS dataset of JPEG photos-like images, 240-400 px a
side, and times `tfds_imp.py:image=...` (decode + resize + crop + flip + normalize).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.configs import imp_tiny, tfds_imp
from moe_jax import models
from moe_jax.data import make_source
from moe_jax.parallel.partitioning import global_batch, mesh_from_config
from moe_jax.train import agd
from moe_jax.train.step import init_train_state, make_optimizer, make_train_step
from moe_jax.train.trainer import first_train_batches, task_iterator

_IMAGE_DATASET = flags.DEFINE_string("image_dataset", None,
                                     "data_dir for the synthetic TFDS image dataset (written "
                                     "there once); unset: embedded tasks only")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per loader setting.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed train steps per task.")
_JSON = flags.DEFINE_string("json", None, "Write the rows to this path.")

LOADERS = {"serial": dict(num_threads=0), "1 thread": dict(num_threads=1),
           "2 threads": dict(num_threads=2), "2 workers": dict(num_workers=2)}
IMAGE_NAME, IMAGE_EXAMPLES = "bench_images", 256


def write_image_dataset(data_dir: str) -> None:
    if os.path.isdir(os.path.join(data_dir, IMAGE_NAME)):
        return
    import tensorflow_datasets as tfds
    from PIL import Image

    from moe_jax.data.tfds_writer import write_tfds_dataset

    def examples(n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(240, 401, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (1 + i % 3)) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
            noise = rng.integers(0, 40, (h, w, 3))
            yield {"image": Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)),
                   "label": i % 10}

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10)})
    write_tfds_dataset(IMAGE_NAME, features, {"train": examples(IMAGE_EXAMPLES, 0),
                                              "test": examples(64, 1)}, data_dir)


def loader_rate(task, loader: dict, batches: int) -> float:
    it = task_iterator(task, task.source, 0, True, loader)
    next(it)  # start-up (threads, worker processes) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * task.batch_size / (time.perf_counter() - t0)
    it.close()
    return rate


def step_rates(config, tasks, steps: int) -> dict[str, float]:
    mesh = mesh_from_config(None)
    with jax.set_mesh(mesh):
        model = models.build_model(config.model)
        tx = make_optimizer(config.optimizer, 1000)
        batches = {name: global_batch(mesh, b) for name, b in first_train_batches(tasks).items()}
        state, _ = init_train_state(model, tx, batches, tasks, 0, mesh)
        train_step, _ = make_train_step(model, tx)
        step = jax.jit(train_step, static_argnames=("task",), donate_argnums=(0,))
        rates = {}
        for task in tasks:
            state, m = step(state, batches[task.name], task=task)  # compile
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, batches[task.name], task=task)
            jax.block_until_ready(m)
            rates[task.name] = steps * task.batch_size / (time.perf_counter() - t0)
    return rates


def main(argv):
    del argv
    configs = {"imp_tiny": imp_tiny.get_config()}
    if _IMAGE_DATASET.value:
        write_image_dataset(_IMAGE_DATASET.value)
        configs["tfds_imp image"] = tfds_imp.get_config(
            f"image={IMAGE_NAME},data_dir={_IMAGE_DATASET.value},eval_split=test")
    rows = []
    for label, config in configs.items():
        tasks = agd.tasks_from_config(config.tasks, lambda s, kw: make_source(s, **kw))
        steps = step_rates(config, tasks, _STEPS.value)
        for task in tasks:
            row = {"config": label, "task": task.name, "batch": task.batch_size,
                   "transforms": "|".join(task.transforms) or "(none)",
                   "train_step": steps[task.name]}
            for name, loader in LOADERS.items():
                row[name] = loader_rate(task, loader, _BATCHES.value)
            rows.append(row)
            print(f"{label:15s} {task.name:11s} step {row['train_step']:8.0f} ex/s | loader "
                  + " | ".join(f"{n} {row[n]:8.0f}" for n in LOADERS), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"devices": str(jax.devices()), "cpus": os.cpu_count(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    cli.run(main)
