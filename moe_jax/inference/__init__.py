"""Generation from a decoder LM: a preallocated KV cache (cache.py), sampling
(sampling.py) and the decode loop (generate.py)."""
from moe_jax.inference.generate import Generator, decode_model_config
from moe_jax.inference.sampling import SamplingConfig

__all__ = ["Generator", "SamplingConfig", "decode_model_config"]
