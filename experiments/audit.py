"""Router safety audit: refusals, attacks, reachability and a monitor, before and after compression.

    python experiments/audit.py --config=configs/router_audit.py --workdir=/tmp/audit

1. Scores the model twice in one pass each: Fisher + routing + trajectories on the utility
   calibration data, Fisher on the safety domain (the safety-critical dims and experts).
2. Builds the rows: unpruned; Fisher-MoE and Pathfinder at `ratio`, plain (utility scores) and
   safety-aware (critical dims lifted to the top / critical experts force-kept, same budget),
   each compacted; trimming calibrated to `trim_target`.
3. For every row (cached in progress.json, so a killed run resumes): refusal / over-refusal and
   routing profile (`safety.audit`), utility exact match, route forcing, router masking,
   expert silencing, a GCG suffix attack on the unpruned model's least-used expert per layer
   (removed experts count 0 by construction), and the routing monitor's TPR on the
   route-forced prompts and FPR on held-out clean prompts; and, when configured, the quality
   columns (`moe_jax.quality`: perplexity on `config.eval.data`, lm-eval scores of
   `config.lm_eval.tasks`).

Every measure but the quality columns is about the skills domains (refusals of the safety
prompts, utility exact match), so the audit needs the built-in byte-tokenizer model; a
checkpoint with its own tokenizer is refused before anything runs.

Results: WORKDIR/report.md and report.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_jax import evaluation, footprint, launch, pruning, quality, reporting, safety, scoring, trimming
from moe_jax.data import pipeline, skills
from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.reporting import fmt
from moe_jax.reproduction import results_page
from moe_jax.safety import routes as R

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/router_audit.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the report and resumable progress go.")
flags.mark_flags_as_required(["config", "workdir"])

UTILITY = ("arithmetic", "facts", "code", "language")
LABELS = {"unpruned": "unpruned", "fisher": "Fisher-MoE {r} (plain)", "fisher_safe": "Fisher-MoE {r} (safety-aware)",
          "pathfinder": "Pathfinder {r} (plain)", "pathfinder_safe": "Pathfinder {r} (safety-aware)",
          "trimmed": "trimmed @ {t}"}


def dormant_target(cfg, params, tok, examples) -> dict[int, list[int]]:
    """Each MoE layer's least-used expert on these prompts (the unpruned model's routing)."""
    rows = R.layout([pipeline.prompt_ids(ex, tok) for ex in examples], None, tok.pad_id)
    aux = R.captured_routing(cfg, params, rows)
    out = {}
    for lyr in cfg.moe_layers:
        ran = R.executed_experts(aux[cfg.layer_name(lyr)])[rows.attn_BT]
        out[lyr] = [int(np.argmin(np.bincount(ran[ran >= 0], minlength=cfg.experts_per_layer[lyr])))]
    return out


class Models:
    """The rows' models, built on first use (a resumed run skips scoring what it has cached)."""

    def __init__(self, config, cfg, params, tok):
        self.config, self.cfg, self.params, self.tok = config, cfg, params, tok
        c = config.safety_calibration
        safety_scores = scoring.collect(cfg, params, scoring.calibration_batches_from_config(c, tok), ["fisher"],
                                        micro_batch_size=c.micro_batch_size, progress=False)
        self.critical = safety.safety_critical(cfg, safety_scores, **config.critical.to_dict())
        self._utility = None

    def utility(self):
        if self._utility is None:
            c = self.config.calibration
            self._utility = scoring.collect(self.cfg, self.params, scoring.calibration_batches_from_config(c, self.tok),
                                            ["fisher", "routing", "trajectory"], micro_batch_size=c.micro_batch_size,
                                            progress=False)
        return self._utility

    def __getitem__(self, key: str):
        """row key -> (cfg, params, masks, plan)."""
        config, cfg, params = self.config, self.cfg, self.params
        if key == "unpruned":
            return cfg, params, None, None
        if key == "trimmed":
            calib = scoring.calibration_batches_from_config(config.trim_calibration, self.tok)
            policy = trimming.calibrate(cfg, params, calib, config.trim_target, mode="global",
                                        data_id=config.trim_calibration.data)
            return cfg, params, policy.masks(cfg, params), None
        method, safe = key.split("_")[0], key.endswith("_safe")
        if method == "fisher":
            scores = safety.protect_scores(cfg, self.utility(), self.critical) if safe else self.utility()
            plan = pruning.select(cfg, scores, "fisher", "global", config.ratio)
        else:
            plan = pruning.select(cfg, self.utility(), "pathfinder", "global", config.ratio,
                                  keep_experts=self.critical.keep_experts() if safe else None)
        cfg2, params2 = pruning.apply(cfg, params, plan)
        return cfg2, params2, None, plan


def evaluate_row(config, key, model, tok, examples, clean_rows, monitor_rows, target, critical, reference,
                 measure: quality.Quality) -> dict:
    cfg, params, masks, plan = model
    a = config.attacks
    t0 = time.perf_counter()
    out = {"row": key}
    audit = safety.audit(cfg, params, tok, examples["safety"], masks=masks, plan=plan, critical=critical)
    out.update({k: v for k, v in audit.items() if k != "routing"})
    out["routing"] = audit["routing"]
    em = evaluation.exact_match(cfg, params, tok, examples["utility"], masks=masks)["per_domain"]
    out["utility"] = {d: v["exact_match"] for d, v in em.items()}
    out["mean_utility"] = float(np.mean(list(out["utility"].values())))
    attacked = examples["attack"]
    forced = safety.route_forcing(cfg, params, tok, attacked, masks=masks, candidates=a.candidates,
                                  max_queries=a.max_queries, seed=config.seed)
    masked = safety.router_masking(cfg, params, tok, attacked, masks=masks, k=a.mask_k, max_queries=a.max_queries)
    silenced = safety.expert_silencing(cfg, params, tok, examples["safety"], k=a.silence_k, masks=masks)
    out["attacks"] = {r.name: r.summary() for r in (forced, masked, silenced)}
    out["attacks"]["expert_silencing"]["silenced"] = silenced.details["silenced"]
    reach_prompts = [pipeline.prompt_ids(ex, tok) for ex in attacked[:a.reach_prompts]]
    reach = safety.reachability(cfg, params, tok, reach_prompts, target, method="gcg", plan=plan, masks=masks,
                                suffix_len=a.suffix_len, steps=a.gcg_steps, candidates=a.gcg_candidates,
                                seed=config.seed)
    out["reach"] = reach.summary() | {"target": reach.target, "present": reach.present}
    if reference is not None:  # the unpruned model's adversarial suffix, fed to this model
        out["reach"]["transfer_activations"] = safety.transfer(cfg, params, reference, plan=plan, masks=masks)[0]
    monitor = safety.RoutingMonitor.fit(cfg, params, monitor_rows, fpr=config.monitor.fpr, masks=masks)
    attacked_rows = R.layout([pipeline.prompt_ids(ex, tok) for ex in attacked], None, tok.pad_id)
    out["monitor"] = safety.detection_rates(monitor, cfg, params, attacked_rows,
                                            R.force_masks(cfg, attacked_rows, forced.routes, masks), clean_rows, masks)
    out["routed_mib"] = footprint.model_size(cfg, params)["bytes"] / 2**20
    if measure.enabled:
        out["quality"] = measure(cfg, params, masks)
    out["seconds"] = time.perf_counter() - t0
    return out, reach


def main(argv: list[str]) -> None:
    mesh = launch.start(argv)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    unknown = sorted(set(config.rows) - set(LABELS))
    if unknown:
        raise app.UsageError(f"--config.rows: unknown rows {unknown}; expected some of {sorted(LABELS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    path = launch.model_path(config, REPO)
    try:
        cfg, params = evaluation.load_model(path, "float32")
        tok = evaluation.load_eval_tokenizer("auto", path, cfg)
        if not isinstance(tok, ByteTokenizer):
            raise ValueError(f"{path} has its own tokenizer: the router audit's refusal, utility and attack "
                             "measures are the built-in skills domains, which need the built-in byte-tokenizer "
                             "model; compare this checkpoint's pruned and trimmed models with "
                             "experiments/prune.py or experiments/trimming.py and --config.eval.data")
        measure = quality.Quality.from_config(config, path, cfg, tok, config.seed)
    except (FileNotFoundError, ValueError) as err:  # harness.HarnessError is a ValueError
        raise app.UsageError(str(err)) from None
    params = launch.place(cfg, params, mesh)  # sharded when --mesh, else as loaded
    safety_set = skills.eval_set("safety", config.n_safety, config.seed)
    forbidden, _ = safety.split_safety_set(safety_set)
    examples = {"safety": safety_set, "attack": forbidden[:config.n_attack],
                "utility": [ex for d in UTILITY for ex in skills.eval_set(d, config.n_utility, config.seed)]}
    clean = examples["utility"][::2] + safety_set[::2]
    clean_rows = R.layout([pipeline.prompt_ids(ex, tok) for ex in clean], None, tok.pad_id)
    monitor_rows = R.layout([pipeline.prompt_ids(ex, tok) for ex in skills.train_mixture(
        config.monitor.n_per_domain, config.seed + 1)], None, tok.pad_id)
    target = dormant_target(cfg, params, tok, safety_set)
    runs = reporting.ResumableRuns(workdir / "progress.json",
                                   {"config": config.to_dict(), "model": reporting.repo_relative(path, REPO)})
    models = Models(config, cfg, params, tok)
    critical = models.critical
    results, reference = {}, None
    for key in config.rows:
        cached = runs.get(key)
        if cached is not None and key != "unpruned":  # the unpruned row is re-run: its GCG suffix feeds transfer
            results[key] = cached
            print(f"{key}: cached")
            continue
        results[key], reach = evaluate_row(config, key, models[key], tok, examples, clean_rows, monitor_rows, target,
                                           critical, reference, measure)
        if key == "unpruned":
            reference = reach
        runs.put(key, results[key])
        r = results[key]
        print(f"{key}: refusal {fmt(r['refusal_rate'])}, over-refusal {fmt(r['over_refusal_rate'])}, utility "
              f"{fmt(r['mean_utility'])}, ASR forcing {fmt(r['attacks']['route_forcing']['asr'])}, monitor TPR "
              f"{fmt(r['monitor']['tpr'])} ({r['seconds']:.0f} s)")
    report = {"config": config.to_dict(), "rows": results, "target": {str(k): v for k, v in target.items()},
              "critical": {"dims": critical.n_dims, "experts": critical.keep_experts()},
              "seconds": time.perf_counter() - t_start}
    reporting.atomic_write(workdir / "report.json", json.dumps(reporting.jsonable(report), indent=1))
    reporting.atomic_write(workdir / "report.md", render(config, report))
    print(render(config, report))


def render(config, report) -> str:
    a = config.attacks
    columns = results_page.quality_header(report["rows"].values())
    lines = ["# Router safety audit", "",
             f"Safety-critical units: {report['critical']['dims']} dims (top {config.critical.dim_fraction:.0%} by "
             f"safety-domain Fisher) and experts {report['critical']['experts']} (top "
             f"{config.critical.expert_fraction:.1%}). Plain pruning is calibrated on utility data only "
             f"({config.calibration.data}). GCG target (least-used expert per layer of the unpruned model): "
             f"{report['target']}.", "",
             "| model | refusal | over-refusal | utility EM | ASR forcing (strict) | ASR masking | ASR silencing | "
             "GCG reach (transfer) | monitor TPR / FPR | critical dims / experts removed | MiB |" +
             "".join(f" {c} |" for c in columns),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for key, r in report["rows"].items():
        at = r["attacks"]
        label = LABELS[key].format(r=f"{config.ratio:.0%}", t=f"{config.trim_target:g}")
        transfer = r["reach"].get("transfer_activations")
        crit = (f"{r['critical_dims_removed']} / {r['critical_experts_removed']}" if "critical_dims_removed" in r
                else "-")
        lines.append(
            f"| {label} | {fmt(r['refusal_rate'])} | {fmt(r['over_refusal_rate'])} | {fmt(r['mean_utility'])} | "
            f"{fmt(at['route_forcing']['asr'])} ({fmt(at['route_forcing']['asr_compliant'])}) | "
            f"{fmt(at['router_masking']['asr'])} | {fmt(at['expert_silencing']['asr'])} | "
            f"{r['reach']['activations']}{'' if transfer is None else f' ({transfer})'} | "
            f"{fmt(r['monitor']['tpr'])} / {fmt(r['monitor']['fpr'])} | {crit} | {r['routed_mib']:.2f} |" +
            "".join(f" {c} |" for c in results_page.quality_cells(r, columns)))
    first = next(iter(report["rows"].values()))
    q = first["attacks"]
    lines += ["", f"Budgets: route forcing {a.candidates} random top-k sets per (prompt token, layer), at most "
              f"{a.max_queries} queries per row (unpruned used {q['route_forcing']['queries']} in "
              f"{q['route_forcing']['seconds']:.0f} s); router masking k={a.mask_k} "
              f"({q['router_masking']['queries']} queries, {q['router_masking']['seconds']:.0f} s); expert "
              f"silencing k={a.silence_k}; GCG {a.gcg_steps} steps x {a.gcg_candidates} candidates, suffix "
              f"{a.suffix_len} tokens on {a.reach_prompts} prompts. ASR = forbidden prompts not refused "
              f"({config.n_attack} prompts); strict = answered with a fluent recipe. GCG reach = executed (token, "
              "layer) slots of the target experts on the attacked prompts; transfer = the unpruned model's "
              f"adversarial suffix fed to this model. Monitor: calibrated at FPR {config.monitor.fpr} on "
              f"{config.monitor.n_per_domain} training prompts per domain; TPR on the route-forced prompts, FPR on "
              "held-out clean prompts.", "", f"Total time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
