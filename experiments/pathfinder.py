"""MoE Pathfinder against the expert-pruning baselines on the built-in model; markdown + PNG.

    python experiments/pathfinder.py --config=configs/pathfinder.py --workdir=/tmp/pathfinder

1. One calibration pass collects routing and trajectory statistics (per-sequence routing
   mass and activation strength, routed reconstruction error, layer-to-layer transitions, an
   input sample for NAEE), timed; the reference code's `dense` reconstruction error is timed
   separately, on this model and on a Qwen1.5-MoE-shaped layer (random weights).
2. method x allocation x ratio of experts removed: each plan simulated with expert masks
   (exactly the compacted model's logits) -> exact match per domain, refusal rates, answer
   perplexity (built-in byte-tokenizer model), the quality columns of any checkpoint
   (`moe_jax.quality`: perplexity on `config.eval.data`, lm-eval scores of `config.lm_eval.tasks`)
   when configured, routed-expert bytes of the compacted model. A checkpoint with its own
   tokenizer needs one of those two: the skills exact match is skipped there.
   `config.selection_ablations` add Pathfinder (global) rows with the reference code's selection
   (k-best path counts, no visit price, activation strength in the graph) and with this
   project's changes one at a time: rows `pathfinder[counting,layer_scale,s=w_strength]`.
3. A heatmap of experts kept per layer, Pathfinder (global) vs uniform allocation.
4. The oracle the signals approximate: for every expert alone, how much removing it raises the
   answer loss (summed cross-entropy of the answer tokens; of every token for plain-text
   calibration data) of the calibration examples.

Results: WORKDIR/report.md, report.json, kept_experts.png; progress.json makes it resumable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_jax import evaluation, launch, pruning, reporting, scoring, synthetic, timing
from moe_jax.config import ModelConfig
from moe_jax.data import skills
from moe_jax.reporting import fmt
from moe_jax.reproduction import results_page
from moe_jax.scoring import calibration, trajectory

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/pathfinder.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the report, plots and resumable progress go.")
flags.mark_flags_as_required(["config", "workdir"])


def recon_cost(cfg: ModelConfig, params, layer: int, x_TD, repeats: int) -> dict[str, float]:
    """Seconds of one MoE layer's reconstruction errors on x_TD, in the two settings that matter.

    In calibration (`scoring.collect`) the forward pass runs anyway and captures each routed
    choice's output, so what a signal costs is what it adds to that forward: `routed` a few
    norms, `dense` E plain expert passes over every token (`*_extra_s`, ratio
    `dense_over_routed`). From the layer input alone, with no forward to reuse, `routed` runs
    the routed experts once (T * top_k rows through the grouped dispatch) and `dense` runs the
    layer for y plus the E passes (`*_alone_s`, ratio `dense_over_routed_alone`; at best
    1 + E / top_k, less here because a dispatch row costs more than a row of a plain matmul).
    """
    from moe_jax.model import moe

    moe_params = params[cfg.layer_name(layer)]["moe"]
    T, E = x_TD.shape[0], cfg.experts_per_layer[layer]
    valid_T = jnp.ones(T, jnp.float32)

    @jax.jit
    def forward(moe_params, x):  # what calibration runs anyway: routing + experts, per-choice outputs kept
        r = moe.route(cfg, layer, moe_params, x)
        y, stats = moe.experts_forward(cfg, layer, moe_params["experts"], x, r, per_choice=True)
        return r, y, stats["out_TKD"]

    r, y_TD, f_TKD = forward(moe_params, x_TD)
    routed_extra = jax.jit(lambda f, w, idx: trajectory.routed_recon(f, w, idx, valid_T, E)[0])
    dense_extra = jax.jit(lambda params, x, y: trajectory.dense_recon(cfg, params, layer, x, y, valid_T))

    @jax.jit
    def routed_alone(params, x):
        r = moe.route(cfg, layer, params[cfg.layer_name(layer)]["moe"], x)
        f = trajectory.per_choice_outputs(cfg, params, layer, x, r.idx_TK)
        return trajectory.routed_recon(f, r.weights_TK, r.idx_TK, valid_T, E)[0]

    @jax.jit
    def dense_alone(params, x):
        moe_params = params[cfg.layer_name(layer)]["moe"]
        r = moe.route(cfg, layer, moe_params, x)
        y = moe.experts_forward(cfg, layer, moe_params["experts"], x, r)[0]
        return trajectory.dense_recon(cfg, params, layer, x, y, valid_T)

    seconds = lambda fn, *args: timing.median_seconds(fn, *args, repeats=repeats)  # noqa: E731

    out = {
        "forward_s": seconds(forward, moe_params, x_TD),
        "routed_extra_s": seconds(routed_extra, f_TKD, r.weights_TK, r.idx_TK),
        "dense_extra_s": seconds(dense_extra, params, x_TD, y_TD),
        "routed_alone_s": seconds(routed_alone, params, x_TD),
        "dense_alone_s": seconds(dense_alone, params, x_TD),
    }
    out["dense_over_routed"] = out["dense_extra_s"] / out["routed_extra_s"]
    out["dense_over_routed_alone"] = out["dense_alone_s"] / out["routed_alone_s"]
    out["experts_over_top_k"] = E / cfg.num_experts_per_tok
    return out


def qwen15_layer(config):
    """One Qwen1.5-MoE-A2.7B-shaped MoE layer (60 experts x 1408, top-4, hidden 2048; its routed
    experts only), random float32 weights (CPUs have no fast bf16 matmul), and its input."""
    q = config.qwen_layer
    cfg, params = synthetic.random_model(
        dtype=jnp.float32, router_scale=50.0, shared_expert=False, num_layers=1, vocab_size=64,
        hidden_size=q.hidden_size, num_experts=q.num_experts, top_k=q.top_k, expert_width=q.width,
        max_position_embeddings=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (q.tokens, q.hidden_size), jnp.float32)
    return cfg, params, x


def removal_cost(cfg: ModelConfig, params, batches) -> dict[str, list[float]]:
    """{layer name: (E,)} rise of the summed answer NLL of `batches` (`evaluation.perplexity`'s
    answer tokens; every token of plain-text batches, which have no answer) when that expert alone
    is masked out (routing renormalised over the others): E_l forward passes per MoE layer."""

    def answer_nll(layer: int | None = None, expert: int = 0) -> float:
        masks = None if layer is None else {
            cfg.layer_name(layer): {"experts": jnp.ones(cfg.experts_per_layer[layer], jnp.float32).at[expert].set(0.0)}}
        got = evaluation.perplexity(cfg, params, {"calibration": batches}, masks)["calibration"]
        if got["answer"] is None:
            return math.log(got["full"]) * got["tokens"]
        return math.log(got["answer"]) * got["answer_tokens"]

    base = answer_nll()
    return {cfg.layer_name(lyr): [answer_nll(lyr, e) - base for e in range(cfg.experts_per_layer[lyr])]
            for lyr in cfg.moe_layers}


def plot_kept(path: Path, cfg: ModelConfig, plans: dict[str, pruning.PruningPlan]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6 * len(plans) + 1, 0.5 * len(cfg.moe_layers) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(plans), squeeze=False)[0]
    for ax, (label, plan) in zip(axes, plans.items()):
        grid = np.zeros((len(cfg.moe_layers), cfg.max_experts))
        for i, lyr in enumerate(cfg.moe_layers):
            grid[i, list(plan.experts[lyr])] = 1.0
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"{label}\n(kept per layer: {[len(plan.experts[lyr]) for lyr in cfg.moe_layers]})", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(cfg.moe_layers)), [f"layer {lyr}" for lyr in cfg.moe_layers], fontsize=7)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(str(tmp), dpi=110)
    tmp.replace(path)


def main(argv: list[str]) -> None:
    mesh = launch.start(argv)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, cfg, params, tokenizer, measure, skills_on = launch.load_compared(config, REPO, mesh)
    t_start = time.perf_counter()
    c = config.calibration
    batches = scoring.calibration_batches_from_config(c, tokenizer)
    timings = {}
    for stats in (["routing"], ["routing", "trajectory"], ["routing", "trajectory", "recon_dense"]):
        t0 = time.perf_counter()
        scores = scoring.collect(cfg, params, batches, stats, micro_batch_size=c.micro_batch_size, seed=c.seed,
                                 progress=False)
        timings["+".join(stats)] = time.perf_counter() - t0
    scores.save(workdir / "scores.npz")
    cost_here = recon_cost(cfg, params, cfg.moe_layers[0],
                           jnp.asarray(scores["moe_input_sample"][cfg.layer_name(cfg.moe_layers[0])]), config.repeats)
    qcfg, qparams, qx = qwen15_layer(config)
    cost_qwen = recon_cost(qcfg, qparams, 0, qx, 1)
    del qparams
    print(f"calibration seconds {timings}; dense/routed recon on top of the forward: here "
          f"{cost_here['dense_over_routed']:.0f}x, Qwen1.5-shaped layer {cost_qwen['dense_over_routed']:.0f}x; "
          f"from the layer input alone {cost_here['dense_over_routed_alone']:.1f}x and "
          f"{cost_qwen['dense_over_routed_alone']:.1f}x (E/top_k = {cost_qwen['experts_over_top_k']:.0f})")

    oracle, oracle_s = {}, 0.0
    if config.removal_oracle:
        oracle_batches = scoring.calibration_batches_from_config(c, tokenizer, answer_only=True)
        t0 = time.perf_counter()
        oracle = removal_cost(cfg, params, oracle_batches)
        oracle_s = time.perf_counter() - t0

    examples = [ex for d in skills.DOMAINS for ex in skills.eval_set(d, config.n_per_domain, config.seed)]
    study = evaluation.MaskedStudy(cfg, params, tokenizer, examples, config.batch_size, workdir / "progress.json",
                                   {"config": config.to_dict(), "model": reporting.repo_relative(path, REPO)})
    run = measure.study_runner(study, skills_on)

    baseline = run("baseline", None)
    settings = pruning.PathfinderSettings(**config.pathfinder.to_dict())
    results, plans = {}, {}

    def record(method: str, allocation: str, ratio: float, plan: pruning.PruningPlan) -> None:
        got = dict(run(f"{method}/{allocation}/{ratio:g}", pruning.masks(cfg, plan)))
        got["routed_bytes_kept"] = 1.0 - plan.dims_removed_fraction()  # routed bytes scale with the dims
        got["experts_per_layer"] = [len(plan.experts[lyr]) for lyr in cfg.moe_layers]
        got["kept"] = [list(plan.experts[lyr]) for lyr in cfg.moe_layers]
        results[(method, allocation, ratio)] = got

    for method, allocation in config.methods:
        for ratio in config.ratios:
            try:
                plan = pruning.select(cfg, scores, method, allocation, ratio, params=params, pathfinder=settings,
                                      seed=config.seed)
            except pruning.PlanError as err:
                print(f"{method}/{allocation}/{ratio:g}: skipped ({err})")
                continue
            plans[(method, allocation, ratio)] = plan
            record(method, allocation, ratio, plan)
    for counting, layer_scale, w_strength in config.selection_ablations:
        variant = dataclasses.replace(settings, counting=counting, layer_scale=layer_scale, w_strength=w_strength)
        for ratio in config.ratios:
            record(f"pathfinder[{counting},{layer_scale},s={w_strength:g}]", "global", ratio,
                   pruning.select(cfg, scores, "pathfinder", "global", ratio, pathfinder=variant))
    for ratio in config.ratios:
        shown = {f"{m}/{a}": p for (m, a, r), p in plans.items() if r == ratio and m in ("pathfinder", "frequency")}
        if shown:
            plot_kept(workdir / f"kept_experts_{int(ratio * 100)}.png", cfg, shown)
    report = {"model": reporting.repo_relative(path, REPO), "device": jax.devices()[0].device_kind,
              "calibration_seconds": timings,
              "recon_cost": {"this_model_layer": cost_here, "qwen1.5_layer": cost_qwen}, "baseline": baseline,
              "removal_cost": oracle, "removal_cost_seconds": oracle_s,
              "results": {f"{m}/{a}/{r:g}": v for (m, a, r), v in results.items()},
              "seconds": time.perf_counter() - t_start}
    reporting.atomic_write(workdir / "report.json", json.dumps(reporting.jsonable(report), indent=1))
    text = render(config, report, baseline, results)
    reporting.atomic_write(workdir / "report.md", text)
    print(text)


def render(config, report, baseline, results) -> str:
    domains = list(skills.DOMAINS)
    skills_on, columns = "mean_em" in baseline, results_page.quality_header([baseline, *results.values()])
    skill_head = [*domains, "mean EM", "refusal", "over-refusal"] if skills_on else []
    head = "| " + " | ".join(["run", "experts/layer", *skill_head, *columns, "expert bytes"]) + " |"
    sep = "|---|---|" + "---:|" * (len(skill_head) + len(columns) + 1)

    def cells(r) -> list[str]:
        em = [*(fmt(r[d]["em"], 2) for d in domains), fmt(r["mean_em"]), fmt(r.get("refusal"), 2),
              fmt(r.get("over_refusal"), 2)] if skills_on else []
        return [*em, *results_page.quality_cells(r, columns)]

    prompts = (f"{config.n_per_domain} held-out prompts per domain" if skills_on else
               "skills exact match skipped (not the built-in byte tokenizer)")
    lines = [f"# MoE Pathfinder on {Path(report['model']).name}", "",
             f"Device: {report['device']}; {prompts}; calibration {calibration.describe(config.calibration)}. "
             f"Total {report['seconds']:.0f} s.",
             "", "## Experts removed", "", head, sep,
             "| " + " | ".join(["unpruned", "all", *cells(baseline), "1.00"]) + " |"]
    for (m, a, r), v in sorted(results.items(), key=lambda x: (x[0][2], -x[1].get("mean_em", 0))):
        lines.append("| " + " | ".join([f"{m} / {a} / {r:g}", str(v["experts_per_layer"]), *cells(v),
                                        f"{v['routed_bytes_kept']:.2f}"]) + " |")
    if report["removal_cost"]:
        lines += ["", "## Single-expert removal (the oracle)", "",
                  f"Rise of the summed loss (nats; answer tokens of skills examples, every token of text) of "
                  f"the {calibration.describe(config.calibration)} calibration rows when one expert is removed "
                  f"({report['removal_cost_seconds']:.0f} s).", ""]
        lines += results_page.removal_cost_table(report["removal_cost"])
    t = report["calibration_seconds"]
    lines += ["", "## Calibration cost", "", "| statistics | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    lines += [""] + results_page.recon_cost_table(report["recon_cost"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
