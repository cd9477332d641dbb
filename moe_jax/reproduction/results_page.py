"""RESULTS.md and results.json of a reproduction, from the stages' own reports.

`collect` gathers every stage's report (report.json, the prune job's per-run results, the
bench tables) with the versions and the machine; `render` lays the tables out like the papers:
Fisher-MoE methods x domains at 50% + sensitivity + memory/throughput; Pathfinder methods x
domains per ratio + per-layer retention; the dense / standard / trimmed trade-off with router
safety; the safety table; the dispatch benchmark. Rows that carry quality columns (`moe_jax.quality`:
held-out perplexity, lm-eval scores) show them; rows without skills scores (a checkpoint with
its own tokenizer) show only those. A stage that failed or was not run gets a line saying so
instead of its section.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moe_jax import timing
from moe_jax.quality import PPL_COLUMN
from moe_jax.reporting import fmt, jsonable

DOMAINS = ("arithmetic", "facts", "code", "language", "safety")
REPORT_STAGES = ("fisher_moe", "pathfinder", "trimming", "trim_latency", "audit")


def parse_tables(text: str) -> list[dict[str, Any]]:
    """Markdown tables in `text`: [{"title": the last heading before it, "header": [...], "rows": [[...]]}]."""
    tables, title, current = [], "", None
    for line in text.splitlines():
        if line.startswith("#"):
            title, current = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = {"title": title, "header": cells, "rows": []}
                tables.append(current)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current["rows"].append(cells)
        else:
            current = None
    return tables


def _prune_results(stage_dir: Path) -> dict[str, Any]:
    comparison = (stage_dir / "comparison.md").read_text()
    runs = {}
    for path in sorted((stage_dir / "eval").glob("*/results.json")):
        runs[path.parent.name] = json.loads(path.read_text())
    return {"comparison": parse_tables(comparison), "runs": runs}


def collect(workdir: Path, config, records: dict, failures: dict, model: str, *, quick: bool,
            seconds: float) -> dict[str, Any]:
    """Everything the reproduction measured, as plain JSON types."""
    out = {"mode": "quick" if quick else "full", "model": model, "seconds": seconds, "versions": timing.versions(),
           "machine": timing.machine(), "stages": {}, "failures": failures}
    for name in config.stages:
        record, stage_dir = records.get(name), workdir / name
        out["stages"][name] = {"status": "failed" if name in failures else record["status"],
                               "seconds": record["seconds"] if record else None,
                               "fingerprint": record["fingerprint"] if record else None, "workdir": name}
        if name in failures:
            continue
        if name in REPORT_STAGES:
            out[name] = json.loads((stage_dir / "report.json").read_text())
        elif name == "prune":
            out[name] = _prune_results(stage_dir)
        elif name.startswith("bench"):
            out[name] = {"tables": parse_tables((stage_dir / "bench.md").read_text())}
    return jsonable(out)


# ============================================================================ rendering
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _em_cells(r: dict) -> list[str]:
    return [fmt(r[d]["em"], 2) for d in DOMAINS] + [fmt(r["mean_em"]), fmt(r.get("refusal"), 2),
                                                      fmt(r.get("over_refusal"), 2)]


EM_HEADER = [*DOMAINS, "mean EM", "refusal", "over-refusal"]


def quality_header(rows) -> list[str]:
    """The quality columns (`moe_jax.quality`: held-out perplexity, lm-eval scores) that any of
    these result rows carries under "quality", in first-seen order; [] when none does."""
    return list(dict.fromkeys(k for r in rows for k in r.get("quality", {})))


def quality_cells(r: dict, header: list[str]) -> list[str]:
    """One row's cells under `quality_header` (perplexity to 2 decimals, scores to 3)."""
    q = r.get("quality", {})
    return [fmt(q.get(k), 2 if k == PPL_COLUMN else 3) for k in header]


def score_columns(rows) -> tuple[list[str], Any]:
    """(header, cells(row)) of result rows: the skills columns when the rows have them (the built-in
    byte tokenizer's exact match), then their quality columns."""
    rows = list(rows)
    skills, quality = any("mean_em" in r for r in rows), quality_header(rows)
    return ([*(EM_HEADER if skills else []), *quality],
            lambda r: [*(_em_cells(r) if skills else []), *quality_cells(r, quality)])


def _split_key(key: str) -> tuple[str, str, float]:
    method, scope, ratio = key.rsplit("/", 2)
    return method, scope, float(ratio)


def render_prune(r: dict) -> list[str]:
    lines = ["## Main job: before / after pruning (experiments/prune.py)", ""]
    for t in r["comparison"]:
        lines += _table(t["header"], t["rows"])
    return lines + ["", "Per-run tables and expert-load heatmaps: `prune/eval/<run>/`; pruned HF checkpoints: "
                        "`prune/pruned/<run>/`."]


def render_fisher(r: dict) -> list[str]:
    base = r["baseline"]
    lines = ["## Fisher-MoE (experiments/fisher_moe.py)", "",
             f"Calibration {r['calibration_seconds']:.1f} s; Fisher step / plain forward + backward per token: "
             f"{r['scoring_cost']['ratio']:.2f}x.", "", "### Methods x domains, 50% of routed-expert dims removed", ""]
    half = [(k, v) for k, v in r["sweep"].items() if _split_key(k)[2] == 0.5]
    header, cells = score_columns([base, *r["sweep"].values()])
    lines += _table(["ranking / scope", *header],
                    [["unpruned", *cells(base)]] + [[f"{m} / {s}", *cells(v)]
                                                    for (m, s, _), v in ((_split_key(k), v) for k, v in half)])
    if "mean_em" in base:
        cols = sorted({(s, ratio) for _, s, ratio in map(_split_key, r["sweep"])}, key=lambda c: (c[0], c[1]))
        methods = list(dict.fromkeys(_split_key(k)[0] for k in r["sweep"]))
        lines += ["", f"### Mean exact match, every scope and ratio (unpruned {fmt(base['mean_em'])})", ""]
        lines += _table(["ranking", *(f"{s} {ratio:.0%}" for s, ratio in cols)],
                        [[m, *(fmt(r["sweep"].get(f"{m}/{s}/{ratio:g}", {}).get("mean_em")) for s, ratio in cols)]
                         for m in methods])
        lines += ["", "![sweep](fisher_moe/sweep.png)"]
    lines += ["", "### Sensitivity: the k highest-ranked dims removed", ""]
    sens = sorted(r["sensitivity"].items(), key=lambda kv: (kv[0].split("/")[1], int(kv[0].split("/")[0][3:])))
    header, cells = score_columns(r["sensitivity"].values())
    lines += _table(["ranking", "k", *header], [[k.split("/")[1], k.split("/")[0][3:], *cells(v)] for k, v in sens])
    if "mean_em" in base:
        lines += ["", "![sensitivity](fisher_moe/sensitivity.png)"]
    if r.get("answer_only_ablation"):
        lines += ["", "### Ablation: Fisher of the answer tokens only (global scope)", ""]
        header, cells = score_columns(r["answer_only_ablation"].values())
        lines += _table(["calibration loss / ratio", *header],
                        [[f"answer-only / {k}", *cells(v)] for k, v in r["answer_only_ablation"].items()] +
                        [[f"full sequence / {k}", *cells(r["sweep"][f"fisher/global/{k}"])]
                         for k in r["answer_only_ablation"] if f"fisher/global/{k}" in r["sweep"]])
    mem, q = r["memory"]["this_model"], r["memory"]["qwen1.5-moe-a2.7b"]
    lines += ["", "### Memory at 50% of routed dims (Fisher, compacted)", ""]
    lines += _table(["model", "params", "MiB", "saved"],
                    [[f"this model, {k}", f"{m['total']:,}", f"{m['bytes'] / 2**20:.2f}",
                      f"{1 - m['bytes'] / mem['unpruned']['bytes']:.1%}"] for k, m in mem.items()] +
                    [["Qwen1.5-MoE-A2.7B (shapes, bf16)", f"{q['params_before']:,} -> {q['params_after']:,}",
                      f"{q['bytes_bf16_before'] / 2**20:,.0f} -> {q['bytes_bf16_after'] / 2**20:,.0f}",
                      f"{q['saved_fraction']:.1%}"]])
    rows = []
    for model_name, runs in r["throughput"].items():
        b = runs["unpruned"]
        for label, s in runs.items():
            pre, dec = s["prefill_tokens_per_s"], s["decode_tokens_per_s"]
            rows.append([model_name, label, fmt(pre, 0), fmt(pre / b["prefill_tokens_per_s"], 2), fmt(dec, 0),
                         fmt(dec / b["decode_tokens_per_s"] if dec and b["decode_tokens_per_s"] else None, 2)])
    lines += ["", "### Throughput at 50% (compacted, same run)", ""]
    return lines + _table(["model", "pruning", "prefill tok/s", "x", "decode tok/s", "x"], rows)


def removal_cost_table(removal_cost: dict[str, list[float]]) -> list[str]:
    """Markdown rows of the pathfinder experiment's single-expert removal oracle (nats per expert)."""
    E = max(len(v) for v in removal_cost.values())
    return _table(["layer", *(f"e{e}" for e in range(E))],
                  [[name, *(f"{v:.2f}" for v in costs)] for name, costs in removal_cost.items()])


def recon_cost_table(recon_cost: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of `experiments.pathfinder.recon_cost` per layer shape, with what they mean."""
    return ["Reconstruction error of one MoE layer (ms): *extra* is what it adds to the calibration forward, "
            "which captures each routed choice's output; *alone* starts from the layer input.", ""] + _table(
        ["layer", "forward", "routed extra", "dense extra", "dense / routed", "routed alone", "dense alone",
         "dense / routed alone", "E / top_k"],
        [[k, f"{c['forward_s'] * 1e3:.1f}", f"{c['routed_extra_s'] * 1e3:.2f}", f"{c['dense_extra_s'] * 1e3:.1f}",
          f"{c['dense_over_routed']:.0f}", f"{c['routed_alone_s'] * 1e3:.1f}", f"{c['dense_alone_s'] * 1e3:.1f}",
          f"{c['dense_over_routed_alone']:.1f}", f"{c['experts_over_top_k']:.0f}"] for k, c in recon_cost.items()])


def render_pathfinder(r: dict) -> list[str]:
    base = r["baseline"]
    results = {_split_key(k): v for k, v in r["results"].items()}
    header, cells = score_columns([base, *results.values()])
    lines = ["## MoE Pathfinder and expert pruning (experiments/pathfinder.py)", ""]
    for ratio in sorted({k[2] for k in results}):
        rows = sorted(((k, v) for k, v in results.items() if k[2] == ratio), key=lambda kv: -kv[1].get("mean_em", 0))
        lines += [f"### Methods x domains, {ratio:.0%} of experts removed", ""]
        lines += _table(["method / allocation", *header, "expert bytes kept"],
                        [["unpruned", *cells(base), "1.00"]] +
                        [[f"{m} / {a}", *cells(v), f"{v['routed_bytes_kept']:.2f}"] for (m, a, _), v in rows])
        lines.append("")
    layers = len(next(iter(results.values()))["experts_per_layer"]) if results else 0
    lines += ["### Per-layer retention (experts kept per MoE layer)", ""]
    lines += _table(["method / allocation / ratio", *(f"layer {i}" for i in range(layers))],
                    [[f"{m} / {a} / {ratio:g}", *v["experts_per_layer"]] for (m, a, ratio), v in results.items()])
    for ratio in sorted({k[2] for k in results}):
        lines += ["", f"![kept experts at {ratio:.0%}](pathfinder/kept_experts_{int(ratio * 100)}.png)"]
    if r.get("removal_cost"):
        lines += ["", "### Single-expert removal: rise of the calibration loss (nats)", ""]
        lines += removal_cost_table(r["removal_cost"])
    lines += ["", "### Calibration and reconstruction cost", ""]
    lines += _table(["statistics", "seconds"], [[k, f"{v:.1f}"] for k, v in r["calibration_seconds"].items()])
    lines += [""] + recon_cost_table(r["recon_cost"])
    return lines


def _audit_match(label: str, trimming_config: dict | None, audit: dict | None) -> dict | None:
    """The audit row of the same model as the trade-off row `label`, if the audit ran one:
    standard top-k is its unpruned row; "trimmed global @ t" its trimmed row when the audit
    calibrated trimming to the same target on the same data."""
    if audit is None:
        return None
    rows = audit["rows"]
    if label.startswith("standard top-"):
        return rows.get("unpruned")
    m = re.fullmatch(r"trimmed global @ ([0-9.]+)", label)
    if m and "trimmed" in rows and trimming_config is not None:
        a, t = audit["config"], trimming_config
        keys = ("data", "n_per_domain", "seq_len", "batch_size", "answer_only")
        same = all(a["trim_calibration"].get(k) == t["calibration"].get(k) for k in keys)
        if same and float(m.group(1)) == float(a["trim_target"]):
            return rows["trimmed"]
    return None


def render_tradeoff(r: dict, audit: dict | None, trimming_config: dict | None) -> list[str]:
    lines = ["## Dense vs standard vs trimmed MoE: the trade-off (experiments/trimming.py + audit.py)", "",
             "Active parameters, memory and latency measured in one run; router safety: refusal / over-refusal "
             "of held-out safety prompts on every row, and the route-forcing attack success rate and routing "
             "monitor from the router audit where it audited the same model (standard = the audit's unpruned "
             "row; trimmed @ t = its trimmed row, same target and calibration data).", ""]
    skills, quality = any("mean_em" in v for v in r["results"].values()), quality_header(r["results"].values())
    rows = []
    for label, v in r["results"].items():
        a = _audit_match(label, trimming_config, audit)
        rows.append([label, f"{v['active_routed_params']:,.0f}", f"{v['routed_vs_top_k']:.2f}",
                     f"{v['active_params_total']:,.0f}", f"{v['weight_bytes'] / 2**20:.2f}",
                     fmt(v["decode_latency_ms_per_token"], 2), fmt(v["decode_tokens_per_s"], 0),
                     *([fmt(v["mean_em"]), fmt(v.get("refusal"), 2), fmt(v.get("over_refusal"), 2)] if skills else []),
                     *quality_cells(v, quality),
                     fmt(a["attacks"]["route_forcing"]["asr"]) if a else "not audited",
                     f"{fmt(a['monitor']['tpr'])} / {fmt(a['monitor']['fpr'])}" if a else "not audited"])
    lines += _table(["run", "routed params/token", "vs top-k", "active params/token", "weights MiB",
                     "decode ms/token", "decode tok/s", *(["mean EM", "refusal", "over-refusal"] if skills else []),
                     *quality, "ASR route forcing", "monitor TPR / FPR"], rows)
    if skills:
        lines += ["", "### Per-domain exact match", ""]
        lines += _table(["run", *EM_HEADER], [[label, *_em_cells(v)] for label, v in r["results"].items()])
    lines += ["", "### Trimming calibration (target = active routed-parameter fraction of top-k)", ""]
    lines += _table(["policy", "tau per layer", "calibration fraction", "held-out fraction", "loss increase"],
                    [[k, ", ".join(f"{t:.3f}" for t in c["taus"].values()), f"{c['calibration_fraction']:.3f}",
                      f"{c['held_out_fraction']:.3f}", f"{c['loss_increase']:+.4f}"]
                     for k, c in r["calibration"].items()])
    lines += ["", "### Accuracy against the active fraction (global tau sweep)", ""]
    header, cells = score_columns(r["sweep"])
    lines += _table(["tau", "active fraction", *header],
                    [[f"{s['tau']:g}", f"{s['active_fraction']:.3f}", *cells(s)] for s in r["sweep"]])
    if skills:
        lines += ["", "![accuracy vs active fraction](trimming/curves.png)"]
    return lines + ["", "Routing telemetry (load heatmaps, rotation): `trimming/telemetry/`."]


def render_trim_latency(r: dict) -> list[str]:
    c = r["config"]
    lines = ["### Latency against active experts per token (experiments/trim_latency.py)", "",
             f"Random {c['dtype']} model, {r['params']:,} parameters ({r['routed_params']:,} in routed experts), "
             f"{c['num_layers']} layers of {c['num_experts']} experts x {c['width']}, top-{c['top_k']}; "
             f"{r['device']} ({r['backend']}).", ""]
    return lines + _table(["batch", "active experts/token", "prefill ms/token", "decode ms/token", "decode tok/s",
                           "decode vs top-k", "prefill vs top-k"],
                          [[x["batch_size"], x["active_experts"], fmt(x["prefill_latency_ms_per_token"], 4),
                            fmt(x["decode_latency_ms_per_token"], 2), fmt(x["decode_tokens_per_s"], 0),
                            fmt(x["decode_vs_top_k"], 2), fmt(x["prefill_vs_top_k"], 2)] for x in r["results"]])


AUDIT_LABELS = {"unpruned": "unpruned", "fisher": "Fisher-MoE {r} (plain)",
                "fisher_safe": "Fisher-MoE {r} (safety-aware)", "pathfinder": "Pathfinder {r} (plain)",
                "pathfinder_safe": "Pathfinder {r} (safety-aware)", "trimmed": "trimmed @ {t}"}


def render_audit(r: dict) -> list[str]:
    c = r["config"]
    lines = ["## Router safety (experiments/audit.py)", "",
             f"Safety-critical units: {r['critical']['dims']} dims and experts {r['critical']['experts']}; "
             f"{c['n_attack']} attacked forbidden prompts, {c['n_safety']} held-out safety prompts, {c['n_utility']} "
             "utility prompts per domain. Critical units removed is 0 / 0 for models that remove nothing.", ""]
    quality = quality_header(r["rows"].values())
    rows = []
    for key, v in r["rows"].items():
        at, transfer = v["attacks"], v["reach"].get("transfer_activations")
        rows.append([AUDIT_LABELS.get(key, key).format(r=f"{c['ratio']:.0%}", t=f"{c['trim_target']:g}"),
                     fmt(v["refusal_rate"]), fmt(v["over_refusal_rate"]), fmt(v["mean_utility"]),
                     f"{fmt(at['route_forcing']['asr'])} ({fmt(at['route_forcing']['asr_compliant'])})",
                     fmt(at["router_masking"]["asr"]), fmt(at["expert_silencing"]["asr"]),
                     f"{v['reach']['activations']}" + ("" if transfer is None else f" ({transfer})"),
                     f"{fmt(v['monitor']['tpr'])} / {fmt(v['monitor']['fpr'])}",
                     f"{v.get('critical_dims_removed', 0)} / {v.get('critical_experts_removed', 0)}",
                     f"{v['routed_mib']:.2f}", *quality_cells(v, quality)])
    return lines + _table(["model", "refusal", "over-refusal", "utility EM", "ASR forcing (strict)", "ASR masking",
                           "ASR silencing", "GCG reach (transfer)", "monitor TPR / FPR",
                           "critical dims / experts removed", "MiB", *quality], rows)


def render_bench(name: str, r: dict) -> list[str]:
    lines = [f"## Dispatch benchmark (experiments/bench.py; stage {name})", ""]
    for t in r["tables"]:  # the launcher leaves cells that do not apply blank (the matmul's tokens/s)
        rows = [[c or "n/a" for c in row] for row in t["rows"]]
        lines += [f"**{t['title']}**", "", *_table(t["header"], rows), ""]
    return lines


def render(results: dict[str, Any]) -> str:
    v, m = results["versions"], results["machine"]
    lines = [f"# Reproduction ({results['mode']})", "",
             f"Model `{results['model']}`; jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
             f"Python {v['python']}; "
             f"{m['platform']}, {m['cpu_count']} CPUs, {m['device_count']} x {m['device_kind']} ({m['backend']}). "
             f"Total {results['seconds']:.0f} s. Every number is in `results.json`.", ""]
    lines += _table(["stage", "status", "seconds", "workdir"],
                    [[name, s["status"], fmt(s["seconds"], 0), f"`{s['workdir']}/`"]
                     for name, s in results["stages"].items()])
    sections = []
    for name in results["stages"]:
        if name in results["failures"]:
            sections.append([f"## {name}", "", f"Stage {name} failed; see `{name}/stderr.log`."])
        elif name == "prune":
            sections.append(render_prune(results[name]))
        elif name == "fisher_moe":
            sections.append(render_fisher(results[name]))
        elif name == "pathfinder":
            sections.append(render_pathfinder(results[name]))
        elif name == "trimming":
            sections.append(render_tradeoff(results[name], results.get("audit"), results[name].get("config")))
        elif name == "trim_latency":
            sections.append(render_trim_latency(results[name]))
        elif name == "audit":
            sections.append(render_audit(results[name]))
        elif name.startswith("bench"):
            sections.append(render_bench(name, results[name]))
    for s in sections:
        lines += ["", *s]
    return "\n".join(lines) + "\n"
