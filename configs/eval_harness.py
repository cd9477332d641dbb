"""Score a model on lm-evaluation-harness tasks: experiments/eval_harness.py.

What it runs: `moe_jax.harness.MoeJaxLM` on ``model_path`` (any Hugging Face MoE checkpoint or a
moe_jax export, uniform or not) with its own tokenizer, optionally a pruning plan (simulated with
masks) and a trimming policy, through `lm_eval.simple_evaluate`. Writes WORKDIR/results.json
(lm-eval's results), results.md (its table) and samples_<task>.jsonl. Offline unless
HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 are set; local task YAMLs come from ``include_path``.

    python -m experiments.eval_harness --config=configs/eval_harness.py --workdir=/tmp/arc \\
        --config.model_path=/ckpt/Qwen1.5-MoE-A2.7B --config.tasks="('arc_easy',)" \\
        --config.plan=/tmp/prune/plans/fisher-expert@0.5.json

How long: a few seconds per task on a tiny checkpoint on the 2-core dev CPU (mostly
compilation); a real checkpoint is dominated by its size and the task's tokens.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # required: a Hugging Face checkpoint directory
    config.tokenizer = ""  # a directory transformers' AutoTokenizer loads; "" = the checkpoint's own
    config.dtype = "float32"
    config.plan = ""  # a PruningPlan JSON for this (unpruned) model, applied as masks; "" = none
    config.trimming = ""  # a TrimmingPolicy JSON calibrated on this model's routers; "" = none
    config.tasks = ("arc_easy",)  # lm-eval task or group names
    config.include_path = ""  # a directory of local task YAMLs, added to lm-eval's own
    config.num_fewshot = -1  # -1: each task's default
    config.limit = 0  # documents per task; 0 = all
    config.batch_size = 8  # rows per compiled batch (fixed: a few programs serve every request)
    config.max_length = 0  # tokens; 0 = the model's max_position_embeddings, as lm-eval's HF backend
    config.max_gen_toks = 256
    config.impl = "auto"  # expert dispatch (moe_jax.model.moe)
    config.seed = 0  # lm-eval's random, numpy and few-shot seeds
    return config
