"""The comparing launchers' quality columns (`moe_jax.quality`): held-out perplexity and lm-eval scores.

fisher_moe, pathfinder and trimming run on a tiny random Hugging Face checkpoint with its own BPE
tokenizer, where the skills exact match does not apply: every row of their tables gets the quality
columns instead, kept in progress.json for a resumed run, and with `eval.data` blanked (the configs
default to the built-in generic text) and no `lm_eval.tasks` they refuse to start. The router audit
needs the built-in model (its measures are the skills domains): it refuses the checkpoint, and its
rows on the built-in model carry the columns.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax.data import lm_eval_tasks
from moe_jax.quality import PPL_COLUMN
from tests.conftest import random_hf_checkpoint, write_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = REPO / "checkpoints" / "skills_tiny"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Experts route tokens to the top two experts.",
             "What is two plus three? Five.", "A router picks the experts for each token."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint with its own tokenizer, calibration and held-out text, lm-eval tasks."""
    root = tmp_path_factory.mktemp("quality")
    random_hf_checkpoint(root / "model", vocab_size=128)  # the tokenizer has 120 ids
    write_bpe_tokenizer(root / "model", add_bos=False)
    for name, seed in (("calib", 0), ("held_out", 1)):
        lines = np.random.default_rng(seed).permutation(SENTENCES * 6)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": str(t)}) + "\n" for t in lines))
    lm_eval_tasks.write(root / "tasks")
    return root


def launch(script: str, config: str, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), f"--config={REPO / 'configs' / config}",
                           f"--workdir={workdir}", *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def on_checkpoint(data: Path, *extra: str) -> list[str]:
    return [f"--config.model_path={data / 'model'}", f"--config.calibration.data=json:{data / 'calib.jsonl'}",
            "--config.calibration.n_per_domain=4", "--config.calibration.seq_len=16", *extra]


def held_out(data: Path) -> list[str]:
    return [f"--config.eval.data=json:{data / 'held_out.jsonl'}", "--config.eval.seq_len=32",
            "--config.eval.data_rows=4"]


def assert_measured(rows: dict, columns: set[str]) -> None:
    """Every row has every quality column, finite, and no skills scores."""
    for label, row in rows.items():
        assert set(row["quality"]) == columns, label
        assert all(math.isfinite(v) for v in row["quality"].values()), (label, row["quality"])
        assert "mean_em" not in row, label


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `## heading` (header, separator, rows)."""
    lines = markdown.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i, line in enumerate(lines[start:], start) if not line.startswith("|")), len(lines))
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]


def test_fisher_moe_on_a_hf_checkpoint_reports_perplexity_and_lm_eval_for_every_plan(data, tmp_path):
    run = launch("fisher_moe.py", "fisher_moe_repro.py", tmp_path, *on_checkpoint(
        data, "--config.methods=('fisher',)", "--config.scopes=('global',)", "--config.ratios=(0.5,)",
        "--config.sensitivity_rankings=('fisher',)", "--config.sensitivity_ks=(4,)",
        "--config.throughput_this_model=False", "--config.heavy.enabled=False", "--config.answer_only_ablation=False",
        *held_out(data), "--config.lm_eval.tasks=('tiny_mc',)", f"--config.lm_eval.include_path={data / 'tasks'}",
        "--config.lm_eval.max_length=32", "--config.lm_eval.limit=4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Skills exact match skipped" in run.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {"baseline": report["baseline"], **report["sweep"], **report["sensitivity"]}
    assert list(rows) == ["baseline", "fisher/global/0.5", "top4/fisher"]
    assert_measured(rows, {PPL_COLUMN, "tiny_mc acc", "tiny_mc acc_norm"})
    assert rows["fisher/global/0.5"]["quality"][PPL_COLUMN] != rows["baseline"]["quality"][PPL_COLUMN]
    table = table_rows((tmp_path / "report.md").read_text(), "Method x scope x ratio (routed-expert dims removed)")
    assert table[0] == ["run", PPL_COLUMN, "tiny_mc acc", "tiny_mc acc_norm"]
    assert not any(c in ("", "–") for row in table for c in row), table  # no column of dashes
    assert not (tmp_path / "sweep.png").exists()  # its curves are exact match


def test_pathfinder_on_a_hf_checkpoint_needs_a_quality_column_and_keeps_it_for_resuming(data, tmp_path):
    args = on_checkpoint(data, "--config.methods=(('pathfinder', 'global'),)", "--config.ratios=(0.25,)",
                         "--config.selection_ablations=()", "--config.repeats=1", "--config.removal_oracle=False",
                         "--config.qwen_layer.hidden_size=32", "--config.qwen_layer.num_experts=6",
                         "--config.qwen_layer.width=16", "--config.qwen_layer.tokens=8")
    blind = launch("pathfinder.py", "pathfinder.py", tmp_path, *args, "--config.eval.data=")  # no held-out text
    assert blind.returncode != 0 and "--config.eval.data" in blind.stderr, blind.stderr[-3000:]
    assert not (tmp_path / "scores.npz").exists()  # refused before calibrating
    run = launch("pathfinder.py", "pathfinder.py", tmp_path, *args, *held_out(data))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {"baseline": report["baseline"], **report["results"]}
    assert list(rows) == ["baseline", "pathfinder/global/0.25"]
    assert_measured(rows, {PPL_COLUMN})
    assert rows["pathfinder/global/0.25"]["quality"][PPL_COLUMN] != rows["baseline"]["quality"][PPL_COLUMN]
    # Each row's columns are in progress.json, where a resumed run finds them instead of measuring again.
    progress = json.loads((tmp_path / "progress.json").read_text())["runs"]
    assert {key: progress[f"quality {key}"] for key in rows} == {key: row["quality"] for key, row in rows.items()}
    table = table_rows((tmp_path / "report.md").read_text(), "Experts removed")
    assert table[0] == ["run", "experts/layer", PPL_COLUMN, "expert bytes"]


def test_trimming_on_a_hf_checkpoint_measures_every_row_and_the_sweep(data, tmp_path):
    run = launch("trimming.py", "trimming.py", tmp_path, *on_checkpoint(
        data, "--config.calibration.batch_size=4", "--config.targets=(0.65,)", "--config.modes=('global',)",
        "--config.pruned_rows=False", "--config.sweep_taus=(0.5,)", "--config.telemetry_batches=2",
        "--config.n_per_domain=2", "--config.latency.batch_size=2", "--config.latency.prompt_len=8",
        "--config.latency.new_tokens=8", "--config.latency.repeats=1", "--config.latency.rounds=1",
        *held_out(data)))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["results"]
    assert list(rows) == ["dense-equivalent (all 8 experts)", "standard top-2", "trimmed global @ 0.65"]
    assert_measured({**rows, "sweep": report["sweep"][0]}, {PPL_COLUMN})
    assert rows["trimmed global @ 0.65"]["quality"][PPL_COLUMN] != rows["standard top-2"]["quality"][PPL_COLUMN]
    table = table_rows((tmp_path / "report.md").read_text(), "Trade-off")
    assert table[0][-1] == PPL_COLUMN and "mean EM" not in table[0]


@pytest.mark.skipif(not (BUILT_IN / "config.json").exists(), reason="no committed model")
def test_audit_refuses_a_hf_checkpoint_before_anything_runs(data, tmp_path):
    """The audit's measures are the skills domains; its rows' quality columns on the built-in model
    are checked in the quick reproduction (test_reproduce.py), which sets eval.data."""
    refused = launch("audit.py", "router_audit.py", tmp_path / "hf", f"--config.model_path={data / 'model'}",
                     *held_out(data))
    assert refused.returncode != 0 and "needs the built-in byte-tokenizer model" in refused.stderr
    assert not (tmp_path / "hf" / "report.json").exists()
