"""experiments/reproduce.py --config.quick=True, run once per module, and every launcher's smoke on its stages.

The quick reproduction runs each experiment launcher at smoke size (configs/reproduce.py), so
these tests are also the launchers' end-to-end smokes: the fixture runs it, then simulates a
kill (the audit stage lost its report with its rows already in progress.json) and runs it again
(prune's reuse of its scores is tested in-process in test_launchers.py). The tests assert on
RESULTS.md, on each stage's outputs, and on what the second run redid and skipped. Two stages
run at a time (CI has two cores; the stages mostly compile, single-threaded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moe_jax import evaluation, footprint, hf, pruning
from moe_jax.reproduction import stages

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "testbed"
STAGES = ("prune", "fisher_moe", "pathfinder", "trimming", "trim_latency", "audit", "bench_dispatch")
KILLED = {"audit": "report.json"}

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no committed model")


def reproduce(workdir: Path, *overrides: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    # The stages inherit the session's fast-compile XLA flags and compilation cache (conftest.py).
    return subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                           f"--config={REPO / 'configs' / 'reproduce.py'}", f"--workdir={workdir}", *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reproduce")
    first = reproduce(workdir, "--config.quick=True", "--config.jobs=2")
    assert first.returncode == 0, first.stderr[-4000:]
    markers = {s: (workdir / s / "STAGE.json").stat().st_mtime_ns for s in STAGES}
    results_md = (workdir / "RESULTS.md").read_text()
    for stage, output in KILLED.items():  # killed after its work was saved, before its report
        (workdir / stage / output).unlink()
    second = reproduce(workdir, "--config.quick=True", "--config.jobs=2")
    assert second.returncode == 0, second.stderr[-4000:]
    return SimpleNamespace(dir=workdir, first=first, second=second, markers=markers, results_md=results_md)


def cells_of(markdown: str) -> list[tuple[str, list[list[str]]]]:
    """(section heading, table rows incl. header) of every markdown table."""
    tables, heading, rows = [], "", None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = []
                tables.append((heading, rows))
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        else:
            rows = None
    return tables


def test_results_md_holds_every_table_filled(run):
    text = (run.dir / "RESULTS.md").read_text()
    tables = cells_of(text)
    headings = {h for h, _ in tables}
    for expected in ("Main job: before / after pruning (experiments/prune.py)",
                     "Methods x domains, 50% of routed-expert dims removed",
                     "Sensitivity: the k highest-ranked dims removed",
                     "Memory at 50% of routed dims (Fisher, compacted)",
                     "Throughput at 50% (compacted, same run)", "Methods x domains, 25% of experts removed",
                     "Methods x domains, 50% of experts removed", "Per-layer retention (experts kept per MoE layer)",
                     "Latency against active experts per token (experiments/trim_latency.py)",
                     "Router safety (experiments/audit.py)"):
        assert expected in headings, expected
    assert any(h.startswith("Dense vs standard vs trimmed MoE") for h in headings)
    assert any(h.startswith("Dispatch benchmark") for h in headings)
    for heading, rows in tables:
        width = len(rows[0])
        for row in rows:
            assert len(row) == width, (heading, row)
            empty = [c for c in row if c in ("", "–", "nan", "None")]
            assert not empty, f"{heading}: empty cells in {row}"
    tradeoff = next(rows for h, rows in tables if h.startswith("Dense vs standard"))
    labels = [r[0] for r in tradeoff[1:]]
    assert labels == ["dense-equivalent (all 32 experts)", "standard top-4", "trimmed global @ 0.65"]
    # The trimmed row is a model the audit attacked (same target and calibration): its ASR comes from
    # the audit; quick mode audits no unpruned row, so the dense and standard rows say so.
    audit = json.loads((run.dir / "audit" / "report.json").read_text())["rows"]
    trimmed = audit["trimmed"]
    assert tradeoff[3][-2:] == [f"{trimmed['attacks']['route_forcing']['asr']:.3f}",
                                f"{trimmed['monitor']['tpr']:.3f} / {trimmed['monitor']['fpr']:.3f}"]
    assert tradeoff[1][-2] == tradeoff[2][-2] == "not audited"
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (run.dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert len(re.findall(r"\]\(([^)]+\.png)\)", text)) == 5  # sweep, sensitivity, kept 25 / 50, curves


def test_results_json_holds_every_number_versions_and_machine(run):
    results = json.loads((run.dir / "results.json").read_text())
    import flax
    import jax

    assert results["versions"]["jax"] == jax.__version__ and results["versions"]["flax"] == flax.__version__
    assert results["machine"]["cpu_count"] == os.cpu_count() and results["machine"]["device_kind"]
    assert results["machine"]["platform"] and results["mode"] == "quick" and not results["failures"]
    assert list(results["stages"]) == list(STAGES)
    # Records hold no machine path: the model relative to the repository, stage dirs under WORKDIR.
    assert results["model"] == "checkpoints/testbed"
    log = (run.dir / "reproduce.log").read_text()
    assert "into WORKDIR" in log and str(REPO) not in log and str(run.dir) not in log
    for stage in STAGES:
        marker = (run.dir / stage / "STAGE.json").read_text()
        assert str(REPO) not in marker and str(run.dir) not in marker, marker
        assert "--workdir" not in marker or f"--workdir=WORKDIR/{stage}" in marker, marker
    for stage in ("fisher_moe", "pathfinder", "trimming", "trim_latency", "audit"):
        assert results[stage] == json.loads((run.dir / stage / "report.json").read_text())
    assert set(results["prune"]["runs"]) == {"baseline", "fisher-expert_0.5", "fisher-global_0.5",
                                             "pathfinder-global_0.25"}
    bench = results["bench_dispatch"]["tables"][0]
    assert bench["header"][0] == "path" and {r[0].split(" ")[0] for r in bench["rows"]} >= {"dense", "blocked"}


def test_second_run_redoes_only_the_killed_stages(run):
    log = run.second.stdout
    for stage in STAGES:
        if stage in KILLED:
            assert f"{stage}: running" in log and f"{stage}: done" in log
            assert (run.dir / stage / KILLED[stage]).is_file()
        else:
            assert f"{stage}: skipped, outputs valid" in log and f"{stage}: running" not in log
            assert (run.dir / stage / "STAGE.json").stat().st_mtime_ns == run.markers[stage]
    # Inside the killed stage, the launcher's own resumption: cached audit rows.
    audit_log = (run.dir / "audit" / "stdout.log").read_text()
    assert "trimmed: cached" in audit_log
    # The resumed reproduction reports the skipped stages' numbers as the first run did.
    again = json.loads((run.dir / "results.json").read_text())
    for stage in ("fisher_moe", "pathfinder", "trimming"):
        assert again[stage] == json.loads((run.dir / stage / "report.json").read_text())
        assert f"## {stage}" not in run.results_md  # no failure notice in either run


def test_prune_stage_exports_fisher_and_pathfinder(run):
    d = run.dir / "prune"
    table = (d / "comparison.md").read_text()
    assert "fisher-expert@0.5" in table and "fisher-global@0.5" in table and "pathfinder-global@0.25" in table
    experts = pruning.PruningPlan.load(d / "plans" / "pathfinder-global@0.25.json")
    assert sum(len(v) for v in experts.experts.values()) == 96  # 4 layers x 32 experts, 25% removed
    plan = pruning.PruningPlan.load(d / "plans" / "fisher-global@0.5.json")
    assert abs(plan.dims_removed_fraction() - 0.5) < 0.01
    cfg, params = hf.load_pretrained(d / "pruned" / "fisher-global@0.5", dtype="float32")
    base_cfg, base_params = evaluation.load_model(MODEL)
    assert footprint.model_size(cfg, params)["routed_experts"] * 2 == pytest.approx(
        footprint.model_size(base_cfg, base_params)["routed_experts"], rel=0.01)
    assert (d / "pruned" / "fisher-global@0.5" / "tokenizer.json").exists()
    # The expert-scope export is stock: one moe_intermediate_size, half the original.
    hf_cfg = json.loads((d / "pruned" / "fisher-expert@0.5" / "config.json").read_text())
    assert hf_cfg["moe_intermediate_size"] * 2 == base_cfg.expert_widths[0][0] and "moe_jax" not in hf_cfg


def test_fisher_moe_stage(run):
    d = run.dir / "fisher_moe"
    report = json.loads((d / "report.json").read_text())
    assert set(report["sweep"]) == {"fisher/global/0.5", "random/global/0.5"}
    assert set(report["sensitivity"]) == {"top1/fisher", "top4/fisher"}
    assert 0.3 < report["memory"]["qwen1.5-moe-a2.7b"]["saved_fraction"] < 0.5
    assert report["scoring_cost"]["ratio"] > 0
    # The default calibration is generic text, which has no answers: no answer-only ablation.
    assert report["answer_only_ablation"] == {} and "Answer-only ablation skipped" in (d / "stdout.log").read_text()
    heavy = next(v for k, v in report["throughput"].items() if k.startswith("expert-heavy"))
    assert set(heavy) == {"unpruned", "expert@0.5", "global@0.5"}
    for png in ("sweep.png", "sensitivity.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Memory at 50%" in (d / "report.md").read_text()
    assert np.isfinite(report["baseline"]["mean_em"])
    runs = json.loads((d / "progress.json").read_text())["runs"]
    assert len([k for k in runs if not k.startswith("quality ")]) == 5  # baseline, 2 sweep + 2 sensitivity


def test_pathfinder_stage(run):
    d = run.dir / "pathfinder"
    report = json.loads((d / "report.json").read_text())
    assert set(report["results"]) == {f"{m}/{r}" for m in ("pathfinder/global", "naee/uniform",
                                                           "pathfinder[k_best,none,s=1]/global")
                                      for r in ("0.25", "0.5")}  # naee/global is refused
    assert "use allocation 'uniform'" in (d / "stdout.log").read_text()
    assert report["results"]["pathfinder/global/0.25"]["routed_bytes_kept"] == 0.75
    assert report["results"]["pathfinder/global/0.5"]["routed_bytes_kept"] == 0.5
    cost = report["recon_cost"]["qwen1.5_layer"]
    assert cost["dense_over_routed"] > 0 and cost["dense_over_routed_alone"] > 0 and cost["forward_s"] > 0
    oracle = report["removal_cost"]  # one finite loss rise per expert of every MoE layer
    assert len(oracle) == 4 and all(len(v) == 32 and all(np.isfinite(v)) for v in oracle.values())
    assert "Single-expert removal" in (d / "report.md").read_text()
    for ratio in (25, 50):
        assert (d / f"kept_experts_{ratio}.png").read_bytes()[:4] == b"\x89PNG"


def test_trimming_stage(run):
    d = run.dir / "trimming"
    report = json.loads((d / "report.json").read_text())
    rows = report["results"]
    assert set(rows) == {"dense-equivalent (all 32 experts)", "standard top-4", "trimmed global @ 0.65"}
    assert rows["standard top-4"]["routed_vs_top_k"] == 1.0
    assert rows["dense-equivalent (all 32 experts)"]["routed_vs_top_k"] == 8.0
    assert abs(rows["trimmed global @ 0.65"]["routed_vs_top_k"] - 0.65) < 0.1
    assert rows["trimmed global @ 0.65"]["decode_latency_ms_per_token"] > 0
    policy = json.loads((d / "policies" / "global_0.65.json").read_text())
    assert policy["calibration"]["target"] == 0.65 and policy["router_fingerprint"]
    for png in ("curves.png", "telemetry/standard/load.png", "telemetry/trimmed_global_0.65/rotation.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    assert "| standard top-4 |" in (d / "report.md").read_text()


def test_trim_latency_stage(run):
    report = json.loads((run.dir / "trim_latency" / "report.json").read_text())
    rows = report["results"]
    assert [r["active_experts"] for r in rows] == [4, 3, 2, 1] and rows[0]["decode_vs_top_k"] == 1.0
    assert all(r["decode_latency_ms_per_token"] > 0 and r["prefill_latency_ms_per_token"] > 0 for r in rows)


def test_audit_stage(run):
    d = run.dir / "audit"
    report = json.loads((d / "report.json").read_text())
    assert list(report["rows"]) == ["trimmed"]  # the pruned rows' selection: test_safety.py, notebook 03
    row = report["rows"]["trimmed"]
    assert 0.0 <= row["refusal_rate"] <= 1.0 and 0.0 <= row["mean_utility"] <= 1.0
    assert row["attacks"]["route_forcing"]["queries"] <= 100
    assert row["monitor"]["calibration_fpr"] <= 0.05 + 1e-9
    assert "| trimmed @ 0.65 |" in (d / "report.md").read_text()
    # quick mode sets eval.data: every row carries held-out perplexity, also in RESULTS.md's table
    assert all(math.isfinite(r["quality"]["ppl (eval.data)"]) and r["quality"]["ppl (eval.data)"] > 1
               for r in report["rows"].values())
    assert "ppl (eval.data)" in (d / "report.md").read_text()


def test_bench_stage_keeps_the_launchers_table(run):
    text = (run.dir / "bench_dispatch" / "bench.md").read_text()
    assert "| path | ms / call | tokens/s | useful GFLOP/s | vs dense matmul |" in text
    assert "mixtral_small: E=8 top-2 D=1024 F=2816 T=64" in text


def test_unknown_stage_names_are_refused_before_anything_runs(tmp_path):
    bad = reproduce(tmp_path, "--config.stages=('prune', 'fishr')")
    assert bad.returncode != 0 and "unknown stages ['fishr']" in bad.stderr
    assert not (tmp_path / "reproduce.log").exists()


def test_fingerprint_follows_config_values_not_text(tmp_path):
    """A docstring or comment edit keeps a finished stage; a changed value, override or model voids it."""
    config = tmp_path / "configs" / "demo.py"
    config.parent.mkdir()
    source = '"""{doc}"""\nimport ml_collections\n\n\ndef get_config(preset="a"):\n' \
             '    return ml_collections.ConfigDict(dict(preset=preset, ratio={ratio}))  # {comment}\n'
    stage = stages.Stage("demo", "experiments/prune.py", "configs/demo.py", ("report.json",))
    def fp(stage=stage, overrides=None, model="m"):
        return stages.fingerprint(stage, tmp_path, overrides or {}, model)

    config.write_text(source.format(doc="First.", ratio=0.5, comment="half"))
    first = fp()
    config.write_text(source.format(doc="Edited after the run.", ratio=0.5, comment="the papers' ratio"))
    assert fp() == first
    assert fp(overrides={"ratio": 0.25}) != first and fp(model="other") != first
    assert fp(stage=dataclasses.replace(stage, config="configs/demo.py:b")) != first  # the preset is a value
    config.write_text(source.format(doc="First.", ratio=0.25, comment="half"))
    assert fp() != first
    with pytest.raises(stages.StageError, match="no config file 'configs/missing.py'"):
        fp(stage=dataclasses.replace(stage, config="configs/missing.py"))
