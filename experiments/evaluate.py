"""Evaluate a model and write its results table.

    python experiments/evaluate.py --config=configs/evaluate.py --workdir=/tmp/skills_tiny
    python experiments/evaluate.py --config=configs/evaluate.py --workdir=/tmp/eval \\
        --config.model_path=/ckpt/some_hf_moe --config.eval.data=json:/data/wiki.jsonl

Loads ``config.model_path`` (any Hugging Face MoE checkpoint) or WORKDIR/model/, runs
`moe_jax.evaluation.evaluate`, prints the per-domain table and writes WORKDIR/results.json,
results.md and expert_load.png. See configs/evaluate.py for the knobs.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from moe_jax import evaluation, launch, reporting

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/evaluate.py (or a variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where results go; WORKDIR/model is evaluated unless config.model_path.")
flags.mark_flags_as_required(["config", "workdir"])


def model_dir(config, workdir: Path) -> Path:
    """The checkpoint to evaluate: config.model_path, else WORKDIR/model."""
    return Path(config.model_path).expanduser() if config.model_path else workdir / "model"


def main(argv: list[str]) -> None:
    mesh = launch.start(argv)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    path = model_dir(config, workdir)
    try:
        cfg, params = evaluation.load_model(path, config.dtype)
        tokenizer = evaluation.load_eval_tokenizer(config.tokenizer, path, cfg)
        settings = evaluation.EvalSettings.from_config(config.eval)
    except (FileNotFoundError, ValueError) as err:
        raise app.UsageError(f"{err}\n(set --config.model_path=<HF checkpoint dir> or train a model into "
                             f"{workdir}/model with experiments/train.py)") from None
    params = launch.place(cfg, params, mesh)  # sharded when --mesh, else as loaded
    print(f"Evaluating {path} ({cfg.model_type}, {type(tokenizer).__name__})")
    results = {"model_path": str(path), **evaluation.evaluate(cfg, params, tokenizer, settings)}
    print(reporting.format_table(results))
    paths = reporting.write_results(results, workdir)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    app.run(main)
