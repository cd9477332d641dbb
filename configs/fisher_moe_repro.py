"""Fisher-MoE's findings on the built-in model: experiments/fisher_moe.py.

What it runs: one calibration pass (320 rows of 64 tokens of the built-in generic text,
`moe_jax.data.prose`, as the paper calibrates on web text) collecting Fisher, mean |grad|,
activation, router-weighted activation, magnitude and random scores; 6 methods x 3 scopes x 3
ratios, simulated with masks and scored on 100 held-out prompts per domain; removal of the top-k
dims (k = 1..256) by Fisher, activation and random; memory at 50% (this model and the
Qwen1.5-MoE-A2.7B shapes); prefill/decode tokens/s of the compacted 50% models, here and on a
random ~105M-parameter expert-dominated model; the answer-only-loss Fisher as an ablation
(skills calibration only).

    python experiments/fisher_moe.py --config=configs/fisher_moe_repro.py --workdir=/tmp/fisher_repro

A Hugging Face checkpoint with its own tokenizer: --config.model_path=DIR
--config.calibration.data=json:calib.jsonl --config.eval.data=json:held_out.jsonl (and/or
--config.lm_eval.tasks="('arc_easy',)"); the skills exact match is skipped there.

How long: 8 minutes on the 2-core dev CPU. Result: the Fisher-MoE section of
results/reproduce/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

from moe_jax import quality
from moe_jax.scoring import DIM_STATISTICS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # "" = the committed checkpoints/testbed
    config.checkpoint = "checkpoints/testbed"
    config.seed = 0
    config.n_per_domain = 100
    config.batch_size = 64
    config.calibration = ml_collections.ConfigDict(dict(
        data="prose:train", max_rows=320, n_per_domain=64, seq_len=64, batch_size=16, micro_batch_size=16, seed=0))
    config.methods = DIM_STATISTICS
    config.scopes = ("expert", "layer", "global")
    config.ratios = (0.25, 0.5, 0.75)
    config.sensitivity_rankings = ("fisher", "activation", "random")
    config.sensitivity_ks = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    config.throughput_batch = 8
    config.prompt_len = 64
    config.repeats = 5
    config.new_tokens = 32  # decode tokens/s = (new_tokens - 1) * batch / (generate(new_tokens) - generate(1))
    config.throughput_this_model = True  # False: time only the expert-heavy model (smoke tests)
    config.answer_only_ablation = True
    # Quality columns of every row, for any checkpoint and tokenizer (moe_jax.quality): perplexity on
    # held-out text (data: any load_texts spec; "" = none) and lm-eval task scores (no tasks = none).
    config.eval = quality.eval_config(data="prose:eval", seq_len=128)
    config.lm_eval = quality.lm_eval_config()
    # A random-weight model whose routed experts dominate the FLOPs, for throughput only.
    config.heavy = ml_collections.ConfigDict(dict(
        enabled=True, vocab_size=512, hidden_size=512, num_layers=4, num_heads=8, num_experts=16, top_k=2,
        width=1024))
    return config
