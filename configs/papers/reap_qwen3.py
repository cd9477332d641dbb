"""REAP's Qwen3-30B-A3B at 50% of the experts, as llm-compressor reports it, with Pathfinder beside it.

    python experiments/reproduce.py --config=configs/papers/reap_qwen3.py --workdir=/tmp/reap_qwen3 \\
        --config.model_path=/ckpt/Qwen3-30B-A3B
    python experiments/reproduce.py --config=configs/papers/reap_qwen3.py --workdir=/tmp/smoke \\
        --config.smoke=True

Checkpoint: Qwen/Qwen3-30B-A3B (30.5B parameters, 57 GiB in bfloat16). Datasets, from the Hugging
Face cache: wikitext-2-raw-v1 (calibration from train, held-out perplexity on test) and lm-eval's
gsm8k (5-shot). Rows: REAP (uniform, 64 of 128 experts per layer), frequency, and Pathfinder's
global allocation, all at 50%. Hardware: the bfloat16 weights and the evaluation fit one 141 GB
GPU (H200), or two 80 GB GPUs with the experts sharded. Time: not yet measured on a GPU; the smoke
run takes about a minute on the 2-core dev CPU. Published numbers beside ours (llm-compressor's
REAP example): GSM8K kept at 99.8%, weights 56.93 -> 29.92 GiB.
"""

from __future__ import annotations

from moe_jax.reproduction import paper


def get_config():
    table = (("Qwen3-30B-A3B", paper.BASELINE, "", 0.0), ("REAP 50%", "reap", "uniform", 0.5),
             ("frequency 50%", "frequency", "uniform", 0.5), ("Pathfinder 50%", "pathfinder", "global", 0.5))
    node = paper.node(
        title="REAP on Qwen3-30B-A3B at 50%",
        source="llm-compressor's REAP example (REAPPruningModifier) as cited in ANCHORS.md",
        checkpoint="Qwen/Qwen3-30B-A3B", rows=table,
        columns=(("GSM8K", "gsm8k", "exact_match (strict-match)"),),
        published=(("Qwen3-30B-A3B", paper.WEIGHTS, 56.93), ("REAP 50%", paper.WEIGHTS, 29.92),
                   ("REAP 50%", "GSM8K kept %", 99.8)),
        smoke=dict(model=dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                              moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4,
                              norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False),
                   add_bos=False, tasks={"gsm8k": "tiny_gsm"}, rows=("Qwen3-30B-A3B", "REAP 50%")))
    return paper.main_job_config(node, calibration_rows=128)
