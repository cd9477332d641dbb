"""Dynamic trimming on the built-in model: the dense / standard / trimmed / pruned trade-off table.

What it runs (experiments/trimming.py): calibrates tau on 240 rows of the built-in generic text
for active routed-expert parameter targets 0.8, 0.65 and 0.5 (one global tau, and a tau per
layer), checks each policy's fraction on held-out rows, and scores every row of the table on 100
held-out prompts per domain: dense-equivalent (every expert active), standard top-k, trimmed at
each target, Fisher-MoE 50% (global dims), Pathfinder 50% (global experts) and Fisher-MoE 50% +
trimming at 0.65 (calibrated on the pruned model). Each row also gets Active Token Latency
(prefill and decode, batch 8, 64-token real-text prompts, 32 new tokens), tokens/s and weight
memory; a tau sweep gives accuracy-vs-active-parameter curves; routing telemetry (load, dormant
experts, rotation) of the standard and the 0.65 policy.

    python experiments/trimming.py --config=configs/trimming.py --workdir=/tmp/trimming

A Hugging Face checkpoint with its own tokenizer: --config.model_path=DIR
--config.calibration.data=json:calib.jsonl --config.eval.data=json:held_out.jsonl (and/or
--config.lm_eval.tasks="('arc_easy',)"); the skills exact match is skipped there.

How long: 9 minutes on the 2-core dev CPU. Result: the trade-off section of
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
    # Generic text, as the Fisher-MoE and Pathfinder launchers calibrate: tau for each target and
    # the Fisher and Pathfinder rows' scores (full-sequence loss).
    config.calibration = ml_collections.ConfigDict(dict(
        data="prose:train", max_rows=240, n_per_domain=48, seq_len=64, batch_size=48, micro_batch_size=16, seed=0,
        answer_only=False))
    config.targets = (0.8, 0.65, 0.5)
    config.modes = ("global", "per_layer")
    config.grid = 10  # per-layer greedy: tau steps of 0.05
    config.sweep_taus = (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    config.comparison_rows = True  # the dense-equivalent, Fisher-MoE and Pathfinder rows
    config.pruned_rows = True  # with comparison_rows: the Fisher-MoE and Pathfinder rows (False: dense-equivalent only)
    config.prune_ratio = 0.5  # Fisher-MoE (dims) and Pathfinder (experts) rows
    config.pruned_trim_target = 0.65
    config.latency = ml_collections.ConfigDict(dict(batch_size=8, prompt_len=64, new_tokens=32, repeats=3, rounds=3))
    config.telemetry_batches = 10
    # Quality columns of every row, for any checkpoint and tokenizer (moe_jax.quality): perplexity on
    # held-out text (data: any load_texts spec; "" = none) and lm-eval task scores (no tasks = none).
    config.eval = quality.eval_config(data="prose:eval", seq_len=128)
    config.lm_eval = quality.lm_eval_config()
    return config
