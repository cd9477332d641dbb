"""The built-in default model: a tiny Qwen2-MoE-style byte-level LM trained on the skills corpus.

What it trains: 4 decoder layers, hidden 128, 4 query / 2 KV heads, every layer an MoE of 8
routed SwiGLU experts (width 128) with top-2 routing, byte vocabulary (259), ~1.8M params
(7 MB in float32). Data: the five skills domains (arithmetic, facts, code, language, safety)
as ``[BOS] prompt answer EOS`` packed into 128-token rows, loss on answer tokens only, plus
the load-balancing (0.01) and router z (0.001) losses.

Run it with

    python experiments/train.py --config=configs/skills_tiny.py --workdir=/tmp/skills_tiny \\
        --config.export_dir=checkpoints/skills_tiny

How long and what it reaches, as measured so far (2-core CPU shared with other jobs, so
slower than an idle machine): 1.2-4 s/step; a first 2000-step run reached answer-token
cross-entropy ~0.4-0.6 by step 1000, and 5-minute probes of this size reached safety 100%
(refusals 100%, over-refusals 0%), language ~0.6, facts ~0.3, code ~0.2, arithmetic < 0.1
greedy exact match. The issue's target (>= 90% on every domain within 20 CPU minutes) is not
met yet, and no trained checkpoint is committed.
"""

from __future__ import annotations

import ml_collections

from moe_jax.train import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.seed = 0
    config.steps = 2000
    config.batch_size = 64  # one example per 64-token row
    config.model.update(
        model_type="qwen2_moe", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        # Like Qwen1.5-MoE: a gated shared expert as wide as the active routed experts together.
        shared_expert_width=256, shared_expert_gate=True,
        norm_topk_prob=True, qkv_bias=True, max_position_embeddings=128)
    # Unpacked rows: the model has no cross-example attention mask, and packed rows (examples
    # attending to earlier ones) learned clearly slower in 300-step probes.
    config.data.seq_len = 64
    config.data.pack = False
    config.data.prompt_weight = 0.0  # answer-only loss; full-sequence loss slowed arithmetic down
    # Harder domains get more examples; facts cycles through its 576 training examples.
    config.data.examples_per_domain.update(
        arithmetic=40000, facts=40000, code=25000, language=12000, safety=12000)
    config.optim.update(lr=3e-3, warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.05)
    config.loss.update(aux_coef=0.01, z_coef=1e-3)
    config.log_every = 25
    config.eval_every = 250
    config.checkpoint_every = 250
    config.accuracy_every = 500
    config.final_eval_examples_per_domain = 100
    return config
