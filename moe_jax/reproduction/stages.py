"""The reproduction's stages: each an experiments/*.py launcher run in its own sub-workdir.

A stage is data (`Stage`): the launcher, its config file, the files it must leave behind.
`run_stage` runs it as a subprocess unless its marker (WORKDIR/<stage>/STAGE.json) holds the
same fingerprint and every output exists and parses; then it is skipped. The fingerprint
covers what decides the results: the config's values (not its text: a docstring edit keeps a
finished stage), the flag overrides and the model's bytes. Launcher code is not in it (a commit
would void hours of finished stages): `--config.rerun=(name,)` runs a stage again.

Why subprocesses: every launcher defines its own absl `--config`/`--workdir` flags at import,
so two cannot share one process; a process per stage also frees each stage's compiled programs
and models, keeps a crash to its stage, and passes flags added to the launchers through.
Compilation is shared anyway, through a persistent JAX compilation cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_jax import config_files, reporting
from moe_jax.reporting import atomic_write

MARKER = "STAGE.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One launcher run. `config` is a configs/*.py path (with an optional ":preset"), or None for
    a launcher with plain absl flags; `outputs` are relative to the stage's workdir; `stdout`, if
    set, is a file in it that receives the launcher's stdout (for launchers that only print)."""

    name: str
    script: str
    config: str | None
    outputs: tuple[str, ...]
    uses_model: bool = True
    stdout: str | None = None
    fixed_flags: tuple[str, ...] = ()


# The stages `experiments/reproduce.py` knows, in the order they run. A new experiment (e.g.
# another bench mode) is one more entry here plus its overrides in configs/reproduce.py and,
# for RESULTS.md, a section in moe_jax/reproduction/results_page.py.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("train", "experiments/train.py", "configs/testbed.py", ("model/config.json", "model/model.safetensors"),
          uses_model=False),
    Stage("prune", "experiments/prune.py", "configs/prune.py", ("comparison.md",)),
    Stage("fisher_moe", "experiments/fisher_moe.py", "configs/fisher_moe_repro.py",
          ("report.json", "report.md", "sweep.png", "sensitivity.png")),
    Stage("pathfinder", "experiments/pathfinder.py", "configs/pathfinder.py", ("report.json", "report.md")),
    Stage("trimming", "experiments/trimming.py", "configs/trimming.py", ("report.json", "report.md", "curves.png")),
    Stage("trim_latency", "experiments/trim_latency.py", "configs/trim_latency.py", ("report.json", "report.md"),
          uses_model=False),
    Stage("audit", "experiments/audit.py", "configs/router_audit.py", ("report.json", "report.md")),
    Stage("bench_dispatch", "experiments/bench.py", None, ("bench.md",), uses_model=False, stdout="bench.md"),
)}

# The order in which `jobs` > 1 starts the stages: longest first (their seconds in the quick
# reproduction on the 2-core CPU), so the stage that starts last is a short one instead of the
# audit running alone on one core while the other idles. Results keep the configured order.
PARALLEL_START_ORDER = ("audit", "pathfinder", "fisher_moe", "trimming", "prune", "trim_latency", "bench_dispatch")


class StageError(RuntimeError):
    """A stage's launcher failed or left outputs that do not parse."""


def flag_args(overrides: Mapping[str, Any], prefix: str) -> list[str]:
    """{"eval": {"n_per_domain": 3}, "ratios": (0.5,)} -> ["--config.eval.n_per_domain=3", "--config.ratios=(0.5,)"]
    (prefix "--config."); strings go in as they are, everything else as a Python literal."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            out += flag_args(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value if isinstance(value, str) else repr(value)}")
    return out


def command(stage: Stage, repo: Path, workdir: Path, overrides: Mapping[str, Any], model: Path | None) -> list[str]:
    """The launcher's command line for this stage (run with cwd=repo)."""
    args = [sys.executable, stage.script]
    if stage.config is not None:
        args += [f"--config={stage.config}", f"--workdir={workdir}"]
        if stage.uses_model and model is not None:
            args.append(f"--config.model_path={reporting.repo_relative(model, repo)}")
        args += flag_args(overrides, "--config.")
    else:
        args += flag_args(overrides, "--")
    return args + list(stage.fixed_flags)


def path_free(text: str, workdir: Path, repo: Path) -> str:
    """`text` with `workdir` (the reproduction's) written WORKDIR and the repository's paths
    relative: what the markers and the log record names no machine path."""
    return text.replace(str(workdir), "WORKDIR").replace(f"{repo}/", "")


def file_digest(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_digest(model: Path) -> str:
    """The bytes of a checkpoint directory's config and weights."""
    files = [p for p in model.iterdir() if p.suffix in (".json", ".safetensors")]
    if not any(p.name == "config.json" for p in files):
        raise FileNotFoundError(f"no Hugging Face checkpoint at {str(model)!r} (config.json missing)")
    return file_digest(files)


def config_values(stage: Stage, repo: Path) -> str | None:
    """The values of the stage's config file (`get_config()`, or `get_config(preset)`) as sorted
    JSON: what the launcher starts from before its flag overrides. Docstrings and comments are not
    in it; a changed default that the file imports is."""
    if stage.config is None:
        return None
    path, _, preset = stage.config.partition(":")
    if not (repo / path).is_file():
        raise StageError(f"stage {stage.name!r}: no config file {path!r} in {repo}")
    return config_files.load(repo / path, preset or None).to_json_best_effort(sort_keys=True)


def fingerprint(stage: Stage, repo: Path, overrides: Mapping[str, Any], model_id: str | None) -> str:
    """What decides a stage's results: its launcher and outputs, its config's values, the flag
    overrides and the model's bytes (`model_digest`)."""
    key = json.dumps({"stage": dataclasses.asdict(stage), "config": config_values(stage, repo),
                      "flags": flag_args(overrides, "--"), "model": model_id if stage.uses_model else None},
                     sort_keys=True)
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def check_outputs(stage: Stage, workdir: Path) -> list[str]:
    """What is wrong with the stage's outputs ([] = all present and parseable)."""
    problems = []
    for rel in stage.outputs:
        path = workdir / rel
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{rel}: missing or empty")
            continue
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError as err:
                problems.append(f"{rel}: not JSON ({err})")
        elif path.suffix == ".png" and path.read_bytes()[:8] != PNG_MAGIC:
            problems.append(f"{rel}: not a PNG")
        elif path.suffix == ".md" and "|" not in path.read_text():
            problems.append(f"{rel}: holds no table")
    return problems


def is_done(stage: Stage, workdir: Path, fp: str) -> bool:
    marker = workdir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("fingerprint") == fp and not check_outputs(stage, workdir)


def run_stage(stage: Stage, repo: Path, workdir: Path, overrides: Mapping[str, Any], model: Path | None,
              model_id: str | None, env: Mapping[str, str], log, force: bool = False) -> dict[str, Any]:
    """Run `stage` into `workdir` unless it is done (same fingerprint, valid outputs) and not `force`d.
    Returns its marker record; raises StageError if the launcher fails or its outputs do not parse.
    The launcher's stdout and stderr stream to WORKDIR/stdout.log and stderr.log."""
    fp = fingerprint(stage, repo, overrides, model_id)
    if not force and is_done(stage, workdir, fp):
        log(f"{stage.name}: skipped, outputs valid and fingerprint {fp} matches")
        return {**json.loads((workdir / MARKER).read_text()), "status": "skipped"}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).unlink(missing_ok=True)
    args = command(stage, repo, workdir, overrides, model)
    log(f"{stage.name}: running {' '.join(args[1:])}")
    t0 = time.time()
    stdout_path = workdir / (stage.stdout or "stdout.log")
    partial = stdout_path.with_name(f".{stdout_path.name}.partial") if stage.stdout else stdout_path
    with open(partial, "w") as out, open(workdir / "stderr.log", "w") as err:
        code = subprocess.run(args, stdout=out, stderr=err, cwd=repo, env=dict(env)).returncode
    if code != 0:
        tail = (workdir / "stderr.log").read_text()[-2000:]
        raise StageError(f"stage {stage.name!r}: {stage.script} exited with {code}; the end of "
                         f"{workdir / 'stderr.log'}:\n{tail}")
    if stage.stdout:
        partial.replace(stdout_path)
    problems = check_outputs(stage, workdir)
    if problems:
        raise StageError(f"stage {stage.name!r}: {stage.script} finished but its outputs are bad: {problems}")
    shown = [path_free(a, workdir.parent, repo) for a in args[1:]]
    record = {"stage": stage.name, "fingerprint": fp, "command": shown, "seconds": time.time() - t0,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": list(stage.outputs)}
    atomic_write(workdir / MARKER, json.dumps(record, indent=1))
    log(f"{stage.name}: done in {record['seconds']:.0f} s")
    return {**record, "status": "ran"}


def subprocess_env(repo: Path, cache_dir: Path | None) -> dict[str, str]:
    """The launchers' environment: the repository importable and, unless the caller set one, a
    persistent compilation cache shared by every stage."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    if cache_dir is not None and "JAX_COMPILATION_CACHE_DIR" not in env:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env
