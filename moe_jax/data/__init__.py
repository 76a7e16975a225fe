"""Data for multimodal multitask (AGD) training: sources, tokenizer, batching.

Embedded offline sources (`make_source("digits_video:test")`): digits_image,
digits_caption, digits_video, dtmf_audio, stdlib_text; TFDS through
`make_source("tfds:mnist:train")`. `BatchIterator` turns any source into
deterministic, resumable, per-process batches of numpy arrays.
"""
from moe_jax.data.pipeline import BatchIterator
from moe_jax.data.sources import SOURCES, make_source
from moe_jax.data.text import ByteTokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "SOURCES", "make_source"]
