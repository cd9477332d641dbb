"""Benchmark the routed-expert dispatch paths of `moe_jax.model.moe` against a dense matmul.

For one MoE layer shape, routes random tokens once, then times each dispatch path (jit,
warm-up, block_until_ready, median of repeats) and a single dense matmul with exactly the
layer's useful FLOPs (2*T*K*D*F*3) in the same run, and prints a markdown table of tokens/s,
useful FLOP/s and the ratio to the dense matmul's FLOP/s.

    python -m experiments.bench                  # from the repo root: both layers, float32, ~3 min
    python -m experiments.bench --layer=mixtral_small --impls=blocked --block_rows=128 --repeats=5

Paths whose estimated time exceeds --budget_s (dense and ragged_dot cost E/K and E times the
useful FLOPs on CPU) are reported as skipped rather than run.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moe_jax.config import ModelConfig
from moe_jax.model import moe

FLAGS = flags.FLAGS
flags.DEFINE_enum("layer", "all", ["mixtral_small", "qwen15", "all"], "Which MoE layer shape to benchmark.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Expert weight dtype.")
flags.DEFINE_integer("tokens", 0, "Tokens per call; 0 means the layer's default (4096 / 2048).")
flags.DEFINE_integer("repeats", 3, "Timed calls per path (median reported).")
flags.DEFINE_list("impls", ["dense", "ragged", "blocked"], "Dispatch paths to time.")
flags.DEFINE_integer("block_rows", 0, "Rows per block for the blocked path; 0 means its default.")
flags.DEFINE_float("budget_s", 25.0, "Skip a path whose estimated single call takes longer than this.")
flags.DEFINE_integer("seed", 0, "Seed for weights, tokens and router.")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    experts: int
    top_k: int
    hidden: int
    width: int
    tokens: int


LAYERS = {
    "mixtral_small": LayerShape(experts=8, top_k=2, hidden=1024, width=2816, tokens=4096),
    "qwen15": LayerShape(experts=60, top_k=4, hidden=2048, width=1408, tokens=2048),
}


def _time_round_robin(calls: dict[str, tuple], repeats: dict[str, int]) -> dict[str, float]:
    """Median wall seconds per call, timed in interleaved rounds after one warm-up each.

    Interleaving makes the ratios robust to load that changes during the run (a shared CPU).
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for r in range(max(repeats.values())):
        for name, (fn, args) in calls.items():
            if r < repeats[name]:
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _setup(shape: LayerShape, tokens: int, dtype, seed: int):
    cfg = ModelConfig.create(
        model_type="qwen2_moe", vocab_size=128, hidden_size=shape.hidden, num_layers=1, num_heads=8,
        num_kv_heads=8, head_dim=shape.hidden // 8, num_experts=shape.experts,
        moe_intermediate_size=shape.width, num_experts_per_tok=shape.top_k)
    keys = jax.random.split(jax.random.key(seed), 5)
    E, D, F = shape.experts, shape.hidden, shape.width
    experts = {"bucket_0": {
        "gate": (jax.random.normal(keys[0], (E, D, F)) / np.sqrt(D)).astype(dtype),
        "up": (jax.random.normal(keys[1], (E, D, F)) / np.sqrt(D)).astype(dtype),
        "down": (jax.random.normal(keys[2], (E, F, D)) / np.sqrt(F)).astype(dtype),
    }}
    x_TD = jax.random.normal(keys[3], (tokens, D), jnp.float32)
    router = {"router": {"kernel": jax.random.normal(keys[4], (D, E), jnp.float32)}}
    routing = jax.jit(lambda x: moe.route(cfg, 0, router, x))(x_TD)
    return cfg, experts, x_TD, routing


def _estimated_flops(impl: str, shape: LayerShape, useful: float) -> float:
    """FLOPs a path really executes on CPU (ragged_dot lowers to a dense masked product)."""
    return {"dense": useful * shape.experts / shape.top_k, "ragged": useful * shape.experts}.get(impl, useful)


def bench_layer(name: str, shape: LayerShape) -> list[str]:
    dtype = jnp.dtype(FLAGS.dtype)
    T = FLAGS.tokens or shape.tokens
    K, D, F = shape.top_k, shape.hidden, shape.width
    cfg, experts, x_TD, routing = _setup(shape, T, dtype, FLAGS.seed)
    useful = 2.0 * T * K * D * F * 3

    # The reference: one dense matmul with the same FLOPs, (T*K, D) @ (D, 3F).
    a = jax.random.normal(jax.random.key(1), (T * K, D)).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (D, 3 * F)).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul_s = _time_round_robin({"matmul": (matmul, (a, b))}, {"matmul": 1})["matmul"]  # for estimates

    calls, repeats, skipped = {"matmul": (matmul, (a, b))}, {"matmul": FLAGS.repeats}, {}
    for impl in FLAGS.impls:
        est_s = _estimated_flops(impl, shape, useful) / useful * matmul_s
        gather_gib = T * K * D * F * 3 * dtype.itemsize / 2**30
        if impl == "gather" and gather_gib > 1:
            skipped[impl] = f"gathers {gather_gib:.0f} GiB of weights"
        elif est_s > FLAGS.budget_s:
            skipped[impl] = f"est. {est_s:.0f} s/call > --budget_s"
        else:
            block_rows = FLAGS.block_rows or None
            fn = jax.jit(lambda e, x, i, w, impl=impl, block_rows=block_rows: moe.experts_forward(
                cfg, 0, e, x, (i, w), impl=impl, block_rows=block_rows)[0])
            calls[impl] = (fn, (experts, x_TD, routing.idx_TK, routing.weights_TK))
            repeats[impl] = int(max(1, min(FLAGS.repeats, FLAGS.budget_s // max(est_s, 1e-3))))
    secs = _time_round_robin(calls, repeats)

    loads = np.bincount(np.asarray(routing.idx_TK).ravel(), minlength=shape.experts)
    matmul_rate = useful / secs["matmul"]
    rows = [f"\n### {name}: E={shape.experts} top-{K} D={D} F={F} T={T} {FLAGS.dtype}, "
            f"{useful / 1e9:.0f} useful GFLOP/call, expert load min/max {loads.min()}/{loads.max()}\n",
            "| path | ms / call | tokens/s | useful GFLOP/s | vs dense matmul |",
            "|---|---:|---:|---:|---:|",
            f"| dense matmul ({T * K}x{D} @ {D}x{3 * F}) | {secs['matmul'] * 1e3:.0f} | | "
            f"{matmul_rate / 1e9:.1f} | 100% |"]
    for impl in FLAGS.impls:
        if impl in skipped:
            rows.append(f"| {impl} | skipped: {skipped[impl]} | | | |")
            continue
        rate = useful / secs[impl]
        label = impl
        if impl == "blocked":
            label += f" (B={FLAGS.block_rows or moe.block_rows_for(T, K, shape.experts)})"
        rows.append(f"| {label} | {secs[impl] * 1e3:.0f} | {T / secs[impl]:,.0f} | {rate / 1e9:.1f} | "
                    f"{100 * rate / matmul_rate:.0f}% |")
    return rows


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.impls) - set(moe.IMPLS))
    if unknown:
        raise app.UsageError(f"--impls: unknown path(s) {unknown}; expected some of {moe.IMPLS}")
    names = list(LAYERS) if FLAGS.layer == "all" else [FLAGS.layer]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); median of "
          f"{FLAGS.repeats} interleaved calls after warm-up; block_rows={FLAGS.block_rows or 'default'}")
    for name in names:
        print("\n".join(bench_layer(name, LAYERS[name])), flush=True)


if __name__ == "__main__":
    app.run(main)
