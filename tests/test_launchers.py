"""The absl launchers end to end on the committed built-in model, at smoke size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax import evaluation, hf, pruning, reporting

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "skills_tiny"


def _launch(script: str, config: str, workdir: Path, *overrides: str, timeout: int = 600):
    # The smokes check plumbing on tiny shapes, and compiling is most of their time: LLVM at -O0
    # compiles about twice as fast (the programs run slower, which tiny shapes do not notice).
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=xla_flags)
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), f"--config={REPO / 'configs' / config}",
                           f"--workdir={workdir}", *overrides], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


# The smokes share what they compile through the session's persistent compilation cache (conftest.py):
# on the committed model every smoke evaluates the same 3 held-out prompts per domain, so the unpruned
# generate and perplexity programs compile once per session; dim and expert plans give masks of one
# structure, so fisher_moe and pathfinder share the masked ones; prune.py's second run repeats the
# first one's settings and compiles nothing.
PRUNE_EVAL = ("--config.eval.n_per_domain=3", "--config.eval.throughput=False", "--config.calibration.n_per_domain=4")


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no committed model")
def test_prune_launcher_runs_fisher_and_exports(tmp_path):
    result = _launch("prune.py", "fisher_moe.py", tmp_path, "--config.methods=(('fisher:expert', 0.5), "
                     "('fisher:global', 0.5), ('pathfinder:global', 0.25))", *PRUNE_EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    assert "fisher-expert@0.5" in table and "fisher-global@0.5" in table and "pathfinder-global@0.25" in table
    experts = pruning.PruningPlan.load(tmp_path / "plans" / "pathfinder-global@0.25.json")
    assert sum(len(v) for v in experts.experts.values()) == 24  # 32 experts, 25% removed
    plan = pruning.PruningPlan.load(tmp_path / "plans" / "fisher-global@0.5.json")
    assert abs(plan.dims_removed_fraction() - 0.5) < 0.01
    cfg, params = hf.load_pretrained(tmp_path / "pruned" / "fisher-global@0.5", dtype="float32")
    base_cfg, base_params = evaluation.load_model(MODEL)
    assert evaluation.model_size(cfg, params)["routed_experts"] * 2 == pytest.approx(
        evaluation.model_size(base_cfg, base_params)["routed_experts"], rel=0.01)
    assert (tmp_path / "pruned" / "fisher-global@0.5" / "tokenizer.json").exists()
    # The expert-scope export is stock: one moe_intermediate_size, half the original.
    hf_cfg = json.loads((tmp_path / "pruned" / "fisher-expert@0.5" / "config.json").read_text())
    assert hf_cfg["moe_intermediate_size"] * 2 == base_cfg.expert_widths[0][0] and "moe_jax" not in hf_cfg
    # A second run in the same workdir reuses the calibration scores (same model and settings).
    again = _launch("prune.py", "fisher_moe.py", tmp_path, "--config.methods=(('pathfinder:global', 0.25),)",
                    *PRUNE_EVAL, "--config.export=False")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Using the scores in" in again.stdout


def test_prune_launcher_rejects_unknown_methods(tmp_path):
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fishr', 0.5),)")
    assert result.returncode != 0 and "'fishr' is not available" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fisher:model', 0.5),)")
    assert result.returncode != 0 and "scope 'model'" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('pathfinder:layer', 0.5),)")
    assert result.returncode != 0 and "scope 'layer'" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fisher', 1.5),)")
    assert result.returncode != 0 and "must lie in (0, 1)" in result.stderr
    assert not list(tmp_path.iterdir())


HEAVY = ("--config.heavy.hidden_size=32", "--config.heavy.width=16", "--config.heavy.num_experts=4",
         "--config.heavy.vocab_size=64", "--config.heavy.num_heads=2", "--config.heavy.num_layers=1")


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no committed model")
def test_fisher_moe_reproduction_smoke(tmp_path):
    result = _launch("fisher_moe.py", "fisher_moe_repro.py", tmp_path, "--config.n_per_domain=3",
                     "--config.calibration.n_per_domain=3", "--config.methods=('fisher', 'random')",
                     "--config.scopes=('global',)", "--config.ratios=(0.5,)",
                     "--config.sensitivity_rankings=('fisher',)", "--config.sensitivity_ks=(1, 4)",
                     "--config.repeats=1", "--config.throughput_batch=2", "--config.prompt_len=8",
                     "--config.throughput_this_model=False", *HEAVY)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["sweep"]) == {"fisher/global/0.5", "random/global/0.5"}
    assert set(report["sensitivity"]) == {"top1/fisher", "top4/fisher"}
    assert 0.3 < report["memory"]["qwen1.5-moe-a2.7b"]["saved_fraction"] < 0.5
    assert report["scoring_cost"]["ratio"] > 0
    assert set(report["answer_only_ablation"]) == {"0.5"}
    heavy = next(v for k, v in report["throughput"].items() if k.startswith("expert-heavy"))
    assert set(heavy) == {"unpruned", "expert@0.5", "global@0.5"}
    for png in ("sweep.png", "sensitivity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Memory at 50%" in (tmp_path / "report.md").read_text()
    assert np.isfinite(report["baseline"]["mean_em"])
    assert len(json.loads((tmp_path / "progress.json").read_text())["runs"]) == 6  # baseline, 2 + 2, 1 ablation


def test_resumable_runs_keep_finished_work_and_drop_foreign_work(tmp_path):
    runs = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 1})
    runs.put("a", {"mean_em": 0.5})
    again = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 1})
    assert again.get("a") == {"mean_em": 0.5} and again.get("b") is None
    other = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 2})  # other settings: start over
    assert other.get("a") is None
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporaries left


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no committed model")
def test_pathfinder_study_smoke(tmp_path):
    result = _launch("pathfinder.py", "pathfinder.py", tmp_path, "--config.n_per_domain=3",
                     "--config.calibration.n_per_domain=3", "--config.methods=(('pathfinder', 'global'), "
                     "('naee', 'uniform'), ('naee', 'global'))", "--config.ratios=(0.25,)", "--config.repeats=1",
                     "--config.qwen_layer.hidden_size=32", "--config.qwen_layer.num_experts=6",
                     "--config.qwen_layer.width=16", "--config.qwen_layer.tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]) == {"pathfinder/global/0.25", "naee/uniform/0.25"}  # naee/global is refused
    assert "use allocation 'uniform'" in result.stdout
    assert report["results"]["pathfinder/global/0.25"]["routed_bytes_kept"] == 0.75
    assert report["recon_cost"]["qwen1.5_layer"]["dense_over_routed"] > 0
    assert (tmp_path / "kept_experts_25.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no committed model")
def test_trimming_study_smoke(tmp_path):
    # Calibration batches of 3 rows, the held-out batches' shape: calibration and the held-out
    # measurement share one compiled step.
    result = _launch("trimming.py", "trimming.py", tmp_path, "--config.n_per_domain=3",
                     "--config.calibration.n_per_domain=3", "--config.calibration.batch_size=3",
                     "--config.targets=(0.7,)", "--config.modes=('global',)",
                     "--config.sweep_taus=(0.5,)", "--config.latency.repeats=1", "--config.latency.rounds=1",
                     "--config.latency.new_tokens=16", "--config.latency.prompt_len=16", "--config.telemetry_batches=3",
                     "--config.comparison_rows=False")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["results"]
    assert set(rows) == {"standard top-2", "trimmed global @ 0.7"}
    assert rows["standard top-2"]["routed_vs_top_k"] == 1.0
    assert abs(rows["trimmed global @ 0.7"]["routed_vs_top_k"] - 0.7) < 0.1
    assert rows["trimmed global @ 0.7"]["decode_latency_ms_per_token"] > 0
    policy = json.loads((tmp_path / "policies" / "global_0.7.json").read_text())
    assert policy["calibration"]["target"] == 0.7 and policy["router_fingerprint"]
    for png in ("curves.png", "telemetry/standard/load.png", "telemetry/trimmed_global_0.7/rotation.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| standard top-2 |" in (tmp_path / "report.md").read_text()
