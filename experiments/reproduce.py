"""Reproduce every table: run each experiment launcher as a stage, then write RESULTS.md and results.json.

    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/reproduce
    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/repro_ci --config.quick=True

1. The model: the committed checkpoints/testbed, or (missing, or `config.train`) the `train`
   stage trains configs/testbed.py into WORKDIR/train/ and the stages use WORKDIR/train/model.
2. Each stage of `config.stages` (moe_jax/reproduction/stages.py) runs its launcher in
   WORKDIR/<stage>/ as a subprocess, unless its marker says it finished with the same
   fingerprint and its outputs parse; WORKDIR/reproduce.log says which ran and which were skipped.
3. WORKDIR/RESULTS.md (every table, laid out like the papers, PNGs linked) and
   WORKDIR/results.json (every number, jax/flax versions, machine), written atomically.

A paper config (configs/papers/*.py: the main job's config with a `paper` node) runs instead
the main job on `--config.model_path` (or, with `--config.smoke=True`, on a tiny random model of
the paper's family with stand-in tasks) as the stage WORKDIR/paper/, then writes the paper's
table, our numbers beside the published ones, to WORKDIR/RESULTS.md and results.json:

    python experiments/reproduce.py --config=configs/papers/reap_qwen3.py --workdir=/tmp/reap \
        --config.model_path=/ckpt/Qwen3-30B-A3B

`config.jobs` > 1 runs that many stages at once (CI's quick run: their timings then share the
machine and mean nothing). A failed stage is reported and the others still run
(`config.keep_going`); the exit status is then non-zero and RESULTS.md says which section is missing.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from moe_jax import (
    launch,  # noqa: F401  (defines --mesh, passed on to a paper config's main job)
    reporting,
    timing,
)
from moe_jax.reporting import atomic_write
from moe_jax.reproduction import paper, results_page, stages

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/reproduce.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Stage sub-workdirs, RESULTS.md, results.json and reproduce.log go here.")
flags.mark_flags_as_required(["config", "workdir"])


def check_config(config) -> None:
    unknown = sorted(set(config.stages) - set(stages.STAGES))
    if unknown:
        raise app.UsageError(f"--config.stages: unknown stages {unknown}; expected some of {sorted(stages.STAGES)}")
    unknown = sorted(set(config.rerun) - set(stages.STAGES))
    if unknown:
        raise app.UsageError(f"--config.rerun: unknown stages {unknown}; expected some of {sorted(stages.STAGES)}")
    if config.jobs < 1:
        raise app.UsageError(f"--config.jobs={config.jobs}: expected at least 1 stage at a time")


def log_to(workdir: Path):
    """A logger that prints each line and appends it to WORKDIR/reproduce.log, where the workdir
    reads WORKDIR and the repository's paths are relative, as in the stages' markers."""
    def log(line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        with open(workdir / "reproduce.log", "a") as f:
            f.write(stages.path_free(line, workdir, REPO) + "\n")
    return log


def reproduce_paper(config, workdir: Path) -> None:
    """Run the main job on a paper config (stage WORKDIR/paper/), then write the paper's table."""
    user = {k: v for k, v in config_flags.get_override_values(FLAGS["config"]).items()
            if k != "smoke" and not k.startswith("paper.")}
    if config.smoke:
        overrides = {**paper.smoke_overrides(config.paper, workdir / "smoke"), **user}
    elif not config.model_path:
        raise app.UsageError(f"{config.paper.title}: set --config.model_path to a local copy of "
                             f"{config.paper.checkpoint} (or --config.smoke=True for a tiny stand-in run)")
    else:
        overrides = user
    config_file = reporting.repo_relative(Path(config_flags.get_config_filename(FLAGS["config"])).resolve(), REPO)
    stage = stages.Stage("paper", "experiments/prune.py", config_file, ("comparison.md",),
                         fixed_flags=(f"--mesh={FLAGS.mesh}",) if FLAGS.mesh else ())
    model = Path(overrides.pop("model_path", config.model_path)).expanduser().resolve()
    log = log_to(workdir)
    log(f"{config.paper.title}{' (smoke)' if config.smoke else ''} into {workdir}")
    t0 = time.time()
    env = stages.subprocess_env(REPO, workdir / ".jax_cache")
    record = stages.run_stage(stage, REPO, workdir / "paper", overrides, model, stages.model_digest(model), env, log)
    table = paper.collect(workdir / "paper", config.paper, smoke=config.smoke,
                          runs=paper.runs_of(overrides.get("methods", config.methods), config.scope))
    table.update(stage=record, seconds=time.time() - t0, versions=timing.versions(),
                 machine=timing.machine())
    atomic_write(workdir / "results.json", json.dumps(table, indent=1, allow_nan=False))
    atomic_write(workdir / "RESULTS.md", paper.render(table))
    log(f"wrote {workdir / 'RESULTS.md'} and results.json ({time.time() - t0:.0f} s)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config, workdir = FLAGS.config, Path(FLAGS.workdir).resolve()
    if "paper" in config:
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            return reproduce_paper(config, workdir)
        except (FileNotFoundError, paper.PaperConfigError) as err:
            raise app.UsageError(str(err)) from None
        except stages.StageError as err:
            raise SystemExit(str(err)) from None
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    log = log_to(workdir)

    overrides = (config.quick_overrides if config.quick else config.overrides).to_dict()
    env = stages.subprocess_env(REPO, workdir / ".jax_cache" if config.compilation_cache else None)
    log(f"reproduction ({'quick' if config.quick else 'full'}) into {workdir}")
    t0 = time.time()
    records, failures = {}, {}

    def run(name: str, model, model_id):
        try:
            records[name] = stages.run_stage(stages.STAGES[name], REPO, workdir / name, overrides.get(name, {}),
                                             model, model_id, env, log, force=name in config.rerun)
        except stages.StageError as err:
            log(f"{name}: FAILED")
            failures[name] = str(err)
            if not config.keep_going:
                raise

    model = REPO / config.checkpoint
    if config.train or not (model / "config.json").is_file():
        run("train", None, None)
        if "train" in failures:
            raise app.UsageError(f"training the model failed, so no stage can run:\n{failures['train']}")
        model = workdir / "train" / "model"
    model_id = stages.model_digest(model)
    log(f"model {model} (digest {model_id})")
    if config.jobs > 1:  # stages are independent subprocesses; threads only wait on them
        first = {name: i for i, name in enumerate(stages.PARALLEL_START_ORDER)}
        start_order = sorted(config.stages, key=lambda name: first.get(name, len(first)))
        with concurrent.futures.ThreadPoolExecutor(config.jobs) as pool:
            list(pool.map(lambda name: run(name, model, model_id), start_order))
        records = {name: records[name] for name in config.stages if name in records}  # the configured order
    else:
        for name in config.stages:
            run(name, model, model_id)

    results = results_page.collect(workdir, config, records, failures, reporting.repo_relative(model, REPO),
                                   quick=config.quick, seconds=time.time() - t0)
    atomic_write(workdir / "results.json", json.dumps(results, indent=1, allow_nan=False))
    atomic_write(workdir / "RESULTS.md", results_page.render(results))
    log(f"wrote {workdir / 'RESULTS.md'} and results.json ({time.time() - t0:.0f} s)")
    if failures:
        for message in failures.values():
            print(message, file=sys.stderr)
        raise SystemExit(f"stages failed: {sorted(failures)}")


if __name__ == "__main__":
    app.run(main)
