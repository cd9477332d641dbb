"""The main job: evaluate the built-in skills MoE, then each configured pruning method.

    python experiments/prune.py --config=configs/prune.py --workdir=/tmp/prune
    python experiments/prune.py --config=configs/fisher_moe.py --workdir=/tmp/fisher \
        --config.model_path=/path/to/Qwen1.5-MoE-A2.7B --config.calibration.data=hf:wikitext/wikitext-2-raw-v1:train

Finds (or trains) the model, evaluates the baseline and prints its per-domain table, then
runs every ``(method[:scope], ratio)`` of ``config.methods``: one calibration pass collects
every statistic the methods need (WORKDIR/scores.npz; killed, it resumes), each method selects
a plan (WORKDIR/plans/<run>.json), the model is compacted (WORKDIR/pruned/<run>/, an HF
checkpoint, when ``config.export``), evaluated, and added to the before/after comparison.
Results: WORKDIR/eval/<run>/ and WORKDIR/comparison.md. See configs/prune.py for the knobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from moe_jax import config_files, evaluation, footprint, hf, launch, pruning, quality, reporting, scoring
from moe_jax.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/prune.py (or a variant).", lock_config=True)
flags.DEFINE_string("workdir", None, "Model (WORKDIR/model), per-run results and the comparison table.")
flags.mark_flags_as_required(["config", "workdir"])

Params = dict[str, Any]

# method -> the statistics its selection needs. Dim-level (Fisher-MoE and its baselines; scopes
# expert/layer/global) and whole-expert (MoE Pathfinder and its baselines; scopes uniform/global).
METHODS: dict[str, tuple[str, ...]] = {name: (name,) for name in scoring.DIM_STATISTICS}
METHODS.update({"pathfinder": ("trajectory", "routing"), "frequency": ("routing",), "soft_count": ("routing",),
                "reap": ("routing",), "recon": ("trajectory",), "naee": ("trajectory",), "random_experts": ()})


def parse_method(name: str, default_scope: str) -> tuple[str, str]:
    """"fisher" -> ("fisher", default_scope); "fisher:expert" -> ("fisher", "expert")."""
    method, _, scope = name.partition(":")
    scope = scope or default_scope
    if method not in METHODS:
        raise ValueError(f"config.methods: method {method!r} is not available; available: {sorted(METHODS)}")
    scopes = pruning.ALLOCATIONS if method in pruning.EXPERT_METHODS else pruning.SCOPES
    if scope not in scopes:
        raise ValueError(f"config.methods: {name!r} has scope {scope!r}; expected one of {scopes}")
    return method, scope


def check_methods(methods: Sequence[Any], default_scope: str = "global") -> list[tuple[str, str, float]]:
    """Validate config.methods before anything expensive runs: (method, scope, 0 < ratio < 1)."""
    checked = []
    for entry in methods:
        if not (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2):
            raise ValueError(f"config.methods entry {entry!r}: expected a (name, ratio) pair")
        name = str(entry[0])
        try:
            ratio = float(entry[1])
        except (TypeError, ValueError):
            raise ValueError(f"config.methods: {name!r} ratio {entry[1]!r} is not a number") from None
        method, scope = parse_method(name, default_scope)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"config.methods: {name!r} ratio {ratio} must lie in (0, 1)")
        checked.append((method, scope, ratio))
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
    if not path.is_file():
        raise FileNotFoundError(f"config.train_config: no config file at {path}")
    train_config = config_files.load(path)
    if config.train_steps > 0:
        train_config.steps = config.train_steps
    train.train(train_config, workdir)
    return workdir / "model"


def calibrate(cfg: ModelConfig, params: Params, tokenizer, config, statistics: Sequence[str],
              workdir: Path, model_id: str = "") -> scoring.Scores:
    """One calibration pass for every statistic the methods need; cached in WORKDIR/scores.npz
    (reused only for the same model, calibration settings and a superset of the statistics)."""
    path = workdir / "scores.npz"
    if path.exists():
        cached = scoring.Scores.load(path)
        have = set(cached.meta.get("statistics", ()))
        if (set(statistics) <= have and cached.meta.get("calibration") == config.calibration.to_dict()
                and cached.meta.get("model") == model_id):
            print(f"Using the scores in {path}")
            return cached
    c = config.calibration
    batches = scoring.calibration_batches_from_config(c, tokenizer)
    print(f"Calibration: {c.data}, {sum(len(b['tokens']) for b in batches)} rows of {c.seq_len} tokens")
    data_id = json.dumps([c.to_dict(), sorted(statistics)], sort_keys=True)
    # Keyed by the weights too: another model's half-done state starts afresh instead of being refused.
    state_key = hashlib.blake2b(f"{data_id}|{model_id}".encode(), digest_size=4).hexdigest()
    state = workdir / f"scores_state-{state_key}.npz"
    scores = scoring.collect(cfg, params, batches, statistics, micro_batch_size=c.micro_batch_size, seed=c.seed,
                             checkpoint_path=state, data_id=data_id, total=len(batches))
    scores.meta["calibration"] = c.to_dict()
    scores.meta["model"] = model_id
    scores.save(path)
    return scores


def evaluate_run(label: str, cfg: ModelConfig, params: Params, tokenizer, settings, workdir: Path,
                 lm_eval=None) -> dict:
    """Evaluate one model (and score it on lm-eval tasks when `lm_eval` is given), print its table
    and write WORKDIR/eval/<label>/."""
    results = {"run": label, **evaluation.evaluate(cfg, params, tokenizer, settings)}
    if lm_eval is not None:
        results["lm_eval"] = lm_eval(cfg, params)
    print(f"\n## {label}\n\n{reporting.format_table(results)}")
    reporting.write_results(results, workdir / "eval" / label.replace("@", "_"))
    return results


def main(argv: list[str]) -> None:
    mesh = launch.start(argv)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    try:
        methods = check_methods(config.methods, config.scope)
        settings = evaluation.EvalSettings.from_config(config.eval)
        path = find_model(config, workdir)
        cfg, params = evaluation.load_model(path, config.dtype)
        tokenizer = evaluation.load_eval_tokenizer(config.tokenizer, path, cfg)
        lm_eval = quality.lm_eval_scorer(config.lm_eval, path, config.calibration.seed)
    except (FileNotFoundError, ValueError) as err:  # train.TrainError and harness.HarnessError are ValueErrors
        raise app.UsageError(str(err)) from None
    params = launch.place(cfg, params, mesh)  # sharded when --mesh, else as loaded
    print(f"Model: {reporting.repo_relative(path, REPO)} ({cfg.model_type}, "
          f"{footprint.model_size(cfg, params)['total']:,} params)")
    runs = [("baseline", evaluate_run("baseline", cfg, params, tokenizer, settings, workdir, lm_eval))]
    if not methods:
        note = ("No pruning methods configured (config.methods is empty): only the baseline was evaluated. "
                "Set e.g. --config.methods=\"(('fisher', 0.5), ('activation:layer', 0.5))\".")
        print(f"\n{note}")
    else:
        needed = sorted({s for m, _, _ in methods for s in METHODS[m]}) or ["routing"]
        scores = calibrate(cfg, params, tokenizer, config, needed, workdir, scoring.model_digest(cfg, params))
    for method, scope, ratio in methods:
        label = reporting.run_label(method, scope, ratio)
        plan = pruning.select(cfg, scores, method, scope, ratio, min_dims_per_expert=config.min_dims_per_expert,
                              drop_empty_experts=config.drop_empty_experts, params=params, seed=config.calibration.seed,
                              width_multiple=config.width_multiple)
        plan.save(workdir / "plans" / f"{label}.json")
        print(f"\n{plan.summary()}")
        pruned_cfg, pruned_params = pruning.apply(cfg, params, plan)
        pruned_params = launch.place(pruned_cfg, pruned_params, mesh)
        if config.export:
            out = workdir / "pruned" / label
            # The tokenizer, and the generation config whose end ids transformers' generate stops at.
            extra = [path / name for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
                     if (path / name).is_file()]
            hf.save_pretrained(pruned_cfg, pruned_params, out, overwrite=True, extra_files=extra)
        runs.append((label, evaluate_run(label, pruned_cfg, pruned_params, tokenizer, settings, workdir, lm_eval)))
    table = reporting.comparison_table(runs)
    print(f"\n## Before / after pruning\n\n{table}")
    text = f"# Before / after pruning\n\nModel: {reporting.repo_relative(path, REPO)}\n\n{table}\n"
    if not methods:
        text += f"\n{note}\n"
    if not any(r.get("exact_match") or r.get("lm_eval") or reporting.TEXT_DOMAIN in r.get("perplexity", {})
               for _, r in runs):
        blind = ("No quality column: skills exact match needs the built-in byte tokenizer. Set "
                 "--config.eval.data=<held-out text, any load_texts spec> for perplexity and/or "
                 "--config.lm_eval.tasks=\"('arc_easy',)\" for lm-eval scores.")
        print(f"\n{blind}")
        text += f"\n{blind}\n"
    reporting.atomic_write(workdir / "comparison.md", text)
    print(f"\nwrote {workdir / 'comparison.md'} and {workdir / 'eval'}/")


if __name__ == "__main__":
    app.run(main)
