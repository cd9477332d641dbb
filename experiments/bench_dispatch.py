"""Routed-expert dispatch timing against a dense matmul of the same FLOPs (no flags: `bench.py` drives it).

`measure_layer` routes random tokens once, then times each dispatch path of `moe_jax.model.moe`
and one dense (T*K, D) @ (D, 3F) matmul with exactly the layer's useful FLOPs (2*T*K*D*F*3),
interleaved in rounds so load that changes during the run moves both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model import moe


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


def time_round_robin(calls: dict[str, tuple], repeats: dict[str, int]) -> dict[str, float]:
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


def measure_layer(shape: LayerShape, *, dtype, impls, repeats: int = 3, block_rows: int | None = None,
                  budget_s: float = 25.0, seed: int = 0) -> dict:
    """{"seconds": {path: median s/call}, "skipped": {path: why}, "useful_flops", "block_rows", "expert_load"}
    with "matmul" the dense reference; a path whose estimated call exceeds `budget_s` is skipped."""
    dtype = jnp.dtype(dtype)
    T, K, D, F = shape.tokens, shape.top_k, shape.hidden, shape.width
    cfg, experts, x_TD, routing = _setup(shape, T, dtype, seed)
    useful = 2.0 * T * K * D * F * 3

    # The reference: one dense matmul with the same FLOPs, (T*K, D) @ (D, 3F).
    a = jax.random.normal(jax.random.key(1), (T * K, D)).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (D, 3 * F)).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul_s = time_round_robin({"matmul": (matmul, (a, b))}, {"matmul": 1})["matmul"]  # for estimates

    calls, counts, skipped = {"matmul": (matmul, (a, b))}, {"matmul": repeats}, {}
    for impl in impls:
        est_s = _estimated_flops(impl, shape, useful) / useful * matmul_s
        gather_gib = T * K * D * F * 3 * dtype.itemsize / 2**30
        if impl == "gather" and gather_gib > 1:
            skipped[impl] = f"gathers {gather_gib:.0f} GiB of weights"
        elif est_s > budget_s:
            skipped[impl] = f"est. {est_s:.0f} s/call > budget {budget_s:.0f} s"
        else:
            fn = jax.jit(lambda e, x, i, w, impl=impl: moe.experts_forward(
                cfg, 0, e, x, (i, w), impl=impl, block_rows=block_rows)[0])
            calls[impl] = (fn, (experts, x_TD, routing.idx_TK, routing.weights_TK))
            counts[impl] = int(max(1, min(repeats, budget_s // max(est_s, 1e-3))))
    loads = np.bincount(np.asarray(routing.idx_TK).ravel(), minlength=shape.experts)
    return {"seconds": time_round_robin(calls, counts), "skipped": skipped, "useful_flops": useful,
            "block_rows": block_rows or moe.block_rows_for(T, K, shape.experts),
            "expert_load": [int(loads.min()), int(loads.max())]}


def layer_rows(name: str, shape: LayerShape, result: dict, dtype_name: str, impls) -> list[str]:
    """The markdown table of one `measure_layer` result."""
    T, K, D, F = shape.tokens, shape.top_k, shape.hidden, shape.width
    secs, useful = result["seconds"], result["useful_flops"]
    matmul_rate = useful / secs["matmul"]
    lo, hi = result["expert_load"]
    rows = [f"\n### {name}: E={shape.experts} top-{K} D={D} F={F} T={T} {dtype_name}, "
            f"{useful / 1e9:.0f} useful GFLOP/call, expert load min/max {lo}/{hi}\n",
            "| path | ms / call | tokens/s | useful GFLOP/s | vs dense matmul |",
            "|---|---:|---:|---:|---:|",
            f"| dense matmul ({T * K}x{D} @ {D}x{3 * F}) | {secs['matmul'] * 1e3:.0f} | | "
            f"{matmul_rate / 1e9:.1f} | 100% |"]
    for impl in impls:
        if impl in result["skipped"]:
            rows.append(f"| {impl} | skipped: {result['skipped'][impl]} | | | |")
            continue
        rate = useful / secs[impl]
        label = impl + (f" (B={result['block_rows']})" if impl == "blocked" else "")
        rows.append(f"| {label} | {secs[impl] * 1e3:.0f} | {T / secs[impl]:,.0f} | {rate / 1e9:.1f} | "
                    f"{100 * rate / matmul_rate:.0f}% |")
    return rows
