"""Hugging Face MoE families -> moe_jax model configs and tensor maps.

Each family is data, not a branch inside a layer: how its config.json fields become
moe_jax's `config.model` (the library's own components: grouped-query attention, q/k
norms, top-k routers, SwiGLU expert banks, gated shared experts) and which HF tensor
becomes which parameter. A config field that is neither mapped nor known to leave the
forward pass unchanged is a one-line error naming it: never silently ignored.

Supported: mixtral, qwen2_moe, qwen3_moe, olmoe.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Fields that do not change the forward pass (training-time switches, token ids kept
# for generation, bookkeeping).
NEUTRAL = {"architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
           "output_router_logits", "initializer_range", "bos_token_id", "eos_token_id",
           "pad_token_id", "_name_or_path", "max_position_embeddings", "output_hidden_states",
           "output_attentions", "return_dict", "id2label", "label2id", "chunk_size_feed_forward",
           "is_encoder_decoder", "problem_type", "router_jitter_noise", "tokenizer_class",
           "model_type", "attention_dropout", "router_aux_loss_coef"}
COMMON = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
          "rope_theta", "rope_scaling", "tie_word_embeddings", "num_experts_per_tok",
          "intermediate_size", "norm_topk_prob"}


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model_type maps onto moe_jax."""

  fields: frozenset[str]  # family-specific fields understood (beyond COMMON / NEUTRAL)
  moe_prefix: str  # "block_sparse_moe" (Mixtral) or "mlp"
  expert_names: tuple[str, str, str]  # HF names of the (gate, up, down) projections
  qkv_bias: bool = False
  qk_norm: str = "none"
  renormalize_default: bool = False


FAMILIES = {
    "mixtral": Family(frozenset({"num_local_experts", "sliding_window"}), "block_sparse_moe",
                      ("w1", "w3", "w2"), renormalize_default=True),
    "qwen2_moe": Family(frozenset({"num_experts", "moe_intermediate_size",
                                   "shared_expert_intermediate_size", "decoder_sparse_step",
                                   "mlp_only_layers", "use_sliding_window", "sliding_window",
                                   "max_window_layers", "layer_types", "qkv_bias"}),
                        "mlp", ("gate_proj", "up_proj", "down_proj"), qkv_bias=True),
    "qwen3_moe": Family(frozenset({"num_experts", "num_local_experts", "moe_intermediate_size",
                                   "decoder_sparse_step", "mlp_only_layers", "attention_bias",
                                   "use_sliding_window", "sliding_window", "max_window_layers",
                                   "layer_types"}),
                        "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm="head"),
    "olmoe": Family(frozenset({"num_experts", "attention_bias", "clip_qkv"}), "mlp",
                    ("gate_proj", "up_proj", "down_proj"), qk_norm="full"),
}


class UnsupportedCheckpoint(ValueError):
  """The checkpoint uses something moe_jax cannot reproduce; the message is one line."""


def family_of(hf: Mapping[str, Any]) -> tuple[str, Family]:
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise UnsupportedCheckpoint(f"model_type {model_type!r} is not supported; supported: "
                                f"{', '.join(sorted(FAMILIES))}")
  return model_type, FAMILIES[model_type]


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_parameters (transformers 5) or rope_theta + rope_scaling (earlier files)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type", "default") if params else (
      scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default")
  if kind != "default":
    field = "rope_parameters" if params else "rope_scaling"
    raise UnsupportedCheckpoint(f"config.json field {field} has rope_type {kind!r}; only "
                                "'default' RoPE is supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _check(hf: Mapping[str, Any], name: str, ok: bool, why: str) -> None:
  if not ok:
    raise UnsupportedCheckpoint(f"config.json field {name}={hf.get(name)!r} is not supported: "
                                f"{why}")


def model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """config.json -> moe_jax `config.model` (a dict for models.build_model)."""
  model_type, fam = family_of(hf)
  known = NEUTRAL | COMMON | fam.fields
  unknown = sorted(k for k in hf if k not in known)
  if unknown:
    raise UnsupportedCheckpoint(
        f"config.json field {unknown[0]}={hf[unknown[0]]!r} is not understood by the "
        f"{model_type} import (it could change the outputs); fields understood: "
        f"{', '.join(sorted(known - NEUTRAL))}")
  _check(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "only silu (SwiGLU) experts")
  _check(hf, "sliding_window", not hf.get("sliding_window") or (
      model_type != "mixtral" and not hf.get("use_sliding_window")), "no sliding-window attention")
  _check(hf, "use_sliding_window", not hf.get("use_sliding_window"), "no sliding-window attention")
  _check(hf, "attention_bias", not hf.get("attention_bias"), "no o_proj bias")
  _check(hf, "clip_qkv", hf.get("clip_qkv") is None, "no q/k/v clipping")
  _check(hf, "layer_types", all(t == "full_attention" for t in hf.get("layer_types") or ()),
         "full attention layers only")
  L = int(hf["num_hidden_layers"])
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense = set(hf.get("mlp_only_layers") or ())
  moe_layers = tuple(i for i in range(L) if (i + 1) % step == 0 and i not in dense)
  E = int(hf.get("num_local_experts") or hf.get("num_experts"))
  F = int(hf.get("moe_intermediate_size") or hf["intermediate_size"])
  moe = dict(num_experts=E, expert_hidden_dim=F, dispatch="sorted",  # dropless, like HF
             router=dict(name="top_k", k=int(hf["num_experts_per_tok"]), score="softmax",
                         renormalize=bool(hf.get("norm_topk_prob", fam.renormalize_default))),
             load_balance_weight=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_weight=0.0)
  if hf.get("shared_expert_intermediate_size"):
    moe.update(num_shared_experts=1, shared_hidden_dim=int(hf["shared_expert_intermediate_size"]),
               shared_expert_gate=True)
  heads = int(hf["num_attention_heads"])
  return dict(name="lm", dtype="float32", vocab_size=int(hf["vocab_size"]),
              d_model=int(hf["hidden_size"]), num_layers=L, num_heads=heads,
              num_kv_heads=int(hf.get("num_key_value_heads") or heads),
              head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
              mlp_dim=int(hf["intermediate_size"]), causal=True, rope=True,
              rope_max_wavelength=_rope_theta(hf),
              qkv_bias=bool(hf.get("qkv_bias", fam.qkv_bias)), qk_norm=fam.qk_norm,
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), moe=moe, moe_layers=moe_layers,
              lm_head_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One moe_jax parameter (path under params) made from HF tensors.

  kind: "copy"; "linear" (HF [out, in] -> [in, out]); "heads_in" ([heads*Q, D] ->
  [D, heads, Q]); "heads_out" ([D, H*Q] -> [H, Q, D]); "heads_bias" ([heads*Q] ->
  [heads, Q]). Several `hf` names (one per expert) are stacked on a leading axis.
  """

  path: tuple[str, ...]
  hf: tuple[str, ...]
  kind: str = "copy"
  heads: int = 0
  stacked: bool = False


def entries(hf: Mapping[str, Any], model: Mapping[str, Any]) -> list[Entry]:
  """Every parameter of the moe_jax model built from `model`, with its HF source."""
  _, fam = family_of(hf)
  H, Y, E = model["num_heads"], model["num_kv_heads"], model["moe"]["num_experts"]
  out = [Entry(("embedding", "embedding"), ("model.embed_tokens.weight",)),
         Entry(("decoder", "final_norm", "scale"), ("model.norm.weight",))]
  if not model["tie_embeddings"]:
    out.append(Entry(("lm_head", "kernel"), ("lm_head.weight",), "linear"))
  for i in range(model["num_layers"]):
    hf_l, ours = f"model.layers.{i}.", ("decoder", "layers", f"block_{i}")
    att = ours + ("attention",)
    out += [Entry(ours + ("attention_norm", "scale"), (hf_l + "input_layernorm.weight",)),
            Entry(ours + ("ffn_norm", "scale"), (hf_l + "post_attention_layernorm.weight",)),
            Entry(att + ("w_q_DHQ",), (hf_l + "self_attn.q_proj.weight",), "heads_in", H),
            Entry(att + ("w_k_DYQ",), (hf_l + "self_attn.k_proj.weight",), "heads_in", Y),
            Entry(att + ("w_v_DYQ",), (hf_l + "self_attn.v_proj.weight",), "heads_in", Y),
            Entry(att + ("w_out_HQD",), (hf_l + "self_attn.o_proj.weight",), "heads_out", H)]
    if model["qkv_bias"]:
      out += [Entry(att + (f"b_{n}_{a}",), (hf_l + f"self_attn.{n}_proj.bias",), "heads_bias", h)
              for n, a, h in (("q", "HQ", H), ("k", "YQ", Y), ("v", "YQ", Y))]
    if model["qk_norm"] != "none":
      out += [Entry(att + (f"{n}_norm", "scale"), (hf_l + f"self_attn.{n}_norm.weight",))
              for n in ("q", "k")]
    gate, up, down = fam.expert_names
    if i in model["moe_layers"]:
      moe_hf, moe = hf_l + fam.moe_prefix + ".", ours + ("moe",)
      out.append(Entry(moe + ("router", "w_DE"), (moe_hf + "gate.weight",), "linear"))
      for ours_name, hf_name in (("w_gate_EDF", gate), ("w_up_EDF", up), ("w_down_EFD", down)):
        out.append(Entry(moe + ("experts", ours_name),
                         tuple(f"{moe_hf}experts.{e}.{hf_name}.weight" for e in range(E)),
                         "linear", stacked=True))
      if model["moe"].get("num_shared_experts"):
        out += [Entry(moe + ("shared_experts", f"w_{n}"), (f"{moe_hf}shared_expert.{p}.weight",),
                      "linear")
                for n, p in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                             ("down_FD", "down_proj"))]
        out.append(Entry(moe + ("shared_gate_w_D1",), (moe_hf + "shared_expert_gate.weight",),
                         "linear"))
    else:
      out += [Entry(ours + ("mlp", f"w_{n}"), (f"{hf_l}mlp.{p}.weight",), "linear")
              for n, p in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                           ("down_FD", "down_proj"))]
  return out
