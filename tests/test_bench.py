"""experiments/bench.py --mode=e2e at smoke size: the report's rows, sizes and files; refused settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax.bench import e2e as bench_e2e

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num_layers=1", "--hidden_size=32", "--num_heads=4", "--num_experts=8", "--expert_width=16",
        "--shared_width=32", "--vocab_size=64", "--batch_size=2", "--prompt_len=4", "--new_tokens=2", "--repeats=1",
        "--calib_sequences=2", "--calib_len=8", "--micro_batch_size=2", "--traj_sequences=2", "--trim_bisect_steps=2",
        "--trim_target=0.6", "--variants=fisher_global,trimmed"]


@pytest.mark.slow  # ~60 s of CPU on the 2-core box: ten small programs compile (generate per variant twice)
def test_e2e_smoke_writes_a_report_of_smaller_pruned_and_trimmed_models(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "experiments.bench", "--mode=e2e", f"--workdir={tmp_path}", *TINY],
                            capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["variant"].split(" ")[0]: r for r in report["variants"]}
    assert list(rows) == ["unpruned", "Fisher-MoE", "trimmed"]
    base, fisher, trimmed = rows["unpruned"], rows["Fisher-MoE"], rows["trimmed"]
    assert report["config"]["num_layers"] == 1 and report["config"]["hidden_size"] == 32
    # Fisher-MoE 50% (global) halves the routed dims: fewer bytes and half the routed active parameters.
    assert fisher["weight_bytes"] < base["weight_bytes"] and fisher["active_fraction"] == pytest.approx(0.5)
    assert trimmed["weight_bytes"] == base["weight_bytes"] and trimmed["active_fraction"] <= 0.6 + 1e-9
    for r in rows.values():
        assert r["prefill_tokens_per_s"] > 0 and (r["program_bytes"] is None or r["program_bytes"] > 0)
    assert set(report["fisher_scoring_seconds"]) == {"collect"} and report["calibration_tokens"] == 16
    assert report["moe_layer"]["seconds"]["blocked"] > 0 and report["moe_layer"]["seconds"]["matmul"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "python -m experiments.bench --mode=e2e" in md and "Fisher-MoE 50% (global)" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporaries left


def test_e2e_settings_refuse_unknown_variants_and_scorers():
    with pytest.raises(ValueError, match=r"variants: unknown \['prune'\]"):
        bench_e2e.E2ESettings(variants=("prune",)).check()
    with pytest.raises(ValueError, match="scorer='all'"):
        bench_e2e.E2ESettings(scorer="all").check()
    with pytest.raises(ValueError, match="new_tokens=1 must be >= 2"):
        bench_e2e.E2ESettings(new_tokens=1).check()
