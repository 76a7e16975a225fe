"""Hugging Face MoE families -> moe_jax model configs and tensor maps.

Each family is data, not a branch inside a layer: how its config.json fields become
moe_jax's `config.model` (the library's own components: grouped-query attention, q/k
norms, top-k routers, SwiGLU expert banks, gated shared experts) and which HF tensor
becomes which parameter. A config field that is neither mapped nor known to leave the
forward pass unchanged is a one-line error naming it: never silently ignored.

Supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 (multi-head latent attention,
sigmoid scores with the score-correction bias, group-limited top-k, routed scaling,
shared experts, dense first layers; the multi-token-prediction layers are not used).
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
  latent_attention: bool = False  # DeepSeek's MLA instead of q/k/v heads


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
    "deepseek_v3": Family(frozenset({
        "n_routed_experts", "n_shared_experts", "routed_scaling_factor", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "qk_head_dim",
        "n_group", "topk_group", "first_k_dense_replace", "rope_interleave",
        "num_nextn_predict_layers", "pretraining_tp", "attention_bias", "moe_intermediate_size",
        "scoring_func", "topk_method", "moe_layer_freq", "ep_size", "aux_loss_alpha",
        "seq_aux"}), "mlp", ("gate_proj", "up_proj", "down_proj"), renormalize_default=True,
        latent_attention=True),
}
# DeepSeek-V3's bias balancing step (arXiv:2412.19437, gamma); config.json does not hold it.
DEEPSEEK_BIAS_UPDATE_RATE = 1e-3


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
  # Qwen's configs carry a sliding_window that use_sliding_window switches on (per layer,
  # with max_window_layers): not reproduced. Mixtral's applies to every layer when set.
  _check(hf, "use_sliding_window", not hf.get("use_sliding_window"),
         "per-layer sliding windows (Qwen) are not reproduced")
  _check(hf, "attention_bias", not hf.get("attention_bias"), "no o_proj bias")
  _check(hf, "clip_qkv", hf.get("clip_qkv") is None, "no q/k/v clipping")
  _check(hf, "layer_types", all(t == "full_attention" for t in hf.get("layer_types") or ()),
         "full attention layers only")
  L = int(hf["num_hidden_layers"])
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense = set(hf.get("mlp_only_layers") or ()) | set(range(int(hf.get("first_k_dense_replace", 0))))
  moe_layers = tuple(i for i in range(L) if (i + 1) % step == 0 and i not in dense)
  if fam.latent_attention:
    _check(hf, "scoring_func", hf.get("scoring_func", "sigmoid") == "sigmoid", "sigmoid only")
    _check(hf, "topk_method", hf.get("topk_method", "noaux_tc") == "noaux_tc",
           "noaux_tc (bias-corrected, group-limited) only")
    _check(hf, "moe_layer_freq", int(hf.get("moe_layer_freq", 1)) == 1, "every layer MoE only")
    _check(hf, "pretraining_tp", int(hf.get("pretraining_tp", 1)) == 1, "1 only")
  E = int(hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts"))
  F = int(hf.get("moe_intermediate_size") or hf["intermediate_size"])
  moe = dict(num_experts=E, expert_hidden_dim=F, dispatch="sorted",  # dropless, like HF
             router=dict(name="top_k", k=int(hf["num_experts_per_tok"]), score="softmax",
                         renormalize=bool(hf.get("norm_topk_prob", fam.renormalize_default))),
             load_balance_weight=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_weight=0.0)
  if hf.get("shared_expert_intermediate_size"):
    moe.update(num_shared_experts=1, shared_hidden_dim=int(hf["shared_expert_intermediate_size"]),
               shared_expert_gate=True)
  extra: dict[str, Any] = {}
  if fam.latent_attention:
    moe["router"].update(score="sigmoid", n_group=int(hf.get("n_group", 1)),
                         topk_group=int(hf.get("topk_group", 1)),
                         routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                         bias_update_rate=DEEPSEEK_BIAS_UPDATE_RATE)
    moe["load_balance_weight"] = float(hf.get("aux_loss_alpha", 1e-4))
    if hf.get("n_shared_experts"):  # one FFN of n_shared x the expert width, no gate
      moe.update(num_shared_experts=int(hf["n_shared_experts"]), shared_hidden_dim=F)
    extra["mla"] = dict(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=int(hf["kv_lora_rank"]),
                        qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                        qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                        v_head_dim=int(hf["v_head_dim"]),
                        rope_interleave=bool(hf.get("rope_interleave", True)))
  heads = int(hf["num_attention_heads"])
  return dict(name="lm", dtype="float32", vocab_size=int(hf["vocab_size"]), **extra,
              d_model=int(hf["hidden_size"]), num_layers=L, num_heads=heads,
              num_kv_heads=int(hf.get("num_key_value_heads") or heads),
              head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
              mlp_dim=int(hf["intermediate_size"]), causal=True, rope=True,
              rope_max_wavelength=_rope_theta(hf),
              qkv_bias=bool(hf.get("qkv_bias", fam.qkv_bias)), qk_norm=fam.qk_norm,
              sliding_window=(int(hf["sliding_window"]) if model_type == "mixtral"
                              and hf.get("sliding_window") else None),
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
  collection: str = "params"  # or "router_state" (DeepSeek-V3's correction bias)


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
            Entry(ours + ("ffn_norm", "scale"), (hf_l + "post_attention_layernorm.weight",))]
    if fam.latent_attention:
      out += _latent_attention_entries(hf_l + "self_attn.", att, model["mla"])
    else:
      out += _head_entries(hf_l, att, model, H, Y)
    gate, up, down = fam.expert_names
    if i in model["moe_layers"]:
      moe_hf, moe = hf_l + fam.moe_prefix + ".", ours + ("moe",)
      out.append(Entry(moe + ("router", "w_DE"), (moe_hf + "gate.weight",), "linear"))
      if fam.latent_attention:
        out.append(Entry(moe + ("router", "bias_E"), (moe_hf + "gate.e_score_correction_bias",),
                         collection="router_state"))
      for ours_name, hf_name in (("w_gate_EDF", gate), ("w_up_EDF", up), ("w_down_EFD", down)):
        out.append(Entry(moe + ("experts", ours_name),
                         tuple(f"{moe_hf}experts.{e}.{hf_name}.weight" for e in range(E)),
                         "linear", stacked=True))
      if model["moe"].get("num_shared_experts"):
        shared = "shared_experts" if fam.latent_attention else "shared_expert"
        out += [Entry(moe + ("shared_experts", f"w_{n}"), (f"{moe_hf}{shared}.{p}.weight",),
                      "linear")
                for n, p in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                             ("down_FD", "down_proj"))]
        if model["moe"].get("shared_expert_gate"):
          out.append(Entry(moe + ("shared_gate_w_D1",), (moe_hf + "shared_expert_gate.weight",),
                           "linear"))
    else:
      out += [Entry(ours + ("mlp", f"w_{n}"), (f"{hf_l}mlp.{p}.weight",), "linear")
              for n, p in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"),
                           ("down_FD", "down_proj"))]
  return out


def _head_entries(hf_l: str, att: tuple[str, ...], model, H: int, Y: int) -> list[Entry]:
  out = [Entry(att + ("w_q_DHQ",), (hf_l + "self_attn.q_proj.weight",), "heads_in", H),
            Entry(att + ("w_k_DYQ",), (hf_l + "self_attn.k_proj.weight",), "heads_in", Y),
            Entry(att + ("w_v_DYQ",), (hf_l + "self_attn.v_proj.weight",), "heads_in", Y),
            Entry(att + ("w_out_HQD",), (hf_l + "self_attn.o_proj.weight",), "heads_out", H)]
  if model["qkv_bias"]:
    out += [Entry(att + (f"b_{n}_{a}",), (hf_l + f"self_attn.{n}_proj.bias",), "heads_bias", h)
            for n, a, h in (("q", "HQ", H), ("k", "YQ", Y), ("v", "YQ", Y))]
  if model["qk_norm"] != "none":
    out += [Entry(att + (f"{n}_norm", "scale"), (hf_l + f"self_attn.{n}_norm.weight",))
            for n in ("q", "k")]
  return out


def _latent_attention_entries(hf_a: str, att: tuple[str, ...], mla) -> list[Entry]:
  """DeepSeek's MLA projections (moe_jax/nn/attention/mla.py): Dense kernels, [in, out]."""
  names = [("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_b_proj", "kv_b_proj"), ("o_proj", "o_proj")]
  names += ([("q_proj", "q_proj")] if mla.get("q_lora_rank") is None else
            [("q_a_proj", "q_a_proj"), ("q_b_proj", "q_b_proj")])
  out = [Entry(att + (ours, "kernel"), (f"{hf_a}{theirs}.weight",), "linear")
         for ours, theirs in names]
  out.append(Entry(att + ("kv_a_norm", "scale"), (hf_a + "kv_a_layernorm.weight",)))
  if mla.get("q_lora_rank") is not None:
    out.append(Entry(att + ("q_a_norm", "scale"), (hf_a + "q_a_layernorm.weight",)))
  return out


def ignored_tensors(hf: Mapping[str, Any], names: set[str]) -> set[str]:
  """Tensors a checkpoint may hold that the model does not use: DeepSeek-V3's
  multi-token-prediction layers (numbered after the last decoder layer), which
  transformers does not load either."""
  L = int(hf["num_hidden_layers"])
  extra = int(hf.get("num_nextn_predict_layers") or 0)
  prefixes = tuple(f"model.layers.{L + j}." for j in range(extra))
  return {n for n in names if prefixes and n.startswith(prefixes)}
