"""Task: what one AGD task trains (kind, data, modalities, head), as models see it.

A spec shared by models (which read kind, modalities, heads) and training (which
samples and batches tasks); it lives here so models never import training code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from moe_jax import validation as V

TASK_KINDS = ("classify", "contrastive", "lm")
MODALITIES = ("image", "video", "audio", "text", "tokens")
VALID = "valid"  # eval batches: bool[B], False on the fill that pads the last batch


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the AGD mix.

  Attributes:
    name: unique name; also the classifier head's name unless `head` is set.
    kind: "classify" (modalities[0] -> label), "contrastive" (modalities[0] <->
      modalities[1], symmetric NCE) or "lm" (next-token prediction on "tokens").
    source, eval_source: data source specs (see moe_jax.data.make_source).
    batch_size: examples per step.
    modalities: the input fields the task reads.
    num_classes: classifier width (classify).
    class_names: for zero-shot eval of contrastive tasks with a text side.
    head: classifier head name, to share a head between tasks.
    drop_rates: ((modality, rate), ...): DropToken rate while training.
    image_size: resize images/video frames to this square size (None: as stored).
    weight: sampling weight ("weighted" sampler) or steps per turn ("interval").
    microbatches: split the batch and accumulate gradients.
    source_args: ((name, value), ...) keyword arguments of the data source.
    eval_source_args: the same for eval_source (None: source_args), e.g. to keep a
      training-set size cut off the held-out split.
    prompt_template: zero-shot prompt made from a class name, e.g. "a handwritten {}".
    task_id: the task's index in the experiment (set by tasks_from_config); routers
      that condition on the task read it from the Context.
    transforms: host preprocessing, one call per entry, e.g. ("decode_image",
      "resize(36)", "random_crop(32)"); config may give one "a|b(1)" string (see
      moe_jax.data.transforms). Train-time randomness (crops, flips, audio windows)
      is off at eval.
    eval_transforms: for eval_source, when it needs other preprocessing (None: the same).
    eval_batch_size: eval examples per step (None: batch_size); the last batch of the
      split is filled up and masked, so every example counts once.
    prompt_ids: zero-shot prompts as token ids, one tuple per class, made by the task's
      own `tokenize` transform (set by tasks_from_config); () means byte tokens.
  """

  name: str
  kind: str
  source: str
  eval_source: str | None = None
  batch_size: int = 32
  modalities: tuple[str, ...] = ("image",)
  num_classes: int = 0
  class_names: tuple[str, ...] = ()
  head: str | None = None
  drop_rates: tuple[tuple[str, float], ...] = ()
  image_size: int | None = None
  weight: float = 1.0
  microbatches: int = 1
  source_args: tuple[tuple[str, Any], ...] = ()
  eval_source_args: tuple[tuple[str, Any], ...] | None = None
  prompt_template: str = "{}"
  task_id: int = 0
  transforms: tuple[str, ...] = ()
  eval_transforms: tuple[str, ...] | None = None
  eval_batch_size: int | None = None
  prompt_ids: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    V.check_choice(f"tasks.{self.name}.kind", self.kind, TASK_KINDS)
    for m in self.modalities:
      V.check_choice(f"tasks.{self.name}.modalities", m, MODALITIES)
    need = {"classify": 1, "contrastive": 2, "lm": 1}[self.kind]
    if len(self.modalities) != need:
      raise ValueError(f"tasks.{self.name}: kind={self.kind!r} needs {need} modalities, got "
                       f"{self.modalities}")
    if self.kind == "classify":
      V.check_int_range(f"tasks.{self.name}.num_classes", self.num_classes, lo=2)
    V.check_int_range(f"tasks.{self.name}.batch_size", self.batch_size, lo=1)
    V.check_int_range(f"tasks.{self.name}.microbatches", self.microbatches, lo=1)
    if self.eval_batch_size is not None:
      V.check_int_range(f"tasks.{self.name}.eval_batch_size", self.eval_batch_size, lo=1)
    if self.batch_size % self.microbatches:
      raise ValueError(f"tasks.{self.name}.batch_size={self.batch_size} is not divisible by "
                       f"microbatches={self.microbatches}")
    V.check_positive(f"tasks.{self.name}.weight", self.weight)
    for m, rate in self.drop_rates:
      V.check_fraction(f"tasks.{self.name}.drop_rates[{m}]", rate)

  @property
  def head_name(self) -> str:
    return self.head or self.name

  def drop_rate(self, modality: str) -> float:
    return dict(self.drop_rates).get(modality, 0.0)
