"""Writes the tiny Hugging Face checkpoints the interop tests load (tests/interop/fixtures).

Needs the `[hf-dev]` extra (torch + transformers, CPU is enough; too heavy for CI, so
the outputs are committed):

  pip install -e '.[hf-dev]' --extra-index-url https://download.pytorch.org/whl/cpu
  python tools/make_hf_fixtures.py

For each family: a randomly initialised model made by `transformers` itself (nothing
downloaded), saved with `save_pretrained` (Mixtral in several safetensors shards with an
index), and reference.npz with a batch of token ids, transformers' float32 logits and
its greedy continuation. Norm weights are drawn in [0.8, 1.2] rather than left at 1, and
the seed is redrawn until no token's k-th and (k+1)-th router probabilities are within
1e-3 of each other, so a rope, norm or routing mistake moves logits far above the
tests' 1e-4 tolerance.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                   "interop", "fixtures")
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = {
    # GQA (2 key/value heads), softmax top-2 renormalised, every layer MoE, a sliding
    # window of 5 tokens (shorter than the 12-token batch and the greedy continuation).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(COMMON, num_key_value_heads=2, intermediate_size=24, num_local_experts=4,
                     num_experts_per_tok=2, rope_theta=1e6, sliding_window=5)),
    # q/k/v biases, top-2 not renormalised, a gated shared expert, a dense first layer.
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(COMMON, num_key_value_heads=4, intermediate_size=40,
                       moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                       mlp_only_layers=[0], decoder_sparse_step=1)),
    # per-head q/k norms, GQA, renormalised top-2, a dense layer; 257 ids: the byte-level
    # vocabulary, so the fine-tuning test can train it on lm_tiny's data.
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(COMMON, vocab_size=257, num_key_value_heads=2, head_dim=8, intermediate_size=40,
                       moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    # q/k norms over all heads' features, top-2 not renormalised.
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(COMMON, num_key_value_heads=4, intermediate_size=24, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=1,
                   eos_token_id=2)),
    # multi-head latent attention (q and kv low-rank, interleaved rotary pairs), sigmoid
    # scores + correction bias, 4 groups of 2 experts with the best 2 eligible, routed
    # scaling, one shared expert, a dense first layer; byte vocabulary (fine-tune test).
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(COMMON, vocab_size=257, num_key_value_heads=4, intermediate_size=40,
                         moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                         q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                         first_k_dense_replace=1, rope_interleave=True, bos_token_id=0,
                         eos_token_id=1)),
}
SHARDED = {"mixtral": "40KB"}  # several safetensors files + model.safetensors.index.json


def _router_margin(out, k: int) -> float:
  """Smallest gap between the k-th and (k+1)-th router probability over all tokens."""
  gaps = []
  for logits in out.router_logits or ():
    probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
    gaps.append((probs[:, k - 1] - probs[:, k]).min().item())
  return min(gaps) if gaps else 1.0


def make(family: str) -> None:
  config_cls, model_cls, kwargs = FAMILIES[family]
  rng = np.random.default_rng(0)
  tokens = torch.tensor(rng.integers(3, kwargs["vocab_size"], size=(2, 12)), dtype=torch.long)
  for seed in range(100):
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = model_cls(config).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
          p.uniform_(0.8, 1.2)
        elif p.ndim >= 2:
          p.normal_(0.0, 0.2)  # larger than the default: routing and logits spread out
        else:
          p.normal_(0.0, 0.1)
      for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
          b.uniform_(-0.05, 0.05)  # a trained-looking bias: it must steer the choice
      out = model(tokens, output_router_logits=True)
    if _router_margin(out, kwargs["num_experts_per_tok"]) > 1e-3:
      break
  else:
    raise RuntimeError(f"{family}: no seed without router near-ties")
  with torch.no_grad():
    greedy = model.generate(tokens[:1, :6], max_new_tokens=8, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
  path = os.path.join(OUT, family)
  shutil.rmtree(path, ignore_errors=True)
  model.save_pretrained(path, max_shard_size=SHARDED.get(family, "50GB"))
  np.savez(os.path.join(path, "reference.npz"), tokens=tokens.numpy().astype(np.int32),
           logits=out.logits.float().numpy(), greedy_prompt=tokens[:1, :6].numpy(),
           greedy=greedy.numpy().astype(np.int32))
  with open(os.path.join(path, "made_with.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
               "seed": seed}, f, indent=1)
  files = sorted(os.listdir(path))
  print(f"{family}: seed {seed}, files {files}, "
        f"{sum(os.path.getsize(os.path.join(path, x)) for x in files) / 1e3:.0f} KB")


if __name__ == "__main__":
  for name in FAMILIES:
    make(name)
