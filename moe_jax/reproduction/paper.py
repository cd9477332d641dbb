"""The papers' tables: what configs/papers/*.py hold, and how their tables are filled and written.

A paper config is the main job's config (configs/prune.py) plus a `paper` node: the checkpoint,
the rows (the unpruned model, then one pruning run each: method, scope, ratio), the columns (an
lm-eval task and metric each), the numbers the paper or its sources published for some cells,
and a `smoke` recipe (a tiny random model of the same family and stand-in tasks) so that CI runs
every paper table end to end. experiments/reproduce.py runs the main job on such a config; then
`collect` reads each run's results.json and `render` writes the paper's table with our numbers
beside the published ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from moe_jax import config_files, hf, synthetic
from moe_jax.data import lm_eval_tasks
from moe_jax.hf.config_json import from_hf
from moe_jax.reporting import TEXT_DOMAIN, fmt, run_label

REPO = Path(__file__).resolve().parents[2]
BASELINE = "baseline"
# Columns of the "relative to the unpruned model" table besides "<score column> kept %".
WEIGHTS, SAVED, DECODE, SPEEDUP = "weights GiB", "weights saved %", "decode tok/s", "decode speed-up %"


class PaperConfigError(ValueError):
    """A paper config whose rows, columns or published cells do not fit together."""


def main_job_config(table: ml_collections.ConfigDict, *, calibration_rows: int = 128) -> ml_collections.ConfigDict:
    """A paper config: configs/prune.py's (the main job's) with the `paper` node `table`, the methods
    its rows need, the lm-eval tasks its columns read, bfloat16 weights and wikitext-2 for
    calibration (`calibration_rows` rows of 512 tokens) and held-out perplexity."""
    config = config_files.load(REPO / "configs" / "prune.py")
    config.paper = table
    config.smoke = False  # True: a tiny random model of the family and stand-in tasks instead of model_path
    config.methods = methods(table.rows)
    config.dtype = "bfloat16"
    config.calibration.update(dict(data="hf:wikitext/wikitext-2-raw-v1:train", seq_len=512, batch_size=8,
                                   micro_batch_size=1, max_rows=calibration_rows))
    config.eval.update(dict(data="hf:wikitext/wikitext-2-raw-v1:test", seq_len=1024, data_rows=64, batch_size=4))
    config.lm_eval.update(dict(tasks=tuple(dict.fromkeys(c[1] for c in table.columns)), batch_size=16))
    return config


def run_of(row: Sequence[Any]) -> str:
    """The main job's run label of a row (label, method, scope, ratio); "baseline" for the unpruned model."""
    _, method, scope, ratio = row
    return BASELINE if method == BASELINE else run_label(method, scope, float(ratio))


def runs_of(config_methods: Sequence[Sequence[Any]], default_scope: str) -> set[str]:
    """The run labels the main job makes for `config.methods` ("fisher:global" or "fisher" plus the
    default scope), the baseline included: the rows a finished stage can fill."""
    labels = {BASELINE}
    for name, ratio in config_methods:
        method, _, scope = str(name).partition(":")
        labels.add(run_label(method, scope or default_scope, float(ratio)))
    return labels


def methods(rows: Sequence[Sequence[Any]]) -> tuple[tuple[str, float], ...]:
    """config.methods for the pruned rows: (("fisher:global", 0.5), ...)."""
    return tuple((f"{method}:{scope}", float(ratio)) for _, method, scope, ratio in rows if method != BASELINE)


def node(*, title: str, source: str, checkpoint: str, rows: Sequence[tuple], columns: Sequence[tuple],
         published: Sequence[tuple] = (), smoke: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The `paper` node, checked: rows (label, method | "baseline", scope, ratio), the first the
    baseline; columns (label, lm-eval task, metric as `harness.scores` names it after the task,
    e.g. "exact_match (strict-match)"); published (row label, column label, value) where the
    column is a score column, "<score column> kept %", or one of WEIGHTS, SAVED, DECODE, SPEEDUP;
    smoke: model (a tiny config.json of the family), add_bos, tasks ({task: stand-in task}) and
    rows (the row labels a smoke run fills)."""
    labels = [r[0] for r in rows]
    if not rows or rows[0][1] != BASELINE:
        raise PaperConfigError(f"{title}: the first row must be the unpruned model (method {BASELINE!r})")
    if len(set(labels)) != len(labels):
        raise PaperConfigError(f"{title}: row labels repeat: {labels}")
    names = [c[0] for c in columns]
    known = {*names, *(f"{n} kept %" for n in names), WEIGHTS, SAVED, DECODE, SPEEDUP}
    for row, column, _ in published:
        if row not in labels or column not in known:
            raise PaperConfigError(f"{title}: published cell ({row!r}, {column!r}) is not in the table; "
                                   f"rows {labels}, columns {sorted(known)}")
    missing = sorted({c[1] for c in columns} - set(smoke["tasks"]))
    if missing or not set(smoke["rows"]) <= set(labels):
        raise PaperConfigError(f"{title}: smoke recipe lacks stand-ins for {missing} or names unknown rows "
                               f"{sorted(set(smoke['rows']) - set(labels))}")
    return ml_collections.ConfigDict(dict(
        title=title, source=source, checkpoint=checkpoint, rows=tuple(tuple(r) for r in rows),
        columns=tuple(tuple(c) for c in columns), published=tuple(tuple(p) for p in published),
        smoke=dict(smoke)))


def smoke_overrides(paper, root: Path) -> dict[str, Any]:
    """Write the smoke inputs into `root` (a tiny random checkpoint of the paper's family with a BPE
    tokenizer, the stand-in tasks, a text file) and return the main-job overrides that use them."""
    smoke = paper.smoke
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():  # deterministic: a resumed smoke run finds the same bytes
        tokenizer_dir = root / "tokenizer"
        vocab = lm_eval_tasks.write_tokenizer(tokenizer_dir, add_bos=smoke.add_bos)
        hf_config = dict(smoke.model)
        if hf_config["vocab_size"] < vocab:
            raise PaperConfigError(f"{paper.title}: smoke model vocab_size {hf_config['vocab_size']} < the "
                                   f"stand-in tokenizer's {vocab}")
        cfg = from_hf(hf_config, source=f"{paper.title} smoke model")
        params = synthetic.scaled_params(cfg, seed=0)
        hf.save_pretrained(cfg, params, model_dir, overwrite=True,
                           extra_files=sorted(tokenizer_dir.glob("tokenizer*.json")))
    tasks_dir = lm_eval_tasks.write(root / "tasks")
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in lm_eval_tasks.TEXT * 4))
    smoke_rows = [r for r in paper.rows if r[0] in smoke.rows]
    stand_ins = tuple(sorted({smoke.tasks[c[1]] for c in paper.columns}))
    return {
        "model_path": str(model_dir), "dtype": "float32", "methods": methods(smoke_rows),
        "calibration": {"data": f"json:{text}", "seq_len": 32, "batch_size": 4, "micro_batch_size": 4,
                        "max_rows": 8},
        "eval": {"data": f"json:{text}", "seq_len": 32, "data_rows": 8, "batch_size": 4, "throughput_batch": 1,
                 "prompt_len": 8, "decode_tokens": 32, "repeats": 3},
        "lm_eval": {"tasks": stand_ins, "include_path": str(tasks_dir), "limit": 4, "batch_size": 4,
                    "max_gen_toks": 16},
    }


def _score_key(paper, column: Sequence[str], smoke: bool) -> str:
    _, task, metric = column
    return f"{paper.smoke.tasks[task] if smoke else task} {metric}"


def _ratio(value: float | None, base: float | None, scale: float = 100.0, offset: float = 0.0) -> float | None:
    if value is None or base is None or base == 0 or not math.isfinite(value):
        return None
    return scale * value / base + offset


def collect(stage_dir: Path, paper, *, smoke: bool, runs: set[str]) -> dict[str, Any]:
    """The paper's table from the main job's WORKDIR/eval/<run>/results.json for the `runs` its last
    run made (rows outside them: ran False, so an earlier run's leftovers never fill a cell)."""
    rows = []
    for row in paper.rows:
        path = stage_dir / "eval" / run_of(row).replace("@", "_") / "results.json"
        entry: dict[str, Any] = {"label": row[0], "run": run_of(row), "ran": run_of(row) in runs and path.is_file()}
        if entry["ran"]:
            results = json.loads(path.read_text())
            lm_eval = results.get("lm_eval", {})
            entry["scores"] = {c[0]: lm_eval.get(_score_key(paper, c, smoke)) for c in paper.columns}
            entry["ppl"] = results.get("perplexity", {}).get(TEXT_DOMAIN, {}).get("full")
            size = results["model"]  # the checkpoint's weights: real widths, no bucket padding
            entry[WEIGHTS] = size["total"] * size["bytes"] / size["stored"] / 2**30
            entry[DECODE] = (results.get("throughput") or {}).get("decode_tokens_per_s")
            entry["device"] = (results.get("throughput") or {}).get("device")
        rows.append(entry)
    base = rows[0] if rows[0]["ran"] else None
    for entry in rows:
        if base is None or not entry["ran"]:
            continue
        entry["relative"] = {f"{c[0]} kept %": _ratio(entry["scores"][c[0]], base["scores"][c[0]])
                             for c in paper.columns}
        entry["relative"][SAVED] = _ratio(entry[WEIGHTS], base[WEIGHTS], -100.0, 100.0)
        entry["relative"][SPEEDUP] = _ratio(entry[DECODE], base[DECODE], 100.0, -100.0)
    return {"title": paper.title, "source": paper.source, "checkpoint": paper.checkpoint, "smoke": smoke,
            "columns": [c[0] for c in paper.columns], "rows": rows,
            "published": [{"row": r, "column": c, "value": v} for r, c, v in paper.published]}


def _cell(value: Any, published: Any = None, digits: int | None = 3) -> str:
    """`digits` decimals, or (None) three significant digits: GiB and tokens/s span tiny to huge models."""
    ours = fmt(value, digits) if digits is not None or value is None else f"{value:.3g}"
    return ours if published is None else f"{ours} (paper {published})"


def render(table: Mapping[str, Any]) -> str:
    """Markdown: the scores table and the relative-to-unpruned table, published numbers beside ours."""
    pub = {(p["row"], p["column"]): p["value"] for p in table["published"]}
    columns = table["columns"]
    lines = [f"# {table['title']}", "", f"Checkpoint: {table['checkpoint']}. Source of the published numbers: "
             f"{table['source']}", ""]
    if table["smoke"]:
        lines += ["**Smoke run**: a tiny random model of the family and stand-in tasks. The numbers mean "
                  "nothing; the table has the paper's shape.", ""]
    with_ppl = any(r.get("ppl") is not None for r in table["rows"])
    header = ["", *columns] + (["ppl (eval.data)"] if with_ppl else [])
    lines += ["## Scores", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["rows"]:
        if not r["ran"]:
            cells = ["not run"] * (len(header) - 1)
        else:
            cells = [_cell(r["scores"][c], pub.get((r["label"], c))) for c in columns]
            cells += [fmt(r["ppl"], 2)] if with_ppl else []
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    relative = [f"{c} kept %" for c in columns] + [SAVED, SPEEDUP]
    header = ["", WEIGHTS, DECODE, *relative]
    lines += ["", "## Relative to the unpruned model", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    for r in table["rows"]:
        if not r["ran"]:
            cells = ["not run"] * (len(header) - 1)
        else:
            cells = [_cell(r[WEIGHTS], pub.get((r["label"], WEIGHTS)), None),
                     _cell(r[DECODE], pub.get((r["label"], DECODE)), None)]
            cells += [_cell((r.get("relative") or {}).get(k), pub.get((r["label"], k)), 1) for k in relative]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    devices = sorted({r["device"] for r in table["rows"] if r.get("device")})
    if devices:
        lines += ["", f"Decode tokens/s measured on: {', '.join(devices)}."]
    return "\n".join(lines) + "\n"
