"""Active Token Latency against active experts per token, on a random model whose experts dominate.

What it runs (experiments/trim_latency.py): a random-weight Qwen2-MoE-layout model, routers
scaled so routing is peaked as in trained models; rows top_k, top_k - 1, ..., 1 active
experts per token (`LayerTrim(max_active=m)`, so the active fraction is exactly m / top_k);
for each batch size, prefill and decode latency per token and tokens/s, in `rounds` passes
over all rows (median of rounds). Accuracy is meaningless here: the built-in model's table
(experiments/trimming.py) has it.

    python experiments/trim_latency.py --config=configs/trim_latency.py --workdir=/tmp/trim_latency
    python experiments/trim_latency.py --config=configs/trim_latency.py:qwen15 --workdir=/tmp/trim_latency_gpu

Presets: "cpu" (default; ~110M parameters, 4 layers of 16 experts x 1024, top-4, float32;
about 3 minutes on the 2-core CPU) and "qwen15" (6 Qwen1.5-MoE-A2.7B-shaped layers: 60
experts x 1408, top-4, hidden 2048, shared expert 5632, bfloat16; for a GPU).
"""

from __future__ import annotations

import ml_collections

PRESETS = {
    "cpu": dict(hidden_size=512, num_layers=4, num_heads=8, num_experts=16, top_k=4, width=1024, shared_width=0,
                vocab_size=512, dtype="float32", batch_sizes=(8, 32), prompt_len=64, new_tokens=32),
    "qwen15": dict(hidden_size=2048, num_layers=6, num_heads=16, num_experts=60, top_k=4, width=1408,
                   shared_width=5632, vocab_size=4096, dtype="bfloat16", batch_sizes=(8, 64), prompt_len=256,
                   new_tokens=64),
}


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = ml_collections.ConfigDict(PRESETS[preset])
    config.preset = preset
    config.router_scale = 40.0  # random routers are near-uniform; trained ones are peaked
    config.repeats = 3
    config.rounds = 3
    config.seed = 0
    return config
