"""Fisher-MoE on the built-in model: Fisher-ranked routed-expert dims removed at 50%.

Runs experiments/prune.py: one calibration pass (320 rows of the built-in generic text,
per-sequence Fisher from one backward per batch), then Fisher at 50% in the three
scopes of the paper (IntDim-E "expert", IntDim-L "layer", IntDim-G "global"), each exported as
an HF checkpoint under WORKDIR/pruned/ and evaluated against the unpruned model.

    python experiments/prune.py --config=configs/fisher_moe.py --workdir=/tmp/fisher_moe

On a real checkpoint, point it at the model and a text corpus:

    --config.model_path=/ckpt/Qwen1.5-MoE-A2.7B --config.tokenizer=auto \\
    --config.calibration.data=hf:wikitext/wikitext-2-raw-v1:train --config.calibration.max_rows=128

How long (2-core dev CPU, built-in testbed): about 3 minutes (a calibration pass, then three
compactions, exports and evaluations).
"""

from __future__ import annotations

from pathlib import Path

from moe_jax import config_files


def get_config():
    config = config_files.load(Path(__file__).with_name("prune.py"))
    config.methods = (("fisher:expert", 0.5), ("fisher:layer", 0.5), ("fisher:global", 0.5))
    return config
