"""The project's main job on the built-in default: the testbed MoE before and after pruning.

What it runs:
1. Finds the model: ``model_path`` if set; else WORKDIR/model/; else the committed
   ``checkpoints/testbed/`` (docs/testbed.md; ``--config.checkpoint=checkpoints/skills_tiny`` for
   the earlier built-in model); else trains it with ``train_config`` (configs/testbed.py)
   into WORKDIR (``train_steps`` > 0 overrides its step count, e.g. for a smoke run).
2. Evaluates it (see configs/evaluate.py: exact match per skills domain, safety refusal and
   over-refusal, perplexity, expert load, size, throughput) and prints the "before" table.
3. Collects the statistics the methods need in one calibration pass over ``calibration.data``
   (320 rows of the built-in generic text by default, as the papers calibrate on web text;
   ``--config.calibration.data=skills:train`` for task text; any `load_texts` spec), then for each
   ``(method[:scope], ratio)`` in ``methods`` selects a plan, compacts the model, exports it
   (``export``) and evaluates it as an "after" row. Dim methods (ratio = share of routed-expert
   dims removed): Fisher-MoE "fisher" and its baselines "grad_abs", "activation",
   "router_weighted", "magnitude", "random"; scopes "expert" (IntDim-E), "layer" (IntDim-L),
   "global" (IntDim-G, the default ``scope``). Expert methods (ratio = share of experts
   removed): MoE Pathfinder "pathfinder" and "frequency", "soft_count", "reap", "recon",
   "naee", "random_experts"; scopes "uniform" and "global".
Writes WORKDIR/scores.npz, plans/<run>.json, pruned/<run>/ (HF checkpoint),
eval/<run>/results.{json,md} + expert_load.png, and WORKDIR/comparison.md.

    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/prune
    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/smoke \\
        --config.train_steps=50 --config.eval.n_per_domain=10

How long (2-core dev CPU): about 3 minutes when the committed model exists (calibration
and five evaluations, mostly compilation). Training from scratch takes what
configs/testbed.py says.
"""

from __future__ import annotations

import ml_collections

from moe_jax import quality
from moe_jax.evaluation import EvalSettings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # an HF checkpoint directory; "" = WORKDIR/model, the committed one, or train
    config.checkpoint = "checkpoints/testbed"  # committed default model, relative to the repository root
    config.train_config = "configs/testbed.py"  # used only when no model exists
    config.train_steps = 0  # 0: the train config's own step count
    config.tokenizer = "auto"  # "auto" (the checkpoint's own), "byte", or a tokenizer.json path
    config.dtype = "float32"
    # (method[:scope], ratio) pairs run after the baseline: Fisher-MoE removing 50% of the routed
    # dims over the whole model against the activation ranking, and MoE Pathfinder removing 25%
    # of the experts against REAP.
    config.methods = (("fisher", 0.5), ("activation", 0.5), ("pathfinder", 0.25), ("reap", 0.25))
    config.scope = "global"  # for methods named without ":scope"
    config.min_dims_per_expert = 1
    # Kept expert widths are multiples of this (or whole): 8 is what transformers' default expert
    # kernel (grouped_mm: each expert's width in bytes a multiple of 16) needs in bfloat16 and
    # float32, so exports run in stock transformers; GPU GEMM tiles would want 64-128. 1 = exact.
    config.width_multiple = 8
    config.drop_empty_experts = False
    config.export = True  # write each pruned model as an HF checkpoint under WORKDIR/pruned/
    config.calibration = ml_collections.ConfigDict(dict(
        # the built-in generic text, as the papers calibrate on web text; "skills:train" for the
        # task text (n_per_domain examples per domain); any moe_jax.data.load_texts spec, never an eval split
        data="prose:train", max_rows=320,  # rows of seq_len tokens
        n_per_domain=64,  # skills examples per domain
        seq_len=64, batch_size=16, micro_batch_size=16, seed=0,
        answer_only=False,  # True: loss on skills answers only (~0 once learnt; see scoring/calibration.py)
    ))
    config.eval = EvalSettings(n_per_domain=50, data="prose:eval", seq_len=128).as_config()
    # lm-eval task scores as columns of the comparison (needs the `eval` extra); no tasks = none.
    config.lm_eval = quality.lm_eval_config()
    return config
