"""MoE Pathfinder on Mixtral-8x7B: whole experts pruned (25% and 50%) against REAP, NAEE and frequency.

    python experiments/reproduce.py --config=configs/papers/pathfinder_mixtral.py --workdir=/tmp/pf_mixtral \\
        --config.model_path=/ckpt/Mixtral-8x7B-v0.1 --mesh=expert=2
    python experiments/reproduce.py --config=configs/papers/pathfinder_mixtral.py --workdir=/tmp/smoke \\
        --config.smoke=True

Checkpoint: mistralai/Mixtral-8x7B-v0.1 (46.7B parameters, 87 GiB in bfloat16). Datasets, from the
Hugging Face cache: wikitext-2-raw-v1 (calibration from train, held-out perplexity on test) and
lm-eval's arc_challenge, hellaswag, mmlu, winogrande, gsm8k and medqa_4options (the six
benchmarks indexed for the paper; check them against its table). Rows: Pathfinder's global
allocation (layers keep different numbers of experts) and the uniform baselines REAP, NAEE and
frequency at 2 and 4 of 8 experts removed per layer on average. Hardware: the bfloat16 weights
need a 141 GB GPU (H200) or two 80 GB GPUs with the experts sharded. Time: not yet measured on
a GPU; the smoke run takes about a minute on the 2-core dev CPU. Published numbers: the seed
text gives no per-task scores, so the cells show ours alone; add the paper's as
`config.paper.published` entries to see them side by side.
"""

from __future__ import annotations

from moe_jax.reproduction import paper

METHODS = (("Pathfinder", "pathfinder", "global"), ("REAP", "reap", "uniform"), ("NAEE", "naee", "uniform"),
           ("frequency", "frequency", "uniform"))


def get_config():
    table = (("Mixtral-8x7B", paper.BASELINE, "", 0.0),
             *((f"{name} {r:.0%}", method, scope, r) for r in (0.25, 0.5) for name, method, scope in METHODS))
    node = paper.node(
        title="MoE Pathfinder on Mixtral-8x7B",
        source="MoE Pathfinder (arXiv 2512.18425): the seed text reports no per-task numbers",
        checkpoint="mistralai/Mixtral-8x7B-v0.1", rows=table,
        columns=(("ARC-c", "arc_challenge", "acc_norm"), ("HellaSwag", "hellaswag", "acc_norm"),
                 ("MMLU", "mmlu", "acc"), ("WinoGrande", "winogrande", "acc"),
                 ("GSM8K", "gsm8k", "exact_match (strict-match)"), ("MedQA", "medqa_4options", "acc_norm")),
        smoke=dict(model=dict(model_type="mixtral", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                              num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                              tie_word_embeddings=False),
                   add_bos=True, tasks={"arc_challenge": "tiny_mc", "hellaswag": "tiny_mc", "mmlu": "tiny_mc",
                                        "winogrande": "tiny_mc", "gsm8k": "tiny_gsm", "medqa_4options": "tiny_mc"},
                   rows=("Mixtral-8x7B", "Pathfinder 25%")))
    return paper.main_job_config(node, calibration_rows=64)
