"""Evaluate a model with EleutherAI's lm-evaluation-harness through `moe_jax.harness.MoeJaxLM`.

    python -m experiments.eval_harness --config=configs/eval_harness.py --workdir=/tmp/arc \\
        --config.model_path=/ckpt/some_hf_moe --config.tasks="('arc_easy','hellaswag')"

(`python -m`, not `python experiments/eval_harness.py` from another directory: the package
`lm_eval` must not be shadowed.) The tasks are resolved and their data loaded before the model,
so an unknown task or a missing dataset fails at once, naming it. Each response is cached in
WORKDIR/requests_<digest>.db, keyed by the weights, plan and policy: a killed run resumes
without recomputing what it answered. Results are written to a temporary name and renamed.
Multi-process (`--coordinator_address --num_processes --process_id --mesh`): process 0 runs
lm-eval, the others run the same device calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

# Offline unless the user says otherwise: datasets and the hub read these when first imported.
for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_name, "1")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax import launch  # noqa: E402
from moe_jax.harness import HarnessError, MoeJaxLM, load_tasks, simple_evaluate, task_manager  # noqa: E402
from moe_jax.pruning import PlanError  # noqa: E402
from moe_jax.reporting import atomic_write  # noqa: E402
from moe_jax.scoring import model_digest  # noqa: E402
from moe_jax.trimming import TrimmingError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/eval_harness.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "results.json, results.md, samples and the request cache go here.")


def request_cache(workdir: Path, lm: MoeJaxLM, config) -> str:
    """A cache path per (weights, plan, policy, max_length): responses never cross models."""
    h = hashlib.blake2b(model_digest(lm.cfg, lm.params).encode(), digest_size=8)
    for path in (config.plan, config.trimming):
        h.update(Path(path).read_bytes() if path else b"-")
    h.update(f"{lm.max_length}/{config.tokenizer}".encode())
    return str(workdir / f"requests_{h.hexdigest()}")


def run(config, workdir: Path, mesh=None) -> dict:
    """Evaluate and write WORKDIR/results.json, results.md and samples_<task>.jsonl; the results
    (process 0; in a multi-process run the other processes follow its device calls and return {})."""
    if not config.model_path or not (Path(config.model_path) / "config.json").is_file():
        raise app.UsageError(f"--config.model_path={config.model_path!r}: no Hugging Face checkpoint there "
                             "(config.json missing)")
    try:
        manager = task_manager(config.include_path or None)
        tasks = load_tasks(config.tasks, manager)
        lm = MoeJaxLM.from_pretrained(
            config.model_path, dtype=config.dtype, tokenizer=config.tokenizer or None, plan=config.plan or None,
            trimming=config.trimming or None, batch_size=config.batch_size, max_length=config.max_length or None,
            max_gen_toks=config.max_gen_toks, impl=config.impl, mesh=mesh)
    except (HarnessError, PlanError, TrimmingError, FileNotFoundError) as err:
        raise app.UsageError(str(err)) from None
    cache = request_cache(workdir, lm, config)  # reads the weights: every process takes part
    if jax.process_index() != 0:  # lm-eval runs on process 0 (world size 1); the others follow its calls
        lm.follow()
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        results = simple_evaluate(lm, tasks.values(), num_fewshot=config.num_fewshot, limit=config.limit,
                                  seed=config.seed, use_cache=cache, manager=manager)
    finally:
        lm.release_followers()
    seconds = time.perf_counter() - start
    samples = results.pop("samples", {})
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=lm_utils.handle_non_serializable) + "\n" for r in rows)
        atomic_write(workdir / f"samples_{task}.jsonl", text)
    results["moe_jax"] = {"model_path": config.model_path, "plan": config.plan, "trimming": config.trimming,
                          "seconds": round(seconds, 1), "max_length": lm.max_length}
    atomic_write(workdir / "results.json", json.dumps(results, indent=2, default=lm_utils.handle_non_serializable))
    header = (f"# lm-eval: {config.model_path}\n\nplan: {config.plan or 'none'}; trimming: "
              f"{config.trimming or 'none'}; {seconds:.0f} s\n\n")
    atomic_write(workdir / "results.md", header + lm_utils.make_table(results) + "\n")
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    mesh = launch.initialize()
    logging.getLogger().setLevel(logging.INFO)
    results = run(FLAGS.config, Path(FLAGS.workdir), mesh)
    if results:
        print(lm_utils.make_table(results))
        print(f"wrote {Path(FLAGS.workdir) / 'results.json'} and results.md")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
