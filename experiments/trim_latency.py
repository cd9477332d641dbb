"""Active Token Latency of trimmed routing on a random expert-dominated model (see configs/trim_latency.py).

    python experiments/trim_latency.py --config=configs/trim_latency.py --workdir=/tmp/trim_latency

Writes WORKDIR/report.md and report.json: per batch size and active experts per token,
prefill and decode ms per token, tokens/s, and the ratio to top_k, all measured in this run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_jax import footprint, launch, reporting, synthetic, telemetry, trimming

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to configs/trim_latency.py[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Where report.md and report.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    launch.initialize()  # --mesh, --coordinator_address, --num_processes, --process_id
    c, workdir = FLAGS.config, Path(FLAGS.workdir)
    t_start = time.perf_counter()
    cfg, params = synthetic.random_model(
        seed=c.seed, dtype=c.dtype, router_scale=c.router_scale, shared_expert=bool(c.shared_width),
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads, num_experts=c.num_experts,
        top_k=c.top_k, expert_width=c.width, shared_width=c.shared_width, vocab_size=c.vocab_size,
        max_position_embeddings=c.prompt_len + c.new_tokens)
    size = footprint.model_size(cfg, params)
    K = cfg.num_experts_per_tok
    rows = {K: None}
    for m in range(K - 1, 0, -1):
        rows[m] = trimming.TrimmingPolicy.for_model(cfg, params, trimming.LayerTrim(max_active=m)).masks(cfg, params)
    rng = np.random.default_rng(c.seed)
    results = []
    for bs in c.batch_sizes:
        prompts = rng.integers(0, cfg.vocab_size, (bs, c.prompt_len)).astype(np.int32)
        measured = {m: [] for m in rows}
        for _ in range(c.rounds):
            for m, masks in rows.items():
                measured[m].append(telemetry.active_token_latency(
                    cfg, params, masks=masks, batch_size=bs, prompt_len=c.prompt_len, new_tokens=c.new_tokens,
                    repeats=c.repeats, prompts=prompts))
        base = None
        for m in rows:
            med = {k: float(np.median([r[k] for r in measured[m] if r[k] is not None])) for k in (
                "prefill_latency_ms_per_token", "decode_latency_ms_per_token", "prefill_tokens_per_s",
                "decode_tokens_per_s")}
            base = base or med
            results.append({"batch_size": bs, "active_experts": m, "active_fraction": m / K, **med,
                            "decode_vs_top_k": med["decode_latency_ms_per_token"] / base["decode_latency_ms_per_token"],
                            "prefill_vs_top_k": med["prefill_latency_ms_per_token"]
                            / base["prefill_latency_ms_per_token"]})
            print(json.dumps(results[-1]))
    report = {"config": c.to_dict(), "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "params": size["total"], "routed_params": size["routed_experts"], "results": results,
              "seconds": time.perf_counter() - t_start}
    reporting.atomic_write(workdir / "report.json", json.dumps(report, indent=1))
    lines = [f"# Active Token Latency against active experts ({c.preset} preset)", "",
             f"Device: {report['device']} ({report['backend']}); random {c.dtype} model, {size['total']:,} parameters "
             f"({size['routed_experts']:,} in routed experts), {cfg.num_layers} layers of {c.num_experts} experts x "
             f"{c.width}, top-{K}; prompts of {c.prompt_len} tokens, {c.new_tokens} new tokens; median of "
             f"{c.rounds} rounds x {c.repeats} calls. Total {report['seconds']:.0f} s.", "",
             "| batch | active experts/token | active fraction | prefill ms/token | decode ms/token | decode tok/s "
             "| decode vs top-k | prefill vs top-k |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['batch_size']} | {r['active_experts']} | {r['active_fraction']:.2f} | "
                     f"{r['prefill_latency_ms_per_token']:.4f} | {r['decode_latency_ms_per_token']:.2f} | "
                     f"{r['decode_tokens_per_s']:,.0f} | {r['decode_vs_top_k']:.2f} | {r['prefill_vs_top_k']:.2f} |")
    text = "\n".join(lines) + "\n"
    reporting.atomic_write(workdir / "report.md", text)
    print(text)


if __name__ == "__main__":
    app.run(main)
