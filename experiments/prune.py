"""The main job: evaluate the built-in skills MoE, then each configured pruning method.

    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/prune

Finds (or trains) the model, evaluates the baseline and prints its per-domain table, then
runs every ``(name, ratio)`` of ``config.methods``: prune, evaluate, add a row to the
before/after comparison. Results: WORKDIR/eval/<run>/ and WORKDIR/comparison.md. See
configs/prune.py for the search order of the model and the knobs.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moe_jax import evaluation  # noqa: E402
from moe_jax.config import ModelConfig  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/prune.py (or a variant).", lock_config=True)
flags.DEFINE_string("workdir", None, "Model (WORKDIR/model), per-run results and the comparison table.")
flags.mark_flags_as_required(["config", "workdir"])

Params = dict[str, Any]
PruneFn = Callable[[ModelConfig, Params, float, Any], tuple[ModelConfig, Params]]

# name -> prune(cfg, params, ratio, config) -> (smaller cfg, params). Filled by later issues.
METHODS: dict[str, PruneFn] = {}
PLANNED = {"fisher": "Fisher-MoE",
           "pathfinder": "MoE Pathfinder"}


def check_methods(methods: Sequence[Any]) -> list[tuple[str, float]]:
    """Validate config.methods before anything expensive runs: (known name, 0 < ratio < 1) pairs."""
    checked = []
    for entry in methods:
        if not (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2):
            raise ValueError(f"config.methods entry {entry!r}: expected a (name, ratio) pair")
        name, ratio = str(entry[0]), float(entry[1])
        if name not in METHODS:
            later = f" ({PLANNED[name]} lands in a later issue)" if name in PLANNED else ""
            raise ValueError(f"config.methods: method {name!r} is not available{later}; "
                             f"available: {sorted(METHODS) or 'none yet'}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"config.methods: {name!r} ratio {ratio} must lie in (0, 1)")
        checked.append((name, ratio))
    return checked


def find_model(config, workdir: Path) -> Path:
    """config.model_path, else WORKDIR/model, else the committed checkpoint, else train one."""
    if config.model_path:
        return Path(config.model_path).expanduser()
    for candidate in (workdir / "model", REPO / config.checkpoint):
        if (candidate / "config.json").is_file():
            return candidate
    print(f"No model in {workdir / 'model'} or {REPO / config.checkpoint}: training {config.train_config} "
          f"into {workdir} (see its docstring for how long this takes)")
    return train_default(config, workdir)


def train_default(config, workdir: Path) -> Path:
    """Train the model of config.train_config with the trainer library; it exports WORKDIR/model."""
    from moe_jax import train

    path = REPO / config.train_config
    spec = importlib.util.spec_from_file_location("train_config", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"config.train_config: no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train_config = module.get_config()
    if config.train_steps > 0:
        train_config.steps = config.train_steps
    train.train(train_config, workdir)
    return workdir / "model"


def run_label(name: str, ratio: float) -> str:
    return f"{name}@{ratio:g}"


def evaluate_run(label: str, cfg: ModelConfig, params: Params, tokenizer, settings, workdir: Path) -> dict:
    """Evaluate one model, print its table and write WORKDIR/eval/<label>/."""
    results = {"run": label, **evaluation.evaluate(cfg, params, tokenizer, settings)}
    print(f"\n## {label}\n\n{evaluation.format_table(results)}")
    evaluation.write_results(results, workdir / "eval" / label.replace("@", "_"))
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    try:
        methods = check_methods(config.methods)
        settings = evaluation.EvalSettings.from_config(config.eval)
        path = find_model(config, workdir)
        cfg, params = evaluation.load_model(path, config.dtype)
        tokenizer = evaluation.load_eval_tokenizer(config.tokenizer, path, cfg)
    except (FileNotFoundError, ValueError) as err:  # train.TrainError is a ValueError
        raise app.UsageError(str(err)) from None
    print(f"Model: {path} ({cfg.model_type}, {evaluation.model_size(cfg, params)['total']:,} params)")
    runs = [("baseline", evaluate_run("baseline", cfg, params, tokenizer, settings, workdir))]
    if not methods:
        note = ("No pruning methods configured (config.methods is empty): only the baseline was evaluated. "
                "Fisher-MoE and Pathfinder land in later issues; then set e.g. "
                "--config.methods=\"(('fisher', 0.5),)\".")
        print(f"\n{note}")
    for name, ratio in methods:
        pruned_cfg, pruned_params = METHODS[name](cfg, params, ratio, config)
        label = run_label(name, ratio)
        runs.append((label, evaluate_run(label, pruned_cfg, pruned_params, tokenizer, settings, workdir)))
    table = evaluation.comparison_table(runs)
    print(f"\n## Before / after pruning\n\n{table}")
    text = f"# Before / after pruning\n\nModel: {path}\n\n{table}\n"
    if not methods:
        text += f"\n{note}\n"
    evaluation.atomic_write(workdir / "comparison.md", text)
    print(f"\nwrote {workdir / 'comparison.md'} and {workdir / 'eval'}/")


if __name__ == "__main__":
    app.run(main)
