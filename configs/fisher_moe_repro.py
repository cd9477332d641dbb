"""Fisher-MoE's findings on the built-in model: experiments/fisher_moe.py.

What it runs: one calibration pass (skills train split, 64 examples per domain, answer-only
loss) collecting Fisher, mean |grad|, activation, router-weighted activation, magnitude and
random scores; 6 methods x 3 scopes x 3 ratios, simulated with masks and scored on 50
held-out prompts per domain; removal of the top-k dims (k = 1..256) by Fisher, activation and
random; memory at 50% (this model and the Qwen1.5-MoE-A2.7B shapes); prefill/decode tokens/s
of the compacted 50% models.

    python experiments/fisher_moe.py --config=configs/fisher_moe_repro.py --workdir=/tmp/fisher_repro

How long (2-core dev CPU): TIMING_REPRO.
"""

from __future__ import annotations

import ml_collections

from moe_jax.scoring import DIM_STATISTICS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # "" = the committed checkpoints/skills_tiny
    config.checkpoint = "checkpoints/skills_tiny"
    config.seed = 0
    config.n_per_domain = 50
    config.batch_size = 64
    config.calibration = ml_collections.ConfigDict(dict(
        data="skills:train", n_per_domain=64, seq_len=64, batch_size=16, micro_batch_size=16, max_rows=0, seed=0))
    config.methods = DIM_STATISTICS
    config.scopes = ("expert", "layer", "global")
    config.ratios = (0.25, 0.5, 0.75)
    config.sensitivity_rankings = ("fisher", "activation", "random")
    config.sensitivity_ks = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    config.throughput_batch = 8
    config.prompt_len = 64
    config.repeats = 5
    return config
