"""lm-eval tasks by name, data loaded up front, so a bad name or a missing dataset fails before a
model is loaded, with the task and its dataset named."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lm_eval import evaluator
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.tasks._yaml_loader import load_yaml

from moe_jax.harness.lm import HarnessError, MoeJaxLM


def task_manager(include_path: str | os.PathLike | None = None) -> TaskManager:
    """lm-eval's index of its own tasks plus the YAMLs under `include_path` (building it reads every
    task YAML lm-eval ships: seconds, so build one and reuse it)."""
    if include_path and not Path(include_path).is_dir():
        raise HarnessError(f"include_path={str(include_path)!r} is not a directory of task YAMLs")
    return TaskManager(include_path=str(include_path) if include_path else None)


def load_tasks(names: Sequence[str], manager: TaskManager) -> dict:
    """{name: lm-eval task object} for `names`, their data loaded."""
    if not names:
        raise HarnessError("no tasks given; name at least one lm-eval task")
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise HarnessError(f"unknown lm-eval task(s) {unknown}: not among the {len(known)} tasks lm-eval knows "
                           "(local task YAMLs: pass their directory as include_path)")
    tasks = {}
    for name in names:
        try:
            tasks.update(get_task_dict([name], manager))
        except Exception as err:  # lm-eval and datasets raise many kinds: name the task and its dataset
            raise HarnessError(f"task {name!r}: cannot load its data{_dataset_of(manager, name)}: "
                               f"{type(err).__name__}: {err}{_offline_hint()}") from None
    return tasks


def _dataset_of(manager: TaskManager, name: str) -> str:
    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return ""
    try:
        source = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    except Exception:  # the YAML itself is broken: the caller's message says how
        return ""
    parts = [str(source[k]) for k in ("dataset_path", "dataset_name") if source.get(k)]
    files = (source.get("dataset_kwargs") or {}).get("data_files")
    return (f" (dataset {' / '.join(parts)}" + (f", files {files}" if files else "") + ")") if parts else ""


def _offline_hint() -> str:
    if os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1":
        return ""
    return ("\nRunning offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): put the dataset in the Hugging Face "
            "datasets cache (HF_DATASETS_CACHE) from a machine with network, or set HF_DATASETS_OFFLINE=0 "
            "HF_HUB_OFFLINE=0 to download it.")


def scores(results: dict) -> dict[str, float]:
    """lm-eval results -> {"task metric": value} (every metric of every task, filter named when not
    "none"; standard errors and bookkeeping fields left out): the columns of a comparison table."""
    out = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out[f"{task} {name}" + ("" if filt == "none" else f" ({filt})")] = float(value)
    return out


def simple_evaluate(lm: MoeJaxLM, tasks: Sequence, *, num_fewshot: int = -1, limit: int = 0, seed: int = 0,
                    use_cache: str | None = None, manager: TaskManager | None = None) -> dict:
    """`lm_eval.simple_evaluate` with per-request samples logged, one seed for every RNG lm-eval
    seeds, no bootstrap; num_fewshot < 0 keeps each task's default and limit 0 means every document.
    Pass the `manager` the tasks came from: without one lm-eval indexes every task YAML again."""
    return evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=None if num_fewshot < 0 else num_fewshot, limit=limit or None,
        use_cache=use_cache, log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, task_manager=manager)
