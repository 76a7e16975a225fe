"""Attention: multi-head self-attention with RoPE, GQA and the KV cache (mha.py);
multi-head latent attention (mla.py); mixture-of-head attention (moh.py).

`TransformerConfig.attention` names the registered q/k/v attention (ATTENTIONS) a block
uses, a name or dict(name=..., **options): "mha" (SelfAttention, configured by the stack's
own fields) or "moh" (MoHAttention: per-token head routing). A new variant is one file
here that registers itself; `ATTENTIONS.get(name)` imports `moe_jax.nn.attention.<name>`
on first use.
"""
from moe_jax.nn.attention.mha import SelfAttention, apply_rope, attend_with_cache
from moe_jax.nn.attention.mla import LatentAttention
from moe_jax.registry import Registry

ATTENTIONS = Registry("attention", package="moe_jax.nn.attention")
ATTENTIONS.register("mha")(SelfAttention)

from moe_jax.nn.attention.moh import MoHAttention  # noqa: E402  (registers "moh")


def attention_options(cls) -> tuple[str, ...]:
  """The options a user may set for an attention class (its OPTIONS; mha: none)."""
  return tuple(getattr(cls, "OPTIONS", ()))


def check_attention_spec(spec, num_heads: int) -> None:
  """Unknown attention names and options fail at config build, in one line."""
  cls = ATTENTIONS.get(spec.name)
  allowed = attention_options(cls)
  unknown = sorted(set(spec.kwargs()) - set(allowed))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for attention {spec.name!r}; valid: "
                     f"{', '.join(allowed) or '(none)'}")
  check = getattr(cls, "check_options", None)
  if check is not None:
    check(num_heads, **spec.kwargs())


__all__ = ["ATTENTIONS", "LatentAttention", "attention_options", "MoHAttention", "SelfAttention", "apply_rope",
           "attend_with_cache", "check_attention_spec"]
