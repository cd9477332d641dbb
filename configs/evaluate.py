"""Evaluate one model: skills exact match, perplexity, expert load, size, throughput, memory.

What it runs: loads ``model_path`` (any Hugging Face MoE checkpoint directory) or, when that
is empty, ``WORKDIR/model/`` (what experiments/train.py writes). With the built-in byte
tokenizer: greedy exact match on ``eval.n_per_domain`` held-out prompts of each skills domain
(safety also gives refusal and over-refusal rates) and perplexity over the same examples.
With ``eval.data`` (a `moe_jax.data.load_texts` spec such as ``json:/data/wiki.jsonl``):
perplexity on ``eval.data_rows`` rows of ``eval.seq_len`` tokens of real text. Always: expert
load per domain and MoE layer, parameter counts, prefill/decode tokens/s and peak memory.
Prints the per-domain table; writes WORKDIR/results.json, results.md and expert_load.png.

    python experiments/evaluate.py --config=configs/evaluate.py --workdir=/tmp/skills_tiny
    python experiments/evaluate.py --config=configs/evaluate.py --workdir=/tmp/qwen \\
        --config.model_path=/ckpt/Qwen1.5-MoE-A2.7B --config.eval.data=json:/data/wiki.jsonl

Knobs under ``config.eval`` (see `moe_jax.evaluation.EvalSettings`): domains, n_per_domain,
seed, batch_size, max_new_tokens (0 = longest answer + 1), skills ("auto" = only with the byte
tokenizer, "on", "off"), data, data_rows, seq_len, throughput, throughput_batch, prompt_len,
decode_tokens, repeats.

How long: about a minute for the built-in skills_tiny model on the 2-core dev CPU,
mostly compilation. A real checkpoint on CPU is dominated by its size: lower
``eval.n_per_domain`` and ``eval.data_rows`` there.
"""

from __future__ import annotations

import ml_collections

from moe_jax.evaluation import EvalSettings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # an HF checkpoint directory; "" means WORKDIR/model
    config.tokenizer = "auto"  # "auto" (the checkpoint's own), "byte", or a tokenizer.json path
    config.dtype = "float32"  # weights dtype to load in (router maths is float32 regardless)
    config.eval = EvalSettings(n_per_domain=50).as_config()
    return config
