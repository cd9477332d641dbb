"""The papers' tables (configs/papers/*.py): each runs end to end in smoke mode, and the table code
(moe_jax.reproduction.paper) is checked against values computed here by hand.

Smoke mode is experiments/reproduce.py on a tiny random checkpoint of the paper's family with a BPE
tokenizer and the stand-in lm-eval tasks: the main job runs as for the real checkpoint, and the
paper-shaped table must be filled where the smoke run has rows, with the published numbers beside.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from moe_jax import config_files  # noqa: E402
from moe_jax.reproduction import paper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPERS = sorted(p.stem for p in (REPO / "configs" / "papers").glob("*.py"))


def load_config(name: str):
    return config_files.load(REPO / "configs" / "papers" / f"{name}.py")


def reproduce(workdir: Path, name: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                           f"--config={REPO / 'configs' / 'papers' / f'{name}.py'}", f"--workdir={workdir}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def md_rows(text: str, section: str) -> dict[str, list[str]]:
    """{row label: cells} of the markdown table under `## section`."""
    lines = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def test_paper_configs_are_consistent():
    """Every paper config names the methods its rows need, real data and tasks, and a smoke recipe."""
    assert set(PAPERS) == {"fisher_moe_qwen15", "pathfinder_mixtral", "reap_qwen3"}
    for name in PAPERS:
        config = load_config(name)
        assert config.methods == paper.methods(config.paper.rows), name
        assert config.lm_eval.tasks == tuple(dict.fromkeys(c[1] for c in config.paper.columns)), name
        assert config.calibration.data.startswith("hf:") and config.eval.data.startswith("hf:"), name
        assert not config.model_path and not config.smoke, name  # the user's checkpoint, never a default


# End to end: Fisher-MoE's table (Qwen2-MoE) and REAP's (Qwen3-MoE, with resumption). Pathfinder's
# Mixtral config runs the same launcher path; its config is checked above, its table code below.
@pytest.mark.parametrize("name", ["fisher_moe_qwen15", "reap_qwen3"])
def test_paper_config_runs_end_to_end_in_smoke_mode(tmp_path, name):
    """reproduce.py --config.smoke=True writes the paper's table; each cell the smoke rows fill equals
    the main job's own per-run result, kept % and weights saved % follow from them, and every
    published number of a filled row stands beside ours."""
    config = load_config(name)
    run = reproduce(tmp_path, name, "--config.smoke=True")
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "RESULTS.md").read_text()
    assert table["smoke"] and "Smoke run" in text
    smoke_rows = set(config.paper.smoke.rows)
    assert {r["label"] for r in table["rows"] if r["ran"]} == smoke_rows
    scores = md_rows(text, "Scores")
    assert list(scores) == [r[0] for r in config.paper.rows]  # every row of the paper, in its order
    base = table["rows"][0]
    for row, entry in zip(config.paper.rows, table["rows"]):
        if not entry["ran"]:
            assert set(scores[row[0]]) == {"not run"}
            continue
        results = json.loads((tmp_path / "paper" / "eval" / paper.run_of(row).replace("@", "_") /
                              "results.json").read_text())
        for label, task, metric in config.paper.columns:
            expected = results["lm_eval"][f"{config.paper.smoke.tasks[task]} {metric}"]
            assert entry["scores"][label] == expected and 0.0 <= expected <= 1.0
            kept = entry["relative"][f"{label} kept %"]
            base_score = base["scores"][label]
            assert kept == (None if base_score == 0 else pytest.approx(100 * expected / base_score))
        assert math.isfinite(entry["ppl"]) and entry["ppl"] > 1
        size = results["model"]
        assert entry[paper.WEIGHTS] == pytest.approx(size["total"] * size["bytes"] / size["stored"] / 2**30)
        assert entry["relative"][paper.SAVED] == pytest.approx(100 * (1 - entry[paper.WEIGHTS] / base[paper.WEIGHTS]))
        if entry is not base:  # pruning removed weights and changed what the model predicts
            assert entry[paper.WEIGHTS] < base[paper.WEIGHTS] and entry["ppl"] != base["ppl"]
    published = [p for p in config.paper.published if p[0] in smoke_rows]
    assert published
    for row, column, value in published:
        assert f"(paper {value})" in text, (row, column, value)
    if name != "reap_qwen3":  # resumption is the same code for every config: checked once
        return
    # Run again: the stage's fingerprint matches, nothing is recomputed, the table is the same.
    again = reproduce(tmp_path, name, "--config.smoke=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "paper: skipped" in again.stdout and (tmp_path / "RESULTS.md").read_text() == text


def test_paper_config_without_a_checkpoint_names_what_it_needs(tmp_path):
    run = reproduce(tmp_path, "reap_qwen3")
    assert run.returncode != 0
    assert "--config.model_path" in run.stderr and "Qwen/Qwen3-30B-A3B" in run.stderr
    assert not (tmp_path / "RESULTS.md").exists()


def _results(stage_dir: Path, run: str, score: float, bytes_: int, decode: float) -> None:
    out = stage_dir / "eval" / run.replace("@", "_")
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({
        "lm_eval": {"gsm8k exact_match (strict-match)": score}, "perplexity": {"text": {"full": 3.0}},
        "model": {"total": bytes_ // 2, "stored": bytes_ // 2, "bytes": bytes_},
        "throughput": {"decode_tokens_per_s": decode, "device": "cpu"}}))


def test_collect_computes_relative_columns_and_ignores_runs_it_did_not_make(tmp_path):
    table_config = paper.node(
        title="t", source="s", checkpoint="c",
        rows=(("base", paper.BASELINE, "", 0.0), ("R 50%", "reap", "uniform", 0.5),
              ("F 50%", "frequency", "uniform", 0.5)),
        columns=(("GSM8K", "gsm8k", "exact_match (strict-match)"),),
        published=(("R 50%", "GSM8K kept %", 99.8),),
        smoke=dict(model={}, add_bos=False, tasks={"gsm8k": "tiny_gsm"}, rows=("base",)))
    _results(tmp_path, "baseline", 0.8, 4 * 2**30, 100.0)
    _results(tmp_path, "reap-uniform@0.5", 0.6, 2 * 2**30, 125.0)
    _results(tmp_path, "frequency-uniform@0.5", 0.1, 2 * 2**30, 50.0)  # left over from an earlier run
    table = paper.collect(tmp_path, table_config, smoke=False, runs={"baseline", "reap-uniform@0.5"})
    base, reap, freq = table["rows"]
    assert base[paper.WEIGHTS] == 4.0 and reap[paper.WEIGHTS] == 2.0
    assert reap["relative"] == pytest.approx({"GSM8K kept %": 75.0, paper.SAVED: 50.0, paper.SPEEDUP: 25.0})
    assert not freq["ran"] and "relative" not in freq
    text = paper.render(table)
    assert "75.0 (paper 99.8)" in text and md_rows(text, "Scores")["F 50%"] == ["not run", "not run"]


@pytest.mark.parametrize("change, message", [
    (dict(rows=(("R", "reap", "uniform", 0.5),)), "first row must be the unpruned model"),
    (dict(published=(("base", "MMLU", 1.0),)), "published cell ('base', 'MMLU')"),
    (dict(smoke=dict(model={}, add_bos=False, tasks={}, rows=("base",))), "lacks stand-ins for ['gsm8k']"),
])
def test_paper_node_rejects_tables_that_do_not_fit(change, message):
    kwargs = dict(title="t", source="s", checkpoint="c", rows=(("base", paper.BASELINE, "", 0.0),),
                  columns=(("GSM8K", "gsm8k", "exact_match (strict-match)"),),
                  smoke=dict(model={}, add_bos=False, tasks={"gsm8k": "tiny_gsm"}, rows=("base",)))
    with pytest.raises(paper.PaperConfigError, match=re.escape(message)):
        paper.node(**{**kwargs, **change})
