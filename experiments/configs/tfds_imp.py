r"""IMP on your own TFDS datasets: image, audio and/or text classification, from config only.

  python -m experiments.train --workdir=/tmp/flowers \
      --config=experiments/configs/tfds_imp.py:image=tf_flowers,data_dir=$HOME/tensorflow_datasets
  python -m experiments.train --workdir=/tmp/digits_audio \
      --config=experiments/configs/tfds_imp.py:audio=spoken_digit,sample_rate=8000,eval_split=train[90%:],train_split=train[:90%]

The argument after ':' is comma-separated key=value (all optional but one dataset):
  image=NAME       an image classification dataset (features "image", "label"): a
                   classifier task and an image <-> caption contrastive task whose
                   captions are made from the class names (zero-shot eval included)
  audio=NAME       an audio classification dataset (int16 or float waveforms "audio",
                   any length, "label"): waveform -> 1 s window -> log-mel -> classifier
  text=NAME        a text classification dataset (a string feature "text", "label")
  data_dir=DIR     where the datasets are prepared (default: TFDS's ~/tensorflow_datasets)
  train_split=S    default "train";  eval_split=S  default "test" (TFDS slicing works)
  size=N           image side after resize + crop (default 32)
  sample_rate=HZ   the audio's sample rate (default 16000); it is resampled to 8 kHz
  steps=N          training steps (default 2000);  batch=N  batch size (default 32)
Feature names other than image / audio / text / label: image_key=..., audio_key=...,
text_key=..., label_key=....

The datasets must be prepared offline in the array_record format: on a machine with
network `tfds build NAME --data_dir=DIR --file_format=array_record` and copy DIR here,
or write your own files with moe_jax.data.tfds_writer.write_tfds_dataset.
Every field below can be overridden, e.g.
--config.tasks.image_cls.transforms='resize(72)|random_crop(64)|flip'.
"""
import ml_collections

from experiments.configs import imp_tiny
from experiments.configs.fields import expose_fields

_DEFAULTS = dict(image="", audio="", text="", data_dir="", train_split="train",
                 eval_split="test", size="32", sample_rate="16000", steps="2000", batch="32",
                 image_key="image", audio_key="audio", text_key="text", label_key="label")


def parse_arg(arg: str | None) -> dict[str, str]:
  opts = dict(_DEFAULTS)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in opts:
      raise ValueError(f"tfds_imp.py argument {item!r}: expected key=value with key one of "
                       f"{', '.join(opts)}")
    opts[key] = value
  if not (opts["image"] or opts["audio"] or opts["text"]):
    raise ValueError("tfds_imp.py needs at least one dataset: image=NAME, audio=NAME or "
                     "text=NAME (e.g. --config=experiments/configs/tfds_imp.py:image=tf_flowers)")
  return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  o = parse_arg(arg)
  c = imp_tiny.get_config()
  batch, size = int(o["batch"]), int(o["size"])
  common = dict(batch_size=batch, eval_batch_size=batch)

  def source_args(modality: str) -> dict:
    args = dict(feature_map={modality: o[f"{modality}_key"], "label": o["label_key"]})
    return {**args, "data_dir": o["data_dir"]} if o["data_dir"] else args

  def specs(name: str) -> dict:
    return dict(source=f"tfds:{name}:{o['train_split']}",
                eval_source=f"tfds:{name}:{o['eval_split']}")

  tasks = {}
  if o["image"]:
    # TFDS decodes images (uint8 -> float32 in [0, 1]); the shorter side goes to
    # 1.15 x size, then a random (train) or central (eval) size x size crop.
    image_pp = f"resize({round(1.15 * size)})|random_crop({size})|flip|normalize(0.5, 0.5)"
    tasks["image_cls"] = dict(kind="classify", **specs(o["image"]), modalities=("image",),
                              source_args=source_args("image"), transforms=image_pp,
                              drop_rates={"image": 0.25}, **common)
    tasks["image_text"] = dict(
        kind="contrastive", **specs(o["image"]), modalities=("image", "text"),
        source_args=source_args("image"), prompt_template="a photo of a {}",
        transforms=image_pp + "|caption(templates=('a photo of a {}', 'a picture of a {}', "
                              "'an image showing a {}'))|tokenize(length=32)", **common)
  if o["audio"]:
    # Waveform -> float -> 8 kHz -> a 1 s window (random while training, central at eval;
    # shorter clips padded and masked) -> 32-band log-mel (61 frames) -> per-clip
    # standardization over the real frames.
    tasks["audio_cls"] = dict(
        kind="classify", **specs(o["audio"]), modalities=("audio",),
        source_args=source_args("audio"),
        transforms=(f"audio_to_float|resample(from_rate={int(o['sample_rate'])}, to_rate=8000)"
                    "|pad_crop(seconds=1.0, sample_rate=8000)|log_mel(sample_rate=8000, "
                    "n_fft=256, hop=128, num_mels=32, f_min=20.0, f_max=4000.0)|standardize"),
        **common)
  if o["text"]:
    tasks["text_cls"] = dict(kind="classify", **specs(o["text"]), modalities=("text",),
                             source_args=source_args("text"), transforms="tokenize(length=128)",
                             **common)
  c.tasks = tasks
  expose_fields(c)  # the new tasks' source_args.data_dir too
  c.train.num_steps = int(o["steps"])
  c.train.eval_every = max(1, int(o["steps"]) // 2)
  c.train.checkpoint_every = max(1, min(500, int(o["steps"])))
  c.train.log_every = max(1, min(100, int(o["steps"])))
  return c
