"""The project's main job on the built-in default: the skills_tiny MoE before and after pruning.

What it runs:
1. Finds the model: ``model_path`` if set; else WORKDIR/model/; else the committed
   ``checkpoints/skills_tiny/``; else trains it with ``train_config`` (configs/skills_tiny.py)
   into WORKDIR (``train_steps`` > 0 overrides its step count, e.g. for a smoke run).
2. Evaluates it (see configs/evaluate.py: exact match per skills domain, safety refusal and
   over-refusal, perplexity, expert load, size, throughput) and prints the "before" table.
3. For each ``(method, ratio)`` in ``methods``, prunes the model, evaluates it and adds an
   "after" row. The methods (Fisher-MoE "fisher", MoE Pathfinder "pathfinder") land in later
   issues; today ``methods`` is empty and the launcher says so.
Writes WORKDIR/eval/<run>/results.{json,md} + expert_load.png per run, and WORKDIR/comparison.md.

    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/prune
    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/smoke \\
        --config.train_steps=50 --config.eval.n_per_domain=10

How long (2-core dev CPU): about a minute when a trained model exists (evaluation only, mostly
compilation). Training from scratch takes what configs/skills_tiny.py says (TIMING there).
"""

from __future__ import annotations

import ml_collections

from moe_jax.evaluation import EvalSettings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_path = ""  # an HF checkpoint directory; "" = WORKDIR/model, the committed one, or train
    config.checkpoint = "checkpoints/skills_tiny"  # committed default model, relative to the repository root
    config.train_config = "configs/skills_tiny.py"  # used only when no model exists
    config.train_steps = 0  # 0: the train config's own step count
    config.tokenizer = "auto"  # "auto" (the checkpoint's own), "byte", or a tokenizer.json path
    config.dtype = "float32"
    # (name, ratio) pairs run after the baseline, e.g. (("fisher", 0.5), ("pathfinder", 0.25)).
    config.methods = ()
    config.eval = EvalSettings(n_per_domain=50).as_config()
    return config
