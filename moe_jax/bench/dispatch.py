"""Routed-expert dispatch timing against a dense matmul of the same FLOPs (no flags: `experiments/bench.py` drives it).

`measure_layer` routes random tokens once, then times each dispatch path of `moe_jax.model.moe`
and one dense (T*K, D) @ (D, 3F) matmul with exactly the layer's useful FLOPs (2*T*K*D*F*3),
interleaved in rounds so load that changes during the run moves both alike. With
`backward=True` a call is forward+backward (gradients in the expert weights and x, three times
the useful FLOPs), set against the same matmul counted three times.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import synthetic, timing
from moe_jax.model import grouped_gemm, moe


@dataclasses.dataclass(frozen=True)
class LayerShape:
    experts: int
    top_k: int
    hidden: int
    width: int
    tokens: int


_Q = synthetic.QWEN15_MOE_A27B
LAYERS = {
    "mixtral_small": LayerShape(experts=8, top_k=2, hidden=1024, width=2816, tokens=4096),
    "qwen15": LayerShape(experts=_Q["num_experts"], top_k=_Q["num_experts_per_tok"], hidden=_Q["hidden_size"],
                         width=_Q["moe_intermediate_size"], tokens=2048),
}


def _setup(shape: LayerShape, tokens: int, dtype, seed: int):
    """The layer of a one-layer random model (`synthetic.random_model`, peaked routers), random
    tokens, and their routing."""
    cfg, params = synthetic.random_model(
        seed=seed, dtype=dtype, shared_expert=False, num_layers=1, vocab_size=128, hidden_size=shape.hidden,
        num_heads=8, num_experts=shape.experts, top_k=shape.top_k, expert_width=shape.width,
        max_position_embeddings=128)
    layer = params[cfg.layer_name(0)]["moe"]
    x_TD = jax.random.normal(jax.random.key(seed), (tokens, shape.hidden), jnp.float32)
    routing = jax.jit(lambda x: moe.route(cfg, 0, {"router": layer["router"]}, x))(x_TD)
    return cfg, layer["experts"], x_TD, routing


# Rough cost of a grouped-GEMM path in Pallas interpret mode (off its chip) in FLOP-equivalents, as
# seen on the 2-core CPU: "pallas" ~2x "blocked"'s time; megablox's TPU emulation ~500x a matmul.
INTERPRETED_SLOWDOWN = {"pallas": 3.0, "megablox": 500.0}


def _estimated_flops(impl: str, shape: LayerShape, useful: float) -> float:
    """FLOPs a path really executes on CPU (ragged_dot lowers to a dense masked product), and an
    interpret-mode kernel's cost in FLOP-equivalents."""
    if impl in grouped_gemm.BACKENDS and grouped_gemm.make_spec(16, impl).interpret:
        return useful * INTERPRETED_SLOWDOWN[impl]
    return {"dense": useful * shape.experts / shape.top_k, "ragged": useful * shape.experts}.get(impl, useful)


def _call(cfg, impl: str, block_rows, backward: bool):
    """jit of one layer's call: the outputs, or the gradients in (experts, x) of their sum."""
    forward = lambda e, x, i, w: moe.experts_forward(cfg, 0, e, x, (i, w), impl=impl, block_rows=block_rows)[0]
    if not backward:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda e, x, i, w: jnp.sum(forward(e, x, i, w)), argnums=(0, 1)))


def measure_layer(shape: LayerShape, *, dtype, impls, repeats: int = 3, block_rows: int | None = None,
                  budget_s: float = 25.0, seed: int = 0, backward: bool = False) -> dict:
    """{"seconds": {path: median s/call}, "skipped": {path: why}, "useful_flops", "block_rows", "expert_load",
    "backward"} with "matmul" the dense reference; a path whose estimated call exceeds `budget_s` is skipped.
    backward: time forward+backward (useful_flops three times the forward's; the matmul timed once, counted 3x)."""
    dtype = jnp.dtype(dtype)
    T, K, D, F = shape.tokens, shape.top_k, shape.hidden, shape.width
    cfg, experts, x_TD, routing = _setup(shape, T, dtype, seed)
    passes = 3 if backward else 1
    useful = 2.0 * T * K * D * F * 3 * passes

    # The reference: one dense matmul with the same FLOPs, (T*K, D) @ (D, 3F).
    a = jax.random.normal(jax.random.key(1), (T * K, D)).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (D, 3 * F)).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul_s = passes * timing.round_robin_seconds({"matmul": (matmul, (a, b))}, {"matmul": 1})["matmul"]  # estimates

    calls, counts, skipped = {"matmul": (matmul, (a, b))}, {"matmul": repeats}, {}
    for impl in impls:
        est_s = _estimated_flops(impl, shape, useful) / useful * matmul_s
        gather_gib = T * K * D * F * 3 * dtype.itemsize / 2**30
        if impl == "gather" and gather_gib > 1:
            skipped[impl] = f"gathers {gather_gib:.0f} GiB of weights"
        elif est_s > budget_s:
            skipped[impl] = f"est. {est_s:.0f} s/call > budget {budget_s:.0f} s"
        else:
            calls[impl] = (_call(cfg, impl, block_rows, backward), (experts, x_TD, routing.idx_TK, routing.weights_TK))
            counts[impl] = int(max(1, min(repeats, budget_s // max(est_s, 1e-3))))
    loads = np.bincount(np.asarray(routing.idx_TK).ravel(), minlength=shape.experts)
    seconds = timing.round_robin_seconds(calls, counts)
    seconds["matmul"] *= passes  # forward+backward: set against three matmuls
    return {"seconds": seconds, "skipped": skipped, "useful_flops": useful, "backward": backward,
            "block_rows": block_rows or moe.block_rows_for(T, K, shape.experts),
            "tile_rows": block_rows or grouped_gemm.tile_rows_for(T, K, shape.experts),
            "expert_load": [int(loads.min()), int(loads.max())]}


def _ms(seconds: float) -> str:
    """Milliseconds to about three significant digits (GPU calls take well under 10 ms)."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def layer_rows(name: str, shape: LayerShape, result: dict, dtype_name: str, impls) -> list[str]:
    """The markdown table of one `measure_layer` result."""
    T, K, D, F = shape.tokens, shape.top_k, shape.hidden, shape.width
    secs, useful = result["seconds"], result["useful_flops"]
    matmul_rate = useful / secs["matmul"]
    lo, hi = result["expert_load"]
    backward = result.get("backward", False)
    rows = [f"\n### {name}{' forward+backward' if backward else ''}: E={shape.experts} top-{K} D={D} F={F} T={T} "
            f"{dtype_name}, {useful / 1e9:.0f} useful GFLOP/call, expert load min/max {lo}/{hi}\n",
            "| path | ms / call | tokens/s | useful GFLOP/s | vs dense matmul |",
            "|---|---:|---:|---:|---:|",
            f"| dense matmul ({T * K}x{D} @ {D}x{3 * F}){' x3' if backward else ''} | {_ms(secs['matmul'])} | | "
            f"{matmul_rate / 1e9:.1f} | 100% |"]
    for impl in impls:
        if impl in result["skipped"]:
            rows.append(f"| {impl} | skipped: {result['skipped'][impl]} | | | |")
            continue
        rate = useful / secs[impl]
        label = impl + (f" (B={result['block_rows']})" if impl == "blocked" else
                        f" (C={result['tile_rows']})" if impl in grouped_gemm.BACKENDS else "")
        rows.append(f"| {label} | {_ms(secs[impl])} | {T / secs[impl]:,.0f} | {rate / 1e9:.1f} | "
                    f"{100 * rate / matmul_rate:.0f}% |")
    return rows
