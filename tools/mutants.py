"""Mutation check: does the test suite catch realistic bugs?

Applies each mutant below (one exact source edit) to a temporary copy of the
repository, runs the tests named for it, and reports whether they failed (killed)
or passed (survived). Not part of CI: run it after large changes, from the repo root
with the project's venv:

  .venv/bin/python tools/mutants.py                 # every mutant
  .venv/bin/python tools/mutants.py capacity_floor rope_not_a_rotation
  .venv/bin/python tools/mutants.py --full          # survivors also face the whole suite
  .venv/bin/python tools/mutants.py --list

Exit status 0 when every mutant is killed, 1 when one survives, 2 when a mutant no
longer applies (its `old` text is gone: update the mutant with the code).

Add a mutant for each bug you fix or fear: the `old` text must occur exactly once in
its file, and `tests` are pytest arguments for the tests that should kill it (unit
tests only: the notebook run does not count).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str


M = Mutant
MUTANTS = (
    # --- the six that once passed the whole suite (issue 9) ---------------------------
    M("capacity_floor", "moe_jax/nn/routing/base.py",
      "c = math.ceil(capacity_factor * group_size * k / num_experts - 1e-9)",
      "c = math.floor(capacity_factor * group_size * k / num_experts)",
      ("tests/nn/test_routing.py", "tests/nn/test_properties.py"),
      "token-choice capacity rounds down: fractional capacities drop tokens"),
    M("rope_not_a_rotation", "moe_jax/nn/attention/mha.py",
      "[x1 * cos - x2 * sin, x2 * cos + x1 * sin]", "[x1 * cos + x2 * sin, x2 * cos + x1 * sin]",
      ("tests/nn/test_attention.py",), "RoPE's first half no longer rotates"),
    M("lm_targets_unshifted", "moe_jax/models/lm.py",
      "inputs_BS, targets_BS = tokens[:, :-1], tokens[:, 1:]",
      "inputs_BS, targets_BS = tokens[:, :-1], tokens[:, :-1]",
      ("tests/models/test_models.py", "-k", "lm"), "the LM predicts the current byte"),
    M("microbatch_grads_summed", "moe_jax/train/step.py",
      "(total, metrics), grads = jax.tree.map(lambda x: x / task.microbatches, sums)",
      "(total, metrics), grads = sums",
      ("tests/train/test_train_step.py",), "microbatch gradients and losses summed, not averaged"),
    M("pooling_ignores_padding", "moe_jax/models/imp.py",
      "(_masked_mean(h, mask))", "(_masked_mean(h, None))",
      ("tests/models/test_models.py", "-k", "padding"), "text pooling averages padded positions"),
    M("temperature_applied_twice", "moe_jax/models/imp.py",
      "logits = scale * z_a @ z_b.T", "logits = scale * scale * z_a @ z_b.T",
      ("tests/models/test_models.py", "-k", "info_nce"), "contrastive logits scaled twice"),
    # --- routing and losses ---------------------------------------------------------------
    M("renormalise_over_tokens", "moe_jax/nn/routing/top_k.py",
      "weight_TK / jnp.sum(weight_TK, axis=-1, keepdims=True)",
      "weight_TK / jnp.sum(weight_TK, axis=0, keepdims=True)",
      ("tests/nn/test_routing.py",), "top-k weights renormalised over the wrong axis"),
    M("expert_choice_reshape_not_transpose", "moe_jax/nn/routing/expert_choice.py",
      "scores_GES = scores_TE.reshape(G, S, E).transpose(0, 2, 1)",
      "scores_GES = scores_TE.reshape(G, E, S)",
      ("tests/nn/test_routing.py",), "expert choice scores laid out by reshape, not transpose"),
    M("padding_routed", "moe_jax/nn/transformer.py",
      "token_mask=mask_BS)", "token_mask=None)",
      ("tests/models/test_models.py", "-k", "padding"),
      "the stack stops passing its padding mask to the MoE layers"),
    M("load_balance_without_E", "moe_jax/nn/losses.py",
      "return num_experts * jnp.sum(f_E * p_E)", "return jnp.sum(f_E * p_E)",
      ("tests/nn/test_routing.py",), "load-balancing loss loses its factor E"),
    M("z_loss_not_squared", "moe_jax/nn/losses.py",
      "token_mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)), valid_T)",
      "token_mean(jax.nn.logsumexp(logits_TE, axis=-1), valid_T)",
      ("tests/nn/test_routing.py",), "z-loss without the square"),
    M("cross_entropy_ignores_weights", "moe_jax/nn/losses.py",
      "return jnp.sum(nll * weights) / jnp.maximum(weights.sum(), 1.0)", "return nll.mean()",
      ("tests/models/test_models.py", "-k", "lm"), "padding counted in the LM loss"),
    M("groups_ranked_by_best_only", "moe_jax/nn/routing/top_k.py",
      "best = min(2, E // n_group)", "best = 1",
      ("tests/nn/test_routing.py", "-k", "group"),
      "group-limited routing ranks groups by their best expert, not the sum of the top two"),
    M("scaling_factor_ignored", "moe_jax/nn/routing/top_k.py",
      "weight_TK = weight_TK * self.routed_scaling_factor", "weight_TK = weight_TK",
      ("tests/nn/test_routing.py", "-k", "sigmoid"), "routed_scaling_factor never applied"),
    M("bias_weights_the_experts", "moe_jax/nn/routing/top_k.py",
      "weight_TK = jnp.take_along_axis(scores_TE, index_TK, axis=-1)",
      "weight_TK = jnp.take_along_axis(select_TE, index_TK, axis=-1)",
      ("tests/nn/test_router_state.py",), "the balancing bias leaks into the combine weights"),
    M("bias_pushes_the_wrong_way", "moe_jax/nn/routing/top_k.py",
      "jnp.sign(load_E.mean() - load_E)", "jnp.sign(load_E - load_E.mean())",
      ("tests/nn/test_router_state.py",), "overloaded experts get a larger bias"),
    M("router_state_not_carried", "moe_jax/train/step.py",
      "    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,\n"
      "                         router_state=router_state), metrics",
      "    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics",
      ("tests/nn/test_router_state.py",), "the train step drops the updated router state"),
    M("balance_top1_counts_all_slots", "moe_jax/nn/losses.py",
      'ranks = index_TK[:, :1] if count == "top1" else index_TK', "ranks = index_TK",
      ("tests/nn/test_routing.py", "-k", "balance"), "Switch's top-1 count uses every slot"),
    M("sequence_balance_over_the_batch", "moe_jax/nn/losses.py",
      "S = group_size or T", "S = T",
      ("tests/nn/test_routing.py", "-k", "balance"),
      "the sequence-wise balance loss is computed over the whole batch"),
    M("per_task_gate_ignores_the_task", "moe_jax/nn/routing/conditioned.py",
      "return jnp.take_along_axis(all_TNE, self._ids(c)[:, None, None], axis=1)[:, 0]",
      "return all_TNE[:, 0]",
      ("tests/nn/test_conditioned.py",), "every task uses task 0's gate"),
    M("expert_cache_misindexed", "moe_jax/nn/routing/conditioned.py",
      "return jnp.take(per_value_NE, self._ids(c), axis=0)",
      "return jnp.take(per_value_NE, self._ids(c - 1), axis=0)",
      ("tests/nn/test_conditioned.py",), "the expert cache hands tokens another id's experts"),
    # --- dispatch ----------------------------------------------------------------------------
    M("capacity_fills_token_major", "moe_jax/nn/dispatch/einsum.py",
      "onehot_GKSE = onehot_GSKE.transpose(0, 2, 1, 3).reshape(G, K * S, E)",
      "onehot_GKSE = onehot_GSKE.reshape(G, K * S, E)",
      ("tests/nn/test_routing.py",), "second choices compete with first choices for capacity"),
    M("priority_ascending", "moe_jax/nn/dispatch/einsum.py",
      "jnp.argsort(-decision.priority_T.reshape(G, S), axis=1, stable=True)",
      "jnp.argsort(decision.priority_T.reshape(G, S), axis=1, stable=True)",
      ("tests/nn/test_routing.py",), "batch priority keeps the least confident tokens"),
    M("sorted_combine_unweighted", "moe_jax/nn/dispatch/sorted.py",
      "w_TK = jnp.where(valid_X.reshape(-1, K), weight_TK, 0.0)",
      "w_TK = jnp.where(valid_X.reshape(-1, K), 1.0, 0.0)",
      ("tests/nn/test_dispatch.py", "-k", "sorted and f32"),
      "dropless combine ignores the routing weights"),
    # --- kernels -----------------------------------------------------------------------------
    M("tile_owner_off_by_one", "kernels_pallas/tiling.py",
      "owner_I = jnp.sum(tile_end_E[None, :] <= tiles[:, None], axis=1)",
      "owner_I = jnp.sum(tile_end_E[None, :] < tiles[:, None], axis=1)",
      ("tests/kernels/test_kernels.py", "-k", "layout or gmm"),
      "a row tile is assigned to the previous expert"),
    M("tile_padding_floors", "kernels_pallas/tiling.py",
      "padded_E = (counts_E + block_m - 1) // block_m * block_m",
      "padded_E = counts_E // block_m * block_m",
      ("tests/kernels/test_kernels.py", "-k", "layout or gmm"),
      "experts' rows not padded up to whole tiles (tiles overlap)"),
    M("combine_first_slot_only", "kernels_pallas/permute.py",
      "  for j in range(index_OJ.shape[1]):", "  for j in range(1):",
      ("tests/kernels/test_kernels.py", "-k", "permute or combine"),
      "the XLA unpermute+combine keeps only each token's first slot"),
    M("tile_loop_bits_misread", "kernels_pallas/tile_loop.py",
      "return jax.lax.bitcast_convert_type(b, dtype) if b.dtype == jnp.uint16 else b",
      "return jax.lax.bitcast_convert_type(b, jnp.float16) if b.dtype == jnp.uint16 else b",
      ("tests/kernels/test_kernels.py", "-k", "tile_loop"),
      "the CPU loop reads its bf16 operands' bits as float16"),
    M("cpu_gmm_drops_last_column", "kernels_cpu/grouped_matmul.cc",
      "for (int64_t n = 0; n < cols; ++n) Store(c + i * ldc + n, row[n]);",
      "for (int64_t n = 0; n + 1 < cols; ++n) Store(c + i * ldc + n, row[n]);",
      ("tests/kernels/test_cpu_kernels.py", "-k", "loop_over or autodiff"),
      "the native kernel never writes the last column of a block"),
    M("cpu_gmm_sum_drops_second_product", "kernels_cpu/grouped_matmul.cc",
      "Gmm<A, B>(&pool, a, b, static_cast<const A*>(lhs2.untyped_data()),",
      "Gmm<A, B>(&pool, a, b, static_cast<const A*>(nullptr),",
      ("tests/kernels/test_cpu_kernels.py", "-k", "autodiff"),
      "d x of the native SwiGLU FFN misses d up @ w_up^T"),
    M("cpu_bf16_store_truncates", "kernels_cpu/grouped_matmul.cc",
      "bits += 0x7fffu + ((bits >> 16) & 1u);", "bits += 0u;",
      ("tests/kernels/test_cpu_kernels.py", "-k", "rounded"),
      "bf16 outputs truncated instead of rounded to nearest even"),
    M("cpu_layout_ranges_unchecked", "kernels_cpu/grouped_matmul.cc",
      "if (ts[e] != (e ? te[e - 1] : 0) || te[e] < ts[e] || int64_t{te[e]} * bm > R)",
      "if (te[e] < ts[e])",
      ("tests/kernels/test_cpu_kernels.py", "-k", "back_to_back"),
      "the kernels accept tile ranges with gaps or past the rows"),
    M("tiled_native_checks_tokens_only", "moe_jax/nn/dispatch/tiled.py",
      "native = cpu and native_cpu_kernels(x_TD, decision, experts)",
      "native = cpu and native_cpu_kernels(x_TD)",
      ("tests/kernels/test_cpu_kernels.py", "-k", "shard_map"),
      "replicated tokens with expert weights varying over a shard_map axis take the FFI call"),
    M("cpu_wide_block_drops_third_vector", "kernels_cpu/grouped_matmul.cc",
      "case 3: Block<MR, (kVecs >= 3 ? 3 : 1)>", "case 3: Block<MR, (kVecs >= 3 ? 2 : 1)>",
      ("tests/kernels/test_cpu_kernels.py", "-k", "loop_over or other_x86"),
      "a register block of 3 vectors (AVX-512 / NEON tails) computes only 2"),
    # --- expert parallelism ---------------------------------------------------------------
    M("ep_capacity_reshape_not_transpose", "moe_jax/parallel/expert_parallel.py",
      "y_NLCD = y_LXD.reshape(L, N, C, D).transpose(1, 0, 2, 3)",
      "y_NLCD = y_LXD.reshape(N, L, C, D)",
      ("tests/parallel/test_sharding.py", "-k", "capacity or equals_loop"),
      "capacity EP sends results back in the wrong block order"),
    M("ep_dropless_send_offsets", "moe_jax/parallel/expert_parallel.py",
      "send_off_NN = _exclusive_cumsum(rows_NN, axis=1)",
      "send_off_NN = _exclusive_cumsum(rows_NN, axis=0)",
      ("tests/parallel/test_sharding.py", "-k", "equals_loop"),
      "dropless EP sends each peer the wrong rows"),
    # --- training, optimizer, checkpointing ----------------------------------------------
    M("weight_decay_on_vectors", "moe_jax/train/step.py",
      "lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)",
      "lambda params: jax.tree.map(lambda p: p.ndim >= 1, params)",
      ("tests/train/test_train_step.py",), "weight decay also shrinks biases and norm scales"),
    M("eval_divides_by_batches", "moe_jax/train/trainer.py",
      "{k: v / max(examples, 1) for k, v in sums.items()}",
      "{k: v / max(n, 1) for k, v in sums.items()}",
      ("tests/train/test_train.py", "-k", "evaluate"),
      "eval sums of example-weighted metrics divided by the batch count"),
    M("eval_counts_the_fill", "moe_jax/train/trainer.py",
      "real = (int(jax.device_get(jnp.sum(batch[VALID]))) if VALID in batch",
      "real = (int(jax.device_get(jnp.sum(batch[VALID]))) if False",
      ("tests/train/test_train.py", "-k", "evaluate"),
      "the fill of the last eval batch weighs like real examples"),
    M("resume_forgets_data_position", "moe_jax/train/trainer.py",
      "it.set_state(data_state[name])", "pass",
      ("tests/train/test_kill_anywhere.py",),
      "a resumed run restarts every data stream from its first batch"),
    # --- data ---------------------------------------------------------------------------------
    M("same_shuffle_every_epoch", "moe_jax/data/pipeline.py",
      "np.random.default_rng([self.seed, epoch]).permutation",
      "np.random.default_rng(self.seed).permutation",
      ("tests/data/test_data.py",), "every epoch visits the examples in the same order"),
    M("every_process_reads_slice_0", "moe_jax/data/pipeline.py",
      "start = b * self.batch_size + self.process_index * per_process",
      "start = b * self.batch_size",
      ("tests/data/test_data.py",), "multi-process runs read the same examples on every process"),
    M("fill_marked_valid", "moe_jax/data/pipeline.py",
      "batch[VALID] = valid", "batch[VALID] = np.ones_like(valid)",
      ("tests/data/test_data.py",), "eval fill counted as real examples"),
    M("resume_restarts_the_stream", "moe_jax/data/pipeline.py",
      "self._stream = self.batches(self._position)", "self._stream = self.batches(0)",
      ("tests/data/test_data.py",), "a restored loader starts again from batch 0"),
    M("pipeline_keeps_strings", "moe_jax/data/transforms/base.py",
      "return {k: v for k, v in example.items() if not _is_text(v)}", "return example",
      ("tests/data/test_transforms.py",), "file names and raw captions reach the batch"),
    M("frame_real_when_it_starts_inside", "moe_jax/data/transforms/audio.py",
      "frames = samples[starts + self.n_fft - 1]", "frames = samples[starts]",
      ("tests/data/test_transforms.py", "-k", "frame"),
      "the real frames of a clip depend on how much padding follows"),
    M("random_crop_height_for_width", "moe_jax/data/transforms/image.py",
      "int(rng.integers(h - height + 1)), int(rng.integers(w - width + 1))",
      "int(rng.integers(h - height + 1)), int(rng.integers(h - height + 1))",
      ("tests/data/test_transforms.py", "-k", "crop"), "random crops place columns by rows"),
    M("spread_kwargs_dropped", "moe_jax/data/transforms/base.py",
      "if any(k.arg is None for k in node.keywords):", "if False:",
      ("tests/data/test_transforms.py", "-k", "spec"),
      "resize(**{'size': 3}) silently builds resize with its default size"),
    M("audio_mask_ignored", "moe_jax/models/imp.py",
      "return tokens, jnp.repeat(mask_BT, grid_f, axis=1)", "return tokens, None",
      ("tests/models/test_models.py", "-k", "padding_audio"),
      "padding frames reach attention, routing and pooling"),
    M("contrastive_fill_one_way", "moe_jax/models/imp.py",
      "logits = jnp.where(valid[:, None] & valid[None, :], logits, -1e9)",
      "logits = jnp.where(valid[None, :], logits, -1e9)",
      ("tests/models/test_models.py", "-k", "fill"),
      "the eval fill is a negative for the other direction of the contrastive loss"),
    M("prompt_ids_ignored", "moe_jax/models/imp.py",
      "if task.prompt_ids:", "if False:",
      ("tests/models/test_models.py", "-k", "prompt_ids"),
      "zero-shot prompts byte-encoded for a model trained on another tokenizer"),
    M("drop_tokens_truncates", "moe_jax/models/tokenizers.py",
      "keep = max(1, math.floor((1.0 - drop_rate) * N + 0.5))",
      "keep = max(1, int((1.0 - drop_rate) * N))",
      ("tests/models/test_models.py", "-k", "drop_tokens"), "DropToken keeps floor, not nearest"),
    # --- layer and structure ---------------------------------------------------------------
    M("second_call_overwrites_aux_loss", "moe_jax/nn/layers/moe.py",
      '+ cfg.z_loss_weight * metrics["z_loss"])',
      '+ cfg.z_loss_weight * metrics["z_loss"], reduce_fn=lambda _, new: new, init_fn=lambda: 0)',
      ("tests/nn/test_layers.py", "-k", "twice"),
      "a shared encoder's second call (IMP: text after image) drops the first call's aux loss"),
    M("init_sows_aux_loss", "moe_jax/nn/layers/moe.py",
      "if not self.is_initializing():", "if True:",
      ("tests/nn/test_layers.py", "-k", "sows"),
      "init() returns the sown collections, so passing it back doubles the aux loss"),
    M("context_stops_at_the_block", "moe_jax/nn/transformer.py",
      "context=context, token_mask=mask_BS)", "context=None, token_mask=mask_BS)",
      ("tests/nn/test_context.py",), "the stack does not hand the context to its MoE layers"),
    M("single_slot_renormalised", "moe_jax/nn/routing/top_k.py",
      "renormalize = self.renormalize and self.k > 1", "renormalize = self.renormalize",
      ("tests/nn/test_routing.py", "-k", "gradient or single_slot"),
      "k=1 with renormalisation: every gate is 1 and the router gets no task gradient"),
    # --- non-finite edges and policies (issue 12) -------------------------------------------
    M("masked_mean_divides_by_zero", "moe_jax/nn/losses.py",
      "return (x_T * w_T).sum(0) / jnp.maximum(w_T.sum(), 1.0)",
      "return (x_T * w_T).sum(0) / w_T.sum()",
      ("tests/nn/test_finite_edges.py",), "an all-masked group makes the router losses NaN"),
    M("balance_fraction_divides_by_zero", "moe_jax/nn/losses.py",
      "f_E = assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0)",
      "f_E = assigned_TE.sum(0) / assigned_TE.sum()",
      ("tests/nn/test_finite_edges.py",), "no routed token makes the balance loss NaN"),
    M("skip_step_applies_the_update", "moe_jax/train/step.py",
      "keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)",
      "keep = lambda new, old: new",
      ("tests/train/test_train_step.py", "-k", "non_finite"),
      "skip_step lets a NaN update into the parameters"),
    M("preempted_without_saving", "moe_jax/train/trainer.py",
      "        if last_checkpoint != done:\n          last_checkpoint = save(done)",
      "        if False:\n          last_checkpoint = save(done)",
      ("tests/train/test_train.py", "-k", "sigterm"),
      "SIGTERM exits without saving the step it reports saved"),
    M("unreadable_checkpoint_not_set_aside", "moe_jax/train/trainer.py",
      "      moved = ckpt.set_aside(bad)", "      moved = 'nowhere'",
      ("tests/train/test_train.py", "-k", "unreadable"),
      "a damaged step stays a step: the next save over it or the next resume fails"),
    M("changed_shapes_left_to_orbax", "moe_jax/train/run_record.py",
      "    if stored[key] != shape:", "    if False:",
      ("tests/train/test_train.py", "-k", "resume_names"),
      "a resumed model of another shape gets Orbax's error that names no parameter"),
    M("resume_from_oldest_checkpoint", "moe_jax/train/trainer.py",
      "for step in reversed(ckpt.all_steps()):", "for step in ckpt.all_steps():",
      ("tests/train/test_kill_anywhere.py",),
      "a restart restores the oldest kept checkpoint, not the latest committed one"),
    M("killed_segment_record_dropped", "moe_jax/train/run_record.py",
      "    if s.get(\"end_step\", 0) > start:\n      s = {",
      "    if s.get(\"end_step\", 0) > start:\n      continue\n      s = {",
      ("tests/train/test_kill_anywhere.py",),
      "a rerun drops the killed segment's train history instead of cutting it back"),
    M("barrier_names_no_process", "moe_jax/train/barriers.py",
      "  missing = sorted(set(range(n)) - arrived)", "  missing = []",
      ("tests/parallel/test_two_processes.py", "-k", "late"),
      "a barrier timeout does not say which process is late"),
    M("config_mismatch_unchecked", "moe_jax/train/barriers.py",
      "  differ = sorted(p for p, d in others.items() if d != others[0])", "  differ = []",
      ("tests/parallel/test_two_processes.py", "-k", "different_configs"),
      "processes launched with different configs train together"),
    # --- interop -------------------------------------------------------------------------------
    M("mixtral_gate_and_up_swapped", "moe_jax/interop/hf_families.py",
      '("w1", "w3", "w2")', '("w3", "w1", "w2")',
      ("tests/interop/test_hf_import.py", "-k", "logits"),
      "Mixtral's w1 (gate) and w3 (up) projections loaded into each other's place"),
    M("olmoe_qk_norm_per_head", "moe_jax/interop/hf_families.py",
      '("gate_proj", "up_proj", "down_proj"), qk_norm="full")',
      '("gate_proj", "up_proj", "down_proj"), qk_norm="head")',
      ("tests/interop/test_hf_import.py", "-k", "logits"),
      "OLMoE's q/k norms applied per head instead of over all heads (wrong shapes or values)"),
    M("heads_split_the_wrong_way", "moe_jax/interop/hf.py",
      "    return a.T.reshape(a.shape[1], heads, -1)",
      "    return a.T.reshape(a.shape[1], -1, heads).swapaxes(1, 2)",
      ("tests/interop/test_hf_import.py", "-k", "logits"),
      "q/k/v rows taken as [Q, heads] instead of [heads, Q]"),
    M("mla_rope_not_deinterleaved", "moe_jax/nn/attention/mla.py",
      "    if cfg.rope_interleave:\n      q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)",
      "    if False:\n      q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)",
      ("tests/interop/test_hf_import.py", "-k", "logits"),
      "DeepSeek's interleaved rotary pairs rotated as halves"),
    M("mla_latent_norm_eps_from_the_model", "moe_jax/nn/attention/mla.py",
      "nn.RMSNorm(cfg.latent_norm_eps,", "nn.RMSNorm(1e-5,",
      ("tests/interop/test_hf_import.py", "-k", "logits"),
      "the latents normalised with rms_norm_eps instead of DeepSeek's fixed 1e-6"),
    # --- generation ----------------------------------------------------------------------------
    M("cache_hides_the_new_token", "moe_jax/nn/attention/mha.py",
      "(jnp.arange(L)[None, None, :] <= slot_S[None, :, None])",
      "(jnp.arange(L)[None, None, :] < slot_S[None, :, None])",
      ("tests/inference/test_generate.py", "-k", "cached"),
      "a decoded token does not attend to its own key"),
    # --- attention -----------------------------------------------------------------------------
    M("decoder_not_causal", "moe_jax/nn/attention/mha.py",
      "is_causal=self.causal)", "is_causal=False)",
      ("tests/models/test_models.py", "-k", "causal"), "the decoder attends to future bytes"),
    M("attention_mask_dropped", "moe_jax/nn/attention/mha.py",
      "mask = None if mask_BS is None else mask_BS[:, None, None, :].astype(bool)",
      "mask = None",
      ("tests/nn/test_attention.py",), "padded keys receive attention"),
    # --- null experts (AdaMoE) and the dense-to-sparse gate (EvoMoE) ---------------------------
    M("null_slots_computed", "moe_jax/nn/routing/top_k.py",
      "mask_TK = real_TK if mask_TK is None else mask_TK & real_TK",
      "mask_TK = jnp.ones_like(real_TK) if mask_TK is None else mask_TK",
      ("tests/nn/test_null_experts.py",), "a slot routed to a null expert runs expert 0"),
    M("null_weights_renormalised_over_all_k", "moe_jax/nn/routing/top_k.py",
      "        weight_TK = jnp.where(real_TK, weight_TK, 0.0)\n",
      "        weight_TK = weight_TK\n",
      ("tests/nn/test_null_experts.py",), "real weights renormalised over nulls too"),
    M("dts_counter_frozen", "moe_jax/nn/routing/dense_to_sparse.py",
      "calls.value = calls.value + 1", "calls.value = calls.value",
      ("tests/nn/test_dense_to_sparse.py",), "the temperature schedule never advances"),
    M("dts_no_switch", "moe_jax/nn/routing/dense_to_sparse.py",
      "hard = calls.value >= self.switch_at", "hard = calls.value < 0",
      ("tests/nn/test_dense_to_sparse.py",), "the gate never turns hard top-1"),
    # --- upcycling -----------------------------------------------------------------------------
    M("upcycle_router_not_tied", "moe_jax/interop/upcycle.py",
      "  return value[..., (np.arange(E) // G) * G]", "  return value",
      ("tests/interop/test_upcycle.py", "-k", "granular"),
      "granular upcycling without virtual groups: the shards of a copy weighted unequally"),
    M("upcycle_down_not_rescaled", "moe_jax/interop/upcycle.py",
      "dense_w[s][part] * (G / combine_sum)", "dense_w[s][part] * G",
      ("tests/interop/test_upcycle.py", "-k", "deepseek"),
      "a routed_scaling_factor left in: the upcycled layer's output scaled by it"),
    M("upcycle_scan_layers_misordered", "moe_jax/interop/upcycle.py",
      "[(scan, b, r) for r in range(repeats) for b in blocks]",
      "[(scan, b, r) for b in blocks for r in range(repeats)]",
      ("tests/interop/test_upcycle.py", "-k", "granular"),
      "a scanned stack's layers read block-major: layer i gets another layer's weights"),
)


def _copy_repo(dst: str) -> None:
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
  for f in filter(None, files):
    src = os.path.join(REPO, f)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
      shutil.copy2(src, os.path.join(dst, f))


def _pytest(copy: str, args: list[str], timeout: int) -> tuple[str, str]:
  """('failed' | 'passed' | 'timeout', first failing test or the tail of the output)."""
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *args]
  env = {**os.environ, "PYTHONPATH": copy}
  try:
    out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", f"no result in {timeout} s"
  text = out.stdout + out.stderr
  if out.returncode == 0:
    return "passed", ""
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
  if out.returncode in (1,) and failed:
    # The first error lines say why it failed.
    why = " ".join(w.strip() for w in re.findall(r"^E +(.+)$", text, re.M)[:3])
    return "failed", failed[0] + (f": {why[:160]}" if why else "")
  return "failed", f"pytest exit {out.returncode}: " + text.strip().splitlines()[-1][:200]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
  ap.add_argument("--full", action="store_true",
                  help="run the whole suite (minus notebooks) on mutants the named tests miss")
  ap.add_argument("--list", action="store_true", help="list the mutants and exit")
  ap.add_argument("--no-baseline", action="store_true",
                  help="skip checking that the named tests pass on the unmutated copy")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
  opts = ap.parse_args(argv)
  by_name = {m.name: m for m in MUTANTS}
  if opts.list:
    for m in MUTANTS:
      print(f"{m.name:36s} {m.path:32s} {m.why}")
    return 0
  unknown = [n for n in opts.names if n not in by_name]
  if unknown:
    print(f"unknown mutant(s) {unknown}; see --list", file=sys.stderr)
    return 2
  chosen = [by_name[n] for n in opts.names] if opts.names else list(MUTANTS)

  # Every mutant must still apply to the code as it is.
  stale = []
  for m in chosen:
    with open(os.path.join(REPO, m.path)) as f:
      count = f.read().count(m.old)
    if count != 1:
      stale.append(f"{m.name}: `{m.old}` occurs {count} times in {m.path}")
  if stale:
    print("mutants that no longer apply (update them with the code):\n  " + "\n  ".join(stale),
          file=sys.stderr)
    return 2

  with tempfile.TemporaryDirectory(prefix="moe_jax_mutants_") as copy:
    _copy_repo(copy)
    where = subprocess.run([sys.executable, "-c", "import moe_jax, kernels_pallas, kernels_cpu; print("
                            "moe_jax.__file__, kernels_pallas.__file__, kernels_cpu.__file__)"],
                           cwd=copy, env={**os.environ, "PYTHONPATH": copy},
                           capture_output=True, text=True, check=True).stdout.split()
    if not all(p.startswith(copy) for p in where):
      print(f"the copy does not shadow the installed package: {where}", file=sys.stderr)
      return 2
    if not opts.no_baseline:
      files = sorted({a for m in chosen for a in m.tests if a.startswith("tests/")})
      print(f"baseline: {' '.join(files)} on the unmutated copy ...", flush=True)
      status, detail = _pytest(copy, ["-n", "2", *files], opts.timeout)
      if status != "passed":
        print(f"baseline {status}: {detail}; fix the suite first", file=sys.stderr)
        return 2

    results = []
    for m in chosen:
      target = os.path.join(copy, m.path)
      with open(target) as f:
        original = f.read()
      with open(target, "w") as f:
        f.write(original.replace(m.old, m.new))
      t0 = time.perf_counter()
      try:
        status, detail = _pytest(copy, list(m.tests), opts.timeout)
        if status == "passed" and opts.full:
          status, detail = _pytest(copy, ["-n", "2", "tests",
                                          "--ignore=tests/test_notebooks.py"], opts.timeout)
          detail = f"(whole suite) {detail}"
      finally:
        with open(target, "w") as f:
          f.write(original)
      verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed (timeout)"}[status]
      results.append((m, verdict, detail, time.perf_counter() - t0))
      print(f"{verdict:17s} {m.name:36s} {time.perf_counter() - t0:6.1f} s  {detail}", flush=True)

  survived = [m.name for m, v, _, _ in results if v == "SURVIVED"]
  print(f"\n{len(results) - len(survived)} of {len(results)} mutants killed"
        + (f"; survived: {', '.join(survived)}" if survived else ""))
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
