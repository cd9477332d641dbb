"""Train a model from an ml_collections config: the built-in tiny skills MoE by default.

    python experiments/train.py --config=configs/skills_tiny.py --workdir=/tmp/skills_tiny
    python experiments/train.py --config=configs/skills_tiny.py --workdir=/tmp/smoke --config.steps=50

Re-running with the same --workdir resumes from its latest checkpoint. The trained model is
written to WORKDIR/model/ (Hugging Face format, loadable with `moe_jax.hf.load_pretrained`).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from moe_jax import launch, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    mesh = launch.start(argv)
    try:
        summary = train.train(FLAGS.config, FLAGS.workdir, mesh=mesh)
    except train.TrainError as err:
        raise app.UsageError(str(err)) from None
    print(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "tokens_per_s", "final", "accuracy")},
                     indent=2))


if __name__ == "__main__":
    app.run(main)
