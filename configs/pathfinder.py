"""MoE Pathfinder against the expert-pruning baselines on the built-in model.

What it runs (experiments/pathfinder.py): one calibration pass over 320 rows of 64 tokens of the
built-in generic text (`moe_jax.data.prose`) collecting routing and trajectory statistics
(timed, and timed again with the reference code's dense reconstruction error); Pathfinder
(global and uniform allocation), frequency, soft_count, REAP, routed reconstruction error, NAEE
and random, each removing 25% and 50% of the routed experts, plus Pathfinder / global with the
reference code's selection and with this project's changes one at a time, simulated with expert
masks and scored on 100 held-out prompts per domain; the single-expert removal oracle (loss on
the calibration rows); the cost of routed vs dense reconstruction error on a Qwen1.5-MoE-shaped
layer.

    python experiments/pathfinder.py --config=configs/pathfinder.py --workdir=/tmp/pathfinder

A Hugging Face checkpoint with its own tokenizer: --config.model_path=DIR
--config.calibration.data=json:calib.jsonl --config.eval.data=json:held_out.jsonl (and/or
--config.lm_eval.tasks="('arc_easy',)"); the skills exact match is skipped there.

How long: 6 minutes on the 2-core dev CPU. Result: the MoE Pathfinder section of
results/reproduce/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

from moe_jax import quality


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # "" = the committed checkpoints/testbed
    config.checkpoint = "checkpoints/testbed"
    config.seed = 0
    config.n_per_domain = 100
    config.batch_size = 64
    config.repeats = 3
    config.calibration = ml_collections.ConfigDict(dict(
        data="prose:train", max_rows=320, n_per_domain=64, seq_len=64, batch_size=16, micro_batch_size=16, seed=0))
    config.methods = (("pathfinder", "global"), ("pathfinder", "uniform"), ("frequency", "global"),
                      ("frequency", "uniform"), ("soft_count", "global"), ("soft_count", "uniform"),
                      ("reap", "global"), ("reap", "uniform"), ("recon", "global"), ("recon", "uniform"),
                      ("naee", "uniform"), ("random_experts", "uniform"))
    config.ratios = (0.25, 0.5)
    config.pathfinder = ml_collections.ConfigDict(dict(
        w_prob=1.0, w_strength=0.0, w_recon=1.0, w_transition=1.0, tau=1.0, recon="routed", path_topk=10,
        max_sequences=0, force_keep_z=0.0, counting="posterior", layer_scale="expert"))
    # Quality columns of every row, for any checkpoint and tokenizer (moe_jax.quality): perplexity on
    # held-out text (data: any load_texts spec; "" = none) and lm-eval task scores (no tasks = none).
    config.eval = quality.eval_config(data="prose:eval", seq_len=128)
    config.lm_eval = quality.lm_eval_config()
    config.removal_oracle = True  # every expert removed alone: its answer-loss cost (E forward passes per layer)
    # (counting, layer_scale, w_strength) of extra Pathfinder / global rows: the reference code's
    # selection, this project's changes one at a time, and (posterior, recon, 1), the per-layer price.
    config.selection_ablations = (("k_best", "none", 1.0), ("posterior", "none", 1.0), ("posterior", "recon", 1.0),
                                  ("posterior", "expert", 1.0), ("k_best", "expert", 0.0))
    # The Qwen1.5-MoE-A2.7B MoE layer shape, random weights, for the reconstruction-cost ratio.
    config.qwen_layer = ml_collections.ConfigDict(dict(hidden_size=2048, num_experts=60, top_k=4, width=1408,
                                                       tokens=1024))
    return config
