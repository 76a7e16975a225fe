"""Frozen dataclasses carrying hyper-parameters into modules.

`MoEConfig` describes one MoE feed-forward layer, `TransformerConfig` a stack.
Both validate themselves on construction so a bad value fails at build time
with a message naming the field (see validation.py). Experiment configs
(ml_collections) are turned into these with `MoEConfig(**cfg.moe)` etc.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from moe_jax import validation as V

ACTIVATIONS = ("swiglu", "gelu")
QK_NORMS = ("none", "head", "full")
EXPERT_PARALLEL_MODES = ("auto", "capacity", "dropless")
# Options that were MoEConfig fields before routers carried their own (0.2.0).
_MOVED_TO_ROUTER = ("k", "renormalize", "batch_priority", "jitter", "fused_router")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """One sparse MoE feed-forward layer.

  Attributes:
    num_experts: E, routed experts.
    expert_hidden_dim: F, hidden width of each expert.
    router: a registered router's name, or dict(name=..., **its options), e.g.
      dict(name="top_k", k=2, renormalize=True, batch_priority=False, jitter=0.0,
      fused=False) or dict(name="expert_choice", jitter=0.0); see moe_jax.nn.routing.
      Unknown names and options fail here, listing the valid ones.
    dispatch: a registered dispatcher: "einsum" (one-hot, capacity, groups),
      "sorted" (dropless, ragged_dot), "pallas" (dropless, kernels_pallas grouped
      matmul), "tiled" (dropless, per-tile gathered weights in XLA: fastest
      dropless on CPU), "dense" (every expert on every token; a reference) or
      "auto" (the fastest dropless one on this platform).
    experts: a registered expert type ("ffn": E stacked SwiGLU/GELU FFNs).
    layer: the registered layer that fills an MoE position (moe_jax.nn.layers.MOE_LAYERS),
      a name or dict(name=..., **its options): "moe" (MoELayer: router -> dispatch ->
      experts) by default; see the layers package for the published variants.
    activation: "swiglu" or "gelu".
    capacity_factor: capacity while training; C = ceil(cf * S * k / E) for token
      choice with einsum, C = round(cf * S / E) for expert choice.
    eval_capacity_factor: capacity at eval; None means capacity_factor.
    min_capacity: lower bound on C.
    group_size: S, tokens per routing group (einsum and expert choice); None
      means all tokens of the call form one group.
    sequence_groups: route each sequence of a [B, S, D] input as its own group
      (group_size = S, overriding group_size), as V-MoE/IMP do per image; keeps
      one-hot dispatch cost linear in the batch.
    num_shared_experts: always-on FFNs added to the routed output.
    shared_hidden_dim: hidden width of each shared expert; None means F.
    shared_expert_gate: scale the shared experts' output per token by
      sigmoid(x @ w_D1), as Qwen2-MoE does.
    load_balance_weight: weight of the Switch load-balancing loss.
    z_loss_weight: weight of the router z-loss.
    expert_parallel: how tokens travel when the mesh in context (jax.set_mesh) has
      an `expert` axis > 1 (see parallel/expert_parallel.py): "capacity" (fixed
      buffers, all_to_all; top-k drops past C per device), "dropless" (ragged
      exchange) or "auto" (capacity for einsum and expert choice, dropless
      otherwise: the semantics the layer has on one device). `dispatch` runs the
      local experts.
    prune_beta: dynamic pruning at inference (deterministic calls only; MC-MoE's online
      dynamic pruning, arXiv:2410.06270): a token skips its slots whose combine weight
      is below prune_beta x its largest weight (weights not renormalised). 0: off.
  """

  num_experts: int = 8
  expert_hidden_dim: int = 256
  router: Any = "top_k"
  dispatch: str = "sorted"
  experts: str = "ffn"
  layer: Any = "moe"
  activation: str = "swiglu"
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  min_capacity: int = 1
  group_size: int | None = None
  sequence_groups: bool = False
  num_shared_experts: int = 0
  shared_hidden_dim: int | None = None
  shared_expert_gate: bool = False
  load_balance_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  expert_parallel: str = "auto"
  prune_beta: float = 0.0

  def __post_init__(self):
    # pylint: disable=import-outside-toplevel  (the registries import this module)
    from moe_jax.nn.dispatch import DISPATCHERS
    from moe_jax.nn.experts import EXPERTS
    from moe_jax.nn.layers import check_layer_spec
    from moe_jax.nn.routing import RouterSpec, check_router_spec
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_int_range("expert_hidden_dim", self.expert_hidden_dim, lo=1)
    object.__setattr__(self, "router", RouterSpec.parse(self.router))
    check_router_spec(self.router, self.num_experts)
    DISPATCHERS.get(self.dispatch)
    EXPERTS.get(self.experts)
    object.__setattr__(self, "layer", RouterSpec.parse(self.layer, "layer"))
    check_layer_spec(self.layer)
    V.check_choice("activation", self.activation, ACTIVATIONS)
    V.check_choice("expert_parallel", self.expert_parallel, EXPERT_PARALLEL_MODES)
    V.check_positive("capacity_factor", self.capacity_factor)
    if self.eval_capacity_factor is not None:
      V.check_positive("eval_capacity_factor", self.eval_capacity_factor)
    V.check_int_range("min_capacity", self.min_capacity, lo=0)
    if self.group_size is not None:
      V.check_int_range("group_size", self.group_size, lo=1)
    V.check_int_range("num_shared_experts", self.num_shared_experts, lo=0)
    if self.shared_hidden_dim is not None:
      V.check_int_range("shared_hidden_dim", self.shared_hidden_dim, lo=1)
    if not 0.0 <= self.prune_beta <= 1.0:
      raise ValueError(f"prune_beta={self.prune_beta!r} must be in [0, 1] (0: no pruning)")
    for name in ("load_balance_weight", "z_loss_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "MoEConfig":
    """From a config dict; options that moved into the router get a one-line pointer."""
    moved = sorted(set(fields) & set(_MOVED_TO_ROUTER))
    if moved:
      raise ValueError(f"{', '.join(moved)} moved into the router's options: e.g. "
                       "moe.router=dict(name='top_k', k=2) (fused_router is now fused)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"unknown key(s) {unknown} in config.model.moe; valid keys: "
                       f"{', '.join(sorted(known))}")
    return cls(**fields)

  def capacity_factor_for(self, deterministic: bool) -> float:
    if deterministic and self.eval_capacity_factor is not None:
      return self.eval_capacity_factor
    return self.capacity_factor


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Multi-head latent attention (DeepSeek-V2/V3, arXiv:2405.04434): queries through an
  optional low-rank bottleneck, keys and values from one shared latent of kv_lora_rank
  features plus a rotary key of qk_rope_head_dim features shared by all heads."""

  q_lora_rank: int | None = None  # None: one full query projection
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  rope_interleave: bool = True  # rotary features stored as interleaved pairs (DeepSeek-V3)
  latent_norm_eps: float = 1e-6  # the latents' RMSNorms (DeepSeek's, whatever rms_norm_eps)

  def __post_init__(self):
    if self.q_lora_rank is not None:
      V.check_int_range("mla.q_lora_rank", self.q_lora_rank, lo=1)
    for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
      V.check_int_range(f"mla.{name}", getattr(self, name), lo=1)
    V.check_int_range("mla.qk_rope_head_dim", self.qk_rope_head_dim, lo=2)
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A pre-norm transformer stack whose feed-forward layers may be MoE.

  Which layers are MoE (combine freely; none set means no MoE layer):
    moe_every: every N-th layer (layers N-1, 2N-1, ...), as in Switch/GShard.
    moe_last: the last N layers, as in IMP ("last 6 of 12").
    moe_layers: explicit layer indices.
  moe_num_experts: one expert count per MoE layer, in layer order, overriding
    moe.num_experts layer by layer: Pyramid-MoE (DeepSpeed-MoE, arXiv:2201.05596) puts
    more experts in later layers, e.g. (4, 4, 8, 8). Empty: every MoE layer has
    moe.num_experts.
  """

  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  head_dim: int | None = None  # None: d_model // num_heads
  mlp_dim: int = 512  # dense FFN hidden width
  activation: str = "swiglu"  # dense FFN activation
  causal: bool = False  # decoder (causal mask + RoPE) or encoder
  rope: bool | None = None  # None: RoPE iff causal
  rope_max_wavelength: float = 10_000.0
  num_kv_heads: int | None = None  # grouped-query attention: J key/value heads; None: H
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  qk_norm: str = "none"  # RMSNorm of q and k: "head" (per head: Qwen3), "full" (OLMoE)
  mla: MLAConfig | None = None  # multi-head latent attention instead of q/k/v heads
  sliding_window: int | None = None  # decoder: attend to the last W tokens only (Mixtral)
  dropout_rate: float = 0.0
  moe: MoEConfig | None = None
  moe_every: int | None = None
  moe_last: int | None = None
  moe_layers: tuple[int, ...] = ()
  moe_num_experts: tuple[int, ...] = ()  # Pyramid-MoE: E per MoE layer, in order
  remat: bool = False
  scan_layers: bool = False
  norm_eps: float = 1e-6
  # The q/k/v attention: a registered name or dict(name=..., **options) (moe_jax.nn.attention
  # ATTENTIONS): "mha" (multi-head) or "moh" (mixture of heads, arXiv:2410.11842), e.g.
  # dict(name="moh", shared_heads=2, k=1).
  attention: Any = "mha"
  # Modality-untied layers (Mixture-of-Transformers, arXiv:2411.04996; nn/untied.py): their
  # q/k/v/o projections, norms and FFN are per modality (the Context's per-token modality),
  # attention is global. num_modalities: None means len(moe_jax.tasks.MODALITIES).
  untied_layers: tuple[int, ...] = ()
  num_modalities: int | None = None

  def __post_init__(self):
    V.check_int_range("num_layers", self.num_layers, lo=1)
    V.check_int_range("d_model", self.d_model, lo=1)
    V.check_int_range("num_heads", self.num_heads, lo=1)
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly or pick divisible values")
    if self.head_dim is not None:
      V.check_int_range("head_dim", self.head_dim, lo=1)
    if self.uses_rope and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
    if self.num_kv_heads is not None:
      V.check_int_range("num_kv_heads", self.num_kv_heads, lo=1)
      if self.num_heads % self.num_kv_heads:
        raise ValueError(f"num_heads={self.num_heads} is not divisible by "
                         f"num_kv_heads={self.num_kv_heads}")
    V.check_choice("qk_norm", self.qk_norm, QK_NORMS)
    V.check_int_range("mlp_dim", self.mlp_dim, lo=1)
    V.check_choice("activation", self.activation, ACTIVATIONS)
    V.check_fraction("dropout_rate", self.dropout_rate)
    if self.moe_every is not None:
      V.check_int_range("moe_every", self.moe_every, lo=1)
    if self.moe_last is not None:
      V.check_int_range("moe_last", self.moe_last, lo=0, hi=self.num_layers)
    for i in self.moe_layers:
      V.check_int_range("moe_layers[i]", i, lo=0, hi=self.num_layers - 1)
    if self.sliding_window is not None:
      V.check_int_range("sliding_window", self.sliding_window, lo=1)
      if not self.causal or self.mla is not None:
        raise ValueError("sliding_window is for causal q/k/v attention (causal=True, no mla)")
    if self.mla is not None and not self.causal:
      raise ValueError("mla (multi-head latent attention) is a decoder attention: set causal=True")
    if self.moe is None and self.moe_layer_indices():
      raise ValueError("moe_every/moe_last/moe_layers place MoE layers but moe=None; "
                       "set moe=MoEConfig(...)")
    if self.moe_num_experts:
      self._check_moe_num_experts()
    if self.causal and self.moe is not None and self.moe_layer_indices():
      # pylint: disable=import-outside-toplevel  (the layers import this module)
      from moe_jax.nn.layers import MOE_LAYERS
      if not getattr(MOE_LAYERS.get(self.moe.layer.name), "causal_ok", True):
        raise ValueError(f"moe.layer={self.moe.layer.name!r} mixes tokens across positions, so "
                         "it cannot be causal; use it in an encoder (causal=False)")
    self._check_attention_and_untied()

  def _check_attention_and_untied(self):
    # pylint: disable=import-outside-toplevel  (the attention package imports this module)
    from moe_jax.nn.attention import check_attention_spec
    from moe_jax.nn.routing import RouterSpec
    object.__setattr__(self, "attention", RouterSpec.parse(self.attention, "attention"))
    check_attention_spec(self.attention, self.num_heads)
    if self.attention.name != "mha" and self.mla is not None:
      raise ValueError(f"attention={self.attention.name!r} and mla are two attentions; "
                       "set one of them")
    object.__setattr__(self, "untied_layers", tuple(self.untied_layers))
    for i in self.untied_layers:
      V.check_int_range("untied_layers[i]", i, lo=0, hi=self.num_layers - 1)
    if self.num_modalities is not None:
      V.check_int_range("num_modalities", self.num_modalities, lo=1)
    if not self.untied_layers:
      return
    both = sorted(set(self.untied_layers) & set(self.moe_layer_indices()))
    if both:
      raise ValueError(f"layers {both} are both untied and MoE: an untied layer has one dense "
                       "FFN per modality; remove them from untied_layers or the MoE placement")
    unsupported = [name for name, on in (
        ("attention='moh'", self.attention.name != "mha"), ("mla", self.mla is not None),
        ("num_kv_heads", self.num_kv_heads is not None), ("qkv_bias", self.qkv_bias),
        ("qk_norm", self.qk_norm != "none"), ("sliding_window", self.sliding_window is not None))
                   if on]
    if unsupported:
      raise ValueError(f"untied_layers support plain multi-head attention only; unset "
                       f"{', '.join(unsupported)}")

  def _check_moe_num_experts(self) -> None:
    idx = self.moe_layer_indices()
    if self.moe is None or len(self.moe_num_experts) != len(idx):
      raise ValueError(f"moe_num_experts={self.moe_num_experts} needs one count per MoE layer; "
                       f"the stack has {len(idx)} MoE layer(s) at {list(idx)}")
    for j, (i, n) in enumerate(zip(idx, self.moe_num_experts)):
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"moe_num_experts[{j}]={n!r} (layer {i}) must be an int >= 1")
      try:  # the router's own checks against this layer's count (e.g. top_k's k <= E)
        self.moe_config_for(n)
      except ValueError as e:
        raise ValueError(f"moe_num_experts[{j}]={n} (layer {i}): {e}") from None

  def moe_experts_by_layer(self) -> dict[int, int]:
    """MoE layer index -> its number of experts (moe_num_experts, else moe.num_experts)."""
    idx = self.moe_layer_indices()
    if not idx:
      return {}
    return dict(zip(idx, self.moe_num_experts or (self.moe.num_experts,) * len(idx)))

  def moe_config_for(self, num_experts: int) -> MoEConfig:
    """The MoE config of a layer with `num_experts` experts (moe itself when it has them)."""
    if num_experts == self.moe.num_experts:
      return self.moe
    return dataclasses.replace(self.moe, num_experts=num_experts)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def uses_rope(self) -> bool:
    return self.causal if self.rope is None else self.rope

  @property
  def resolved_num_modalities(self) -> int:
    if self.num_modalities is not None:
      return self.num_modalities
    from moe_jax.tasks import MODALITIES  # pylint: disable=import-outside-toplevel
    return len(MODALITIES)

  def moe_layer_indices(self) -> tuple[int, ...]:
    """Sorted indices of the layers whose FFN is an MoE layer."""
    idx = set(self.moe_layers)
    if self.moe_every:
      idx |= set(range(self.moe_every - 1, self.num_layers, self.moe_every))
    if self.moe_last:
      idx |= set(range(self.num_layers - self.moe_last, self.num_layers))
    return tuple(sorted(idx))
