"""The testbed model: a tiny Qwen1.5-MoE-style byte-level LM trained like a pretrained LLM.

What it trains: 4 decoder layers, hidden 128, 4 query / 2 KV heads; every layer an MoE of 32
fine-grained routed SwiGLU experts (width 32), top-4, plus a gated shared expert as wide as the
four active routed experts together (128), as Qwen1.5-MoE pairs 60 routed experts (top-4) with
a 4x-wide shared one; byte vocabulary (259). Data: the five skills domains as
``[BOS] prompt answer EOS`` with the loss on every token (prompt tokens weighted 0.5, answers
1.0), mixed with passages of the built-in generic text (`moe_jax.data.prose`, Python
standard-library docstrings, every token weighted 1.0) as the papers' models learn web text;
packed into 256-token rows with per-example attention.

Run it with

    python experiments/train.py --config=configs/testbed.py --workdir=/tmp/testbed \\
        --config.export_dir=checkpoints/testbed

How long: 16 minutes (947 s of training steps) on the idle 2-core dev CPU, and the weights equal
the committed checkpoints/testbed/ byte for byte (results/testbed/train_summary_rerun.json; the
checkpoint's own train_summary.json is its first run's, on a shared CPU). Result: greedy exact
match from 0.49 (language) to 1.00 on 100 held-out prompts per domain, full-sequence perplexity
below 2 in every domain (results/testbed/report.md).
"""

from __future__ import annotations

import ml_collections

from moe_jax.train import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.seed = 0
    config.steps = 2000
    config.batch_size = 12  # packed 256-token rows
    config.model.update(
        model_type="qwen2_moe", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=32,
        shared_expert_width=128, shared_expert_gate=True,
        norm_topk_prob=False, qkv_bias=True, max_position_embeddings=256)
    config.data.seq_len = 256
    config.data.pack = True
    config.data.prompt_weight = 0.5
    config.data.examples_per_domain.update(
        arithmetic=16000, facts=12000, code=30000, language=6000, safety=6000)
    config.data.prose_passages = 16000  # about half the training tokens
    config.data.prose_max_chars = 240
    config.optim.update(lr=3e-3, warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.05)
    config.loss.update(aux_coef=0.01, z_coef=1e-3)
    config.log_every = 25
    config.eval_every = 250
    config.checkpoint_every = 250
    config.accuracy_every = 1000
    config.final_eval_examples_per_domain = 100
    return config
