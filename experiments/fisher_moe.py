"""Reproduce Fisher-MoE's findings on the built-in model (or any checkpoint); markdown + PNG.

    python experiments/fisher_moe.py --config=configs/fisher_moe_repro.py --workdir=/tmp/fisher_repro

1. One calibration pass collects every dim statistic (Fisher, mean |grad|, activation,
   router-weighted activation, magnitude, random); its cost per token is timed against a
   plain forward + backward of the training loss on the same rows, in the same run.
2. Sweep: method x scope x ratio, each plan simulated with masks on the unpruned model
   (exactly the compacted model's logits; one compilation for all plans) -> exact match per
   domain, refusal rates, answer perplexity (built-in byte-tokenizer model), and the quality
   columns of any checkpoint (`moe_jax.quality`: perplexity on `config.eval.data`, lm-eval
   scores of `config.lm_eval.tasks`) when configured. A checkpoint with its own tokenizer needs
   one of those two: the skills exact match is skipped there.
3. Sensitivity: remove the k highest-ranked dims (Fisher, activation, random) for k = 1, 2, 4...
4. Memory: parameter bytes before/after 50% for this model (compacted) and for the
   Qwen1.5-MoE-A2.7B config (`jax.eval_shape`, no weights).
5. Throughput: prefill and decode tokens/s, unpruned vs 50% (expert and global scopes),
   compacted, measured one after the other in this run, on this model (unless
   `config.throughput_this_model` is False) and on a random-weight model whose routed experts
   dominate its FLOPs (`config.heavy`; the global plan there keeps the per-expert fractions that
   Fisher-global chose on this model).
6. Ablation: Fisher of the answer tokens only, against the full-sequence default (with
   skills calibration only: generic text has no answers).

Results: WORKDIR/report.md, report.json, sweep.png, sensitivity.png. Evaluations done are kept
in WORKDIR/progress.json, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_jax import evaluation, footprint, launch, pruning, reporting, scoring, synthetic, timing
from moe_jax.config import ModelConfig
from moe_jax.data import skills
from moe_jax.model import transformer
from moe_jax.reporting import fmt
from moe_jax.reproduction import results_page
from moe_jax.scoring import calibration
from moe_jax.scoring.collect import calibration_rows, micro_batches, score_step

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/fisher_moe_repro.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the report, plots and resumable progress go.")
flags.mark_flags_as_required(["config", "workdir"])

# ============================================================================ pieces
def top_k_removed_masks(cfg: ModelConfig, ranking: dict[str, np.ndarray], k: int):
    """Masks that remove the k highest-ranked dims of the whole model (NaN = no such dim); every
    expert kept, in the structure of `pruning.masks`, so the sweep's compiled evaluation serves these too."""
    flat = [(cfg.layer_name(lyr), e, j, ranking[cfg.layer_name(lyr)][e, j]) for lyr in cfg.moe_layers
            for e, w in enumerate(cfg.expert_widths[lyr]) for j in range(w)]
    order = np.argsort(-np.array([v for *_, v in flat]), kind="stable")[:k]
    masks = {cfg.layer_name(lyr): np.ones((cfg.experts_per_layer[lyr], cfg.max_width(lyr)), np.float32)
             for lyr in cfg.moe_layers}
    for i in order:
        name, e, j, _ = flat[i]
        masks[name][e, j] = 0.0
    return {name: {"dims": jnp.asarray(m), "experts": jnp.ones(m.shape[0], jnp.float32)} for name, m in masks.items()}


def scoring_cost(cfg, params, batch, micro_batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Seconds per token of the Fisher step vs a plain forward + backward (params gradient)."""
    import optax

    chunk = next(iter(micro_batches(calibration_rows(batch), micro_batch_size)))
    tokens = float((chunk["segment_ids"] > 0).sum())

    @jax.jit
    def plain(params, rows):
        def loss(p):
            logits = transformer.forward(cfg, p, rows["inputs"], segment_ids=rows["segment_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
            return (ce * rows["weights"]).sum() / jnp.maximum(rows["weights"].sum(), 1.0)
        return jax.grad(loss)(params)

    # The same static arguments as `scoring.collect` passes (defaults too): the step it compiled is reused.
    fisher = lambda: score_step(cfg, params, chunk, want_grad=True, want_acts=True, impl="auto",  # noqa: E731
                                 want_traj=False, want_dense=False)
    base = lambda: plain(params, chunk)  # noqa: E731
    seconds = timing.round_robin_seconds({"fisher": (fisher, ()), "plain": (base, ())}, repeats)  # drift hits both
    f, p = seconds["fisher"], seconds["plain"]
    return {"fisher_s_per_token": f / tokens, "plain_s_per_token": p / tokens, "ratio": f / p, "tokens": tokens}


def heavy_model(config, fractions: dict[int, list[float]]):
    """A random expert-dominated model, unpruned and at 50% (expert scope, and `fractions` per
    expert as a global plan would leave them); for throughput only."""
    h = config.heavy
    cfg, params = synthetic.random_model(
        dtype=jnp.float32, router_scale=1.0, shared_expert=False, vocab_size=h.vocab_size,
        hidden_size=h.hidden_size, num_layers=h.num_layers, num_heads=h.num_heads, num_experts=h.num_experts,
        top_k=h.top_k, expert_width=h.width, max_position_embeddings=512)
    per_layer = list(fractions.values())
    expert_plan = {lyr: tuple(range(h.num_experts)) for lyr in cfg.moe_layers}
    widths = {lyr: tuple(cfg.expert_widths[lyr]) for lyr in cfg.moe_layers}
    halves = {lyr: {e: tuple(range(h.width // 2)) for e in range(h.num_experts)} for lyr in cfg.moe_layers}
    uniform = pruning.PruningPlan("first-half", "expert", 0.5, widths, expert_plan, halves)
    dims = {}
    for i, lyr in enumerate(cfg.moe_layers):
        f = per_layer[i % len(per_layer)]
        dims[lyr] = {e: tuple(range(max(1, round(f[e % len(f)] * h.width)))) for e in range(h.num_experts)}
    ragged = pruning.PruningPlan("fisher-pattern", "global", 0.5, uniform.source_widths, expert_plan, dims)
    return cfg, params, {"expert@0.5": uniform, "global@0.5": ragged}


def throughputs(cfg, params, plans, config, sizes: dict | None = None) -> dict[str, Any]:
    """Tokens/s unpruned and compacted by each plan; `sizes` (a dict) also gets each compacted
    model's `model_size`, so that the memory table needs no second compaction."""
    run = lambda c, p: footprint.throughput(c, p, batch_size=config.throughput_batch,  # noqa: E731
                                             prompt_len=config.prompt_len, repeats=config.repeats,
                                             new_tokens=config.new_tokens)
    out = {"unpruned": run(cfg, params)}
    for label, plan in plans.items():
        c2, p2 = pruning.apply(cfg, params, plan)
        if sizes is not None:
            sizes[label] = footprint.model_size(c2, p2)
        out[label] = run(c2, p2)
        del p2  # one compacted model alive at a time
    return out


def memory_table(cfg: ModelConfig, params, sizes: dict[str, dict]) -> dict[str, Any]:
    """Bytes before/after for this model (`sizes`: model_size of each compacted model), and
    Qwen1.5-MoE-A2.7B at 50% by shapes."""
    out = {"this_model": {"unpruned": footprint.model_size(cfg, params), **sizes}}
    q = synthetic.qwen15_moe_config()
    half = q
    for layer in q.moe_layers:
        half = half.with_layer_experts(layer, [w - round(0.5 * w) for w in q.expert_widths[layer]])
    count = lambda c: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(transformer.param_shapes(c)))
    before, after = count(q), count(half)
    out["qwen1.5-moe-a2.7b"] = {"params_before": before, "params_after": after, "bytes_bf16_before": 2 * before,
                                "bytes_bf16_after": 2 * after, "saved_fraction": 1 - after / before}
    return out


# ============================================================================ main
def main(argv: list[str]) -> None:
    mesh = launch.start(argv)
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for r in config.ratios:
            pruning.check_ratio(r)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    path, cfg, params, tokenizer, measure, skills_on = launch.load_compared(config, REPO, mesh)
    t_start = time.perf_counter()

    c = config.calibration
    batches = scoring.calibration_batches_from_config(c, tokenizer)
    t0 = time.perf_counter()
    scores = scoring.collect(cfg, params, batches, scoring.DIM_STATISTICS, micro_batch_size=c.micro_batch_size,
                             seed=c.seed, checkpoint_path=workdir / "scores_state.npz", total=len(batches),
                             data_id=json.dumps(c.to_dict(), sort_keys=True))
    calib_s = time.perf_counter() - t0
    scores.save(workdir / "scores.npz")
    cost = scoring_cost(cfg, params, batches[0], c.micro_batch_size)
    print(f"calibration: {scores.num_sequences} sequences, {scores.num_tokens} tokens, {calib_s:.1f} s; "
          f"Fisher step / plain fwd+bwd per token = {cost['ratio']:.2f}")

    examples = [ex for d in skills.DOMAINS for ex in skills.eval_set(d, config.n_per_domain, config.seed)]
    study = evaluation.MaskedStudy(cfg, params, tokenizer, examples, config.batch_size, workdir / "progress.json",
                                   {"config": config.to_dict(), "model": reporting.repo_relative(path, REPO)})
    run = measure.study_runner(study, skills_on)

    baseline = run("baseline", None)
    sweep, plans = {}, {}
    for method in config.methods:
        for scope in config.scopes:
            for ratio in config.ratios:
                plan = pruning.select(cfg, scores, method, scope, ratio)
                plans[(method, scope, ratio)] = plan
                sweep[(method, scope, ratio)] = run(f"{method}/{scope}/{ratio:g}", pruning.masks(cfg, plan))
    sensitivity = {}
    for ranking in config.sensitivity_rankings:
        for k in config.sensitivity_ks:
            sensitivity[(ranking, k)] = run(f"top{k}/{ranking}", top_k_removed_masks(cfg, scores[ranking], k))

    half = {f"{scope}@0.5": pruning.select(cfg, scores, "fisher", scope, 0.5) for scope in ("expert", "global")}
    sizes, speed = {}, {}
    if config.throughput_this_model:
        speed["this model"] = throughputs(cfg, params, half, config, sizes)
    else:
        sizes = {label: footprint.model_size(*pruning.apply(cfg, params, plan)) for label, plan in half.items()}
    memory = memory_table(cfg, params, sizes)
    if config.heavy.enabled:
        plan = half["global@0.5"]
        fractions = {lyr: [len(plan.dims[lyr][e]) / w for e, w in enumerate(plan.source_widths[lyr])]
                     for lyr in plan.experts}
        hcfg, hparams, hplans = heavy_model(config, fractions)
        speed[f"expert-heavy model ({footprint.model_size(hcfg, hparams)['total']:,} params)"] = throughputs(
            hcfg, hparams, hplans, config)
        del hparams
    ablation = {}
    answer_batches = []
    if config.answer_only_ablation:
        answer_batches = scoring.calibration_batches_from_config(c, tokenizer, answer_only=True)
    if answer_batches and "loss_mask" not in answer_batches[0]:  # plain text: no answers, the loss is every token's
        print(f"Answer-only ablation skipped: calibration {c.data!r} is plain text, every token is in its loss.")
    elif answer_batches:
        answer = scoring.collect(cfg, params, answer_batches, ["fisher"], micro_batch_size=c.micro_batch_size,
                                 progress=False)
        for ratio in config.ratios:
            plan = pruning.select(cfg, answer, "fisher", "global", ratio)
            ablation[ratio] = run(f"answer-only-fisher/global/{ratio:g}", pruning.masks(cfg, plan))
    report = {"model": reporting.repo_relative(path, REPO), "device": jax.devices()[0].device_kind,
              "calibration_seconds": calib_s,
              "scoring_cost": cost, "baseline": baseline,
              "sweep": {f"{m}/{s}/{r:g}": v for (m, s, r), v in sweep.items()},
              "sensitivity": {f"top{k}/{r}": v for (r, k), v in sensitivity.items()},
              "memory": memory, "throughput": speed, "seconds": time.perf_counter() - t_start,
              "answer_only_ablation": {f"{r:g}": v for r, v in ablation.items()}}
    reporting.atomic_write(workdir / "report.json", json.dumps(reporting.jsonable(report), indent=1))
    text = render_report(config, report, baseline, sweep, sensitivity, memory, speed, cost, ablation)
    reporting.atomic_write(workdir / "report.md", text)
    domains = [d for d in skills.DOMAINS]
    if sweep and skills_on:  # the plots show exact match
        panels = {f"{scope} scope": {m: (list(config.ratios), [sweep[(m, scope, r)]["mean_em"] for r in config.ratios])
                                     for m in config.methods} for scope in config.scopes}
        reporting.plot_lines(workdir / "sweep.png", panels, "ratio of routed dims removed", logx=False)
    if sensitivity and skills_on:
        ks = list(config.sensitivity_ks)
        panels = {d: {r: (ks, [sensitivity[(r, k)][d]["em"] for k in ks]) for r in config.sensitivity_rankings}
                  for d in domains}
        reporting.plot_lines(workdir / "sensitivity.png", panels, "top-k dims removed", logx=True)
    print(text)


def render_report(config, report, baseline, sweep, sensitivity, memory, speed, cost, ablation) -> str:
    domains = list(skills.DOMAINS)
    rows = [baseline, *sweep.values(), *sensitivity.values(), *ablation.values()]
    skills_on, columns = "mean_em" in baseline, results_page.quality_header(rows)
    skill_head = [*domains, "mean EM", "kept", "refusal", "over-refusal"] if skills_on else []
    head = "| " + " | ".join(["run", *skill_head, *columns]) + " |"
    sep = "|---|" + "---:|" * (len(skill_head) + len(columns))

    def row(label, r):
        cells = results_page.quality_cells(r, columns)
        if skills_on:
            kept = r["mean_em"] / baseline["mean_em"] if baseline["mean_em"] else None
            cells = [*(fmt(r[d]["em"], 2) for d in domains), fmt(r["mean_em"]), fmt(kept, 2),
                     fmt(r.get("refusal"), 2), fmt(r.get("over_refusal"), 2), *cells]
        return f"| {label} | " + " | ".join(cells) + " |"

    prompts = (f"{config.n_per_domain} held-out prompts per domain" if skills_on else
               "skills exact match skipped (not the built-in byte tokenizer)")
    lines = [f"# Fisher-MoE on {report['model']}", "",
             f"Device: {report['device']}; {prompts}; calibration {calibration.describe(config.calibration)}. "
             f"Total {report['seconds']:.0f} s.",
             "", "## Method x scope x ratio (routed-expert dims removed)", "", head, sep, row("unpruned", baseline)]
    lines += [row(f"{m} / {s} / {r:g}", v) for (m, s, r), v in sweep.items()]
    if ablation:
        lines += ["", "## Ablation: Fisher of the answer tokens only (global scope)", "", head, sep]
        lines += [row(f"answer-only fisher / global / {r:g}", v) for r, v in ablation.items()]
        lines += [row(f"full-sequence fisher / global / {r:g}", sweep[("fisher", "global", r)])
                  for r in ablation if ("fisher", "global", r) in sweep]
    if sensitivity:
        lines += ["", "## Sensitivity: the k highest-ranked dims removed (whole model)", "", head, sep]
        lines += [row(f"top {k} by {r}", v) for (r, k), v in sorted(sensitivity.items())]
    tm = memory["this_model"]
    lines += ["", "## Memory at 50% (Fisher)", "", "| model | params | bytes | saved |", "|---|---:|---:|---:|"]
    for label, m in tm.items():
        lines.append(f"| this model, {label} | {m['total']:,} | {m['bytes']:,} | "
                     f"{1 - m['bytes'] / tm['unpruned']['bytes']:.1%} |")
    q = memory["qwen1.5-moe-a2.7b"]
    lines.append(f"| Qwen1.5-MoE-A2.7B (shapes), 50% of routed dims | {q['params_before']:,} -> "
                 f"{q['params_after']:,} | "
                 f"{q['bytes_bf16_before'] / 2**30:.2f} -> {q['bytes_bf16_after'] / 2**30:.2f} GiB bf16 | "
                 f"{q['saved_fraction']:.1%} (paper: ~45%) |")
    lines += ["", f"## Throughput (compacted models, same run; batch {config.throughput_batch}, prompt "
              f"{config.prompt_len}, medians of {config.repeats})", "",
              "| model | pruning | prefill tok/s | x | decode tok/s | x |", "|---|---|---:|---:|---:|---:|"]
    for model_name, runs in speed.items():
        base = runs["unpruned"]
        for label, s in runs.items():
            prefill, decode = s["prefill_tokens_per_s"], s["decode_tokens_per_s"]
            decode_x = decode / base["decode_tokens_per_s"] if decode and base["decode_tokens_per_s"] else None
            lines.append(f"| {model_name} | {label} | {prefill:.0f} | {prefill / base['prefill_tokens_per_s']:.2f} | "
                         f"{fmt(decode, 0)} | {fmt(decode_x, 2)} |")
    lines += ["", f"Scoring cost: the Fisher step (forward + backward to the per-sequence masks, with activation "
              f"statistics) takes {cost['ratio']:.2f}x a plain forward + backward of the loss to the weights, "
              f"per token ({cost['tokens']:.0f} tokens per micro-batch, median of interleaved repeats)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
