"""Reproduce every table: run each experiment launcher as a stage, then write RESULTS.md and results.json.

    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/reproduce
    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/repro_ci --config.quick=True

1. The model: the committed checkpoints/skills_tiny, or (missing, or `config.train`) the `train`
   stage trains configs/skills_tiny.py into WORKDIR/train/ and the stages use WORKDIR/train/model.
2. Each stage of `config.stages` (moe_jax/reproduction/stages.py) runs its launcher in
   WORKDIR/<stage>/ as a subprocess, unless its marker says it finished with the same
   fingerprint and its outputs parse; WORKDIR/reproduce.log says which ran and which were skipped.
3. WORKDIR/RESULTS.md (every table, laid out like the papers, PNGs linked) and
   WORKDIR/results.json (every number, jax/flax versions, machine), written atomically.

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_jax.reporting import atomic_write  # noqa: E402
from moe_jax.reproduction import book, stages  # noqa: E402

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config, workdir = FLAGS.config, Path(FLAGS.workdir).resolve()
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "reproduce.log"

    def log(line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

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
        with concurrent.futures.ThreadPoolExecutor(config.jobs) as pool:
            list(pool.map(lambda name: run(name, model, model_id), config.stages))
        records = {name: records[name] for name in config.stages if name in records}  # the configured order
    else:
        for name in config.stages:
            run(name, model, model_id)

    results = book.collect(workdir, config, records, failures, stages.repo_relative(model, REPO), quick=config.quick,
                           seconds=time.time() - t0)
    atomic_write(workdir / "results.json", json.dumps(results, indent=1, allow_nan=False))
    atomic_write(workdir / "RESULTS.md", book.render(results))
    log(f"wrote {workdir / 'RESULTS.md'} and results.json ({time.time() - t0:.0f} s)")
    if failures:
        for message in failures.values():
            print(message, file=sys.stderr)
        raise SystemExit(f"stages failed: {sorted(failures)}")


if __name__ == "__main__":
    app.run(main)
