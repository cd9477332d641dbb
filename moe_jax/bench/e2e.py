"""End-to-end benchmark of a Qwen1.5-MoE-A2.7B-shaped random model, compressed four ways (no flags:
`experiments/bench.py` drives it).

In one run, side by side: prefill and decode tokens/s (`telemetry.active_token_latency`), weight
bytes and device memory of the unpruned model, Fisher-MoE 50% (expert and global scopes),
Pathfinder 50% of experts and run-time trimming calibrated to an active-parameter target; the
MoE layer's achieved FLOP/s against a dense matmul of the same FLOPs; and the time Fisher
scoring takes for N x L calibration tokens. Weights are random (nothing is downloaded); the
scores come from `scoring.collect` on random calibration tokens, so the plans exercise the real
selection, compaction and dispatch code but say nothing about accuracy. `impl` picks the MoE
dispatch path of prefill, decode and scoring (trimming's calibration keeps "auto").
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import footprint, pruning, scoring, synthetic, telemetry, timing, trimming
from moe_jax.bench import dispatch as bench_dispatch
from moe_jax.config import ModelConfig
from moe_jax.model import decode, moe
from moe_jax.reporting import fmt

SCORERS = ("collect", "layerwise", "both")
VARIANTS = ("fisher_expert", "fisher_global", "pathfinder", "trimmed")  # beside "unpruned", always measured


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    """Model size overrides (0 = Qwen1.5-MoE-A2.7B's value) and the workload."""

    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_experts: int = 0
    expert_width: int = 0
    shared_width: int = 0
    vocab_size: int = 0
    dtype: str = "bfloat16"
    router_scale: float = 40.0
    batch_size: int = 8
    prompt_len: int = 256
    new_tokens: int = 64
    repeats: int = 3
    rounds: int = 1
    calib_sequences: int = 128
    calib_len: int = 2048
    micro_batch_size: int = 4
    scorer: str = "collect"
    traj_sequences: int = 16
    ratio: float = 0.5
    trim_target: float = 0.75
    trim_bisect_steps: int = 8
    variants: tuple[str, ...] = VARIANTS
    impl: str = "auto"
    program_bytes: bool = True  # compile each variant's generate once more for XLA's memory analysis
    seed: int = 0

    def check(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer={self.scorer!r}; expected one of {SCORERS}")
        for name in ("batch_size", "prompt_len", "repeats", "rounds", "calib_sequences", "micro_batch_size",
                     "traj_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.new_tokens < 2 or self.calib_len < 1:
            raise ValueError(f"new_tokens={self.new_tokens} must be >= 2 and calib_len={self.calib_len} >= 1")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; expected some of {VARIANTS}")
        if self.impl not in moe.IMPLS or self.impl == "expert_parallel":
            raise ValueError(f"impl={self.impl!r}; expected a single-device path of {moe.IMPLS}")
        if not 0 < self.ratio < 1 or not 0 < self.trim_target <= 1:
            raise ValueError(f"ratio={self.ratio} must lie in (0, 1) and trim_target={self.trim_target} in (0, 1]")

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("num_layers", "hidden_size", "num_heads", "num_experts", "expert_width",
                                              "shared_width", "vocab_size")}


def _seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _token_batches(rng: np.random.Generator, cfg: ModelConfig, sequences: int, length: int, rows: int):
    """Random (rows, length + 1) calibration token arrays: `sequences` rows in all."""
    tokens = rng.integers(0, cfg.vocab_size, (sequences, length + 1), dtype=np.int32)
    return [tokens[i:i + rows] for i in range(0, sequences, rows)]


def device_memory() -> dict[str, Any]:
    """Peak bytes the device allocator has seen in this process, where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_in_use": stats.get("bytes_in_use")}


def generate_program_bytes(cfg: ModelConfig, params, batch: int, prompt_len: int, new_tokens: int,
                           masks=None, impl: str = "auto") -> int | None:
    """Device bytes XLA plans for the generate program (arguments + outputs + temporaries - aliased),
    from the compiled program's memory analysis: a per-model peak where the allocator's is cumulative."""
    tokens = jnp.zeros((batch, prompt_len), jnp.int32)
    lowered = decode.generate_arrays.lower(cfg, params, tokens, jnp.ones_like(tokens, bool), jax.random.PRNGKey(0),
                                     jnp.int32(-1), jnp.int32(0), masks, max_new_tokens=new_tokens, temperature=0.0,
                                     top_p=1.0, impl=impl)
    stats = lowered.compile().memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def _speed(cfg: ModelConfig, params, s: E2ESettings, masks=None) -> dict:
    return telemetry.active_token_latency(cfg, params, masks=masks, batch_size=s.batch_size, prompt_len=s.prompt_len,
                                          new_tokens=s.new_tokens, repeats=s.repeats, seed=s.seed, impl=s.impl)


def _variant_row(label: str, cfg: ModelConfig, params, s: E2ESettings, masks=None, active_fraction=None) -> dict:
    size = footprint.model_size(cfg, params)
    speed = _speed(cfg, params, s, masks)
    routed_active = size["active_per_token"] - size["non_expert"]
    return {"variant": label, "weight_bytes": size["bytes"], "params": size["total"],
            "active_params_per_token": size["active_per_token"], "routed_active_per_token": routed_active,
            "active_fraction": active_fraction, "experts_per_layer": size["experts_per_layer"],
            "prefill_tokens_per_s": [speed["prefill_tokens_per_s"]],
            "decode_tokens_per_s": [speed["decode_tokens_per_s"]],
            "program_bytes": generate_program_bytes(cfg, params, s.batch_size, s.prompt_len, s.new_tokens, masks,
                                                    s.impl) if s.program_bytes else None,
            "device_memory": device_memory()}


def _score(cfg, params, s: E2ESettings, log) -> tuple[scoring.Scores, dict[str, float]]:
    """Fisher scores of N x L random calibration tokens, timed for each scorer asked for (compile included)."""
    batches = _token_batches(np.random.default_rng(s.seed), cfg, s.calib_sequences, s.calib_len, s.micro_batch_size)
    times, scores = {}, None
    if s.scorer in ("collect", "both"):
        scores, times["collect"] = _seconds(lambda: scoring.collect(
            cfg, params, batches, ["fisher"], micro_batch_size=s.micro_batch_size, progress=False, impl=s.impl))
        log(f"fisher scoring (collect): {times['collect']:.1f} s")
    if s.scorer in ("layerwise", "both"):
        host = jax.tree_util.tree_map(np.asarray, params)
        got, times["layerwise"] = _seconds(lambda: scoring.collect_layerwise(
            cfg, host, batches, ["fisher"], micro_batch_size=s.micro_batch_size, progress=False, impl=s.impl))
        del host
        scores = scores or got
        log(f"fisher scoring (layerwise): {times['layerwise']:.1f} s")
    return scores, times


def run(s: E2ESettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of the module docstring, as one JSON-able dict."""
    s.check()
    t_start = time.perf_counter()
    cfg = synthetic.qwen15_moe_config(**s.sizes())
    params, init_s = _seconds(lambda: synthetic.random_params(cfg, s.seed, s.dtype, s.router_scale))
    log(f"model: {cfg.num_layers} layers, {footprint.model_size(cfg, params)['total']:,} params ({init_s:.1f} s)")

    fisher, score_s = _score(cfg, params, s, log)
    traj_batches = _token_batches(np.random.default_rng(s.seed + 1), cfg, s.traj_sequences, s.calib_len,
                                  s.micro_batch_size)
    traj, traj_s, policy, trim_s = None, None, None, None
    if "pathfinder" in s.variants:
        traj, traj_s = _seconds(lambda: scoring.collect(cfg, params, traj_batches, ["trajectory"],
                                                        micro_batch_size=s.micro_batch_size, progress=False,
                                                        impl=s.impl))
    if "trimmed" in s.variants:
        policy, trim_s = _seconds(lambda: trimming.calibrate(cfg, params, traj_batches[:1], s.trim_target,
                                                             bisect_steps=s.trim_bisect_steps))
    pct = f"{s.ratio:.0%}"
    plans = {"fisher_expert": (f"Fisher-MoE {pct} (expert)", lambda: pruning.select(cfg, fisher, "fisher", "expert",
                                                                                     s.ratio)),
             "fisher_global": (f"Fisher-MoE {pct} (global)", lambda: pruning.select(cfg, fisher, "fisher", "global",
                                                                                     s.ratio)),
             "pathfinder": (f"Pathfinder {pct} experts", lambda: pruning.select(cfg, traj, "pathfinder", "global",
                                                                                 s.ratio))}

    # Each pruned copy is built when measured and dropped after (one round), so the device holds the
    # unpruned model and at most one copy: the full-size model's variants together outgrow an 80 GB GPU.
    builds = [("unpruned", lambda: (cfg, params), None, 1.0)]
    for key, (label, plan) in plans.items():
        if key in s.variants:
            builds.append((label, lambda plan=plan: pruning.apply(cfg, params, plan()), None, None))
    if policy is not None:
        builds.append((f"trimmed (target {s.trim_target:.2f})", lambda: (cfg, params), policy.masks(cfg, params),
                       policy.calibration["active_fraction"]))
    rows, variants = [], []
    for label, build, masks, fraction in builds:
        cfg_v, params_v = build()
        rows.append(_variant_row(label, cfg_v, params_v, s, masks, fraction))
        log(str(rows[-1]))
        if s.rounds > 1:
            variants.append((label, cfg_v, params_v, masks, fraction))
        del params_v
    for _ in range(s.rounds - 1):  # more rounds over all variants: load that changes moves every row alike
        for row, (_, cfg_v, params_v, masks, _) in zip(rows, variants):
            speed = _speed(cfg_v, params_v, s, masks)
            row["prefill_tokens_per_s"].append(speed["prefill_tokens_per_s"])
            row["decode_tokens_per_s"].append(speed["decode_tokens_per_s"])
    del variants
    for row in rows:
        row["prefill_rounds"], row["decode_rounds"] = row["prefill_tokens_per_s"], row["decode_tokens_per_s"]
        # the median of the rounds; a decode time lost in noise (None) is left out
        row["prefill_tokens_per_s"] = timing.median_of_known(row["prefill_rounds"])
        row["decode_tokens_per_s"] = timing.median_of_known(row["decode_rounds"])
    base = rows[0]["routed_active_per_token"]
    for r in rows:
        if r["active_fraction"] is None:
            r["active_fraction"] = r["routed_active_per_token"] / base

    layer = cfg.moe_layers[0]
    shape = bench_dispatch.LayerShape(cfg.experts_per_layer[layer], cfg.num_experts_per_tok, cfg.hidden_size,
                                      cfg.expert_widths[layer][0], s.batch_size * s.prompt_len)
    dispatch = bench_dispatch.measure_layer(shape, dtype=s.dtype, impls=_layer_impls(s.impl), repeats=s.repeats,
                                            seed=s.seed)
    return {"settings": dataclasses.asdict(s), "config": cfg.to_dict(), "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "jax": jax.__version__, "cpu_cores": os.cpu_count(),
            "init_seconds": init_s,
            "fisher_scoring_seconds": score_s, "calibration_tokens": s.calib_sequences * s.calib_len,
            "trajectory_seconds": traj_s, "trajectory_tokens": s.traj_sequences * s.calib_len,
            "trim_calibration_seconds": trim_s, "trim_policy": policy and policy.to_json(), "variants": rows,
            "moe_layer": {"shape": dataclasses.asdict(shape), **dispatch}, "seconds": time.perf_counter() - t_start}


def _layer_impls(impl: str) -> tuple[str, ...]:
    """The MoE layer's timed paths: "blocked" (what "auto" runs), and `impl` when it is another."""
    return ("blocked",) if impl in ("auto", "blocked") else ("blocked", impl)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as a markdown page: the variants table, the MoE layer's FLOP/s, scoring time."""
    s, cfg = report["settings"], report["config"]
    E, K = cfg["experts_per_layer"][cfg["layer_kinds"].index("moe")], cfg["num_experts_per_tok"]
    lines = [
        "# End-to-end benchmark: Qwen1.5-MoE-A2.7B-shaped random model", "",
        f"Command: `{command}`", "",
        f"Device: {report['device']} ({report['backend']}, jax {report['jax']}, {report['cpu_cores']} CPU cores). "
        f"Random {s['dtype']} weights "
        f"(routers x{s['router_scale']:g}); {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {E} experts "
        f"x {cfg['expert_widths'][cfg['layer_kinds'].index('moe')][0]} top-{K}, shared expert "
        f"{cfg['shared_expert_width']}, vocab {cfg['vocab_size']}. Batch {s['batch_size']}, prompt "
        f"{s['prompt_len']}, {s['new_tokens']} new tokens; medians of {s['rounds']} round(s) over all variants of "
        f"{s['repeats']} calls "
        f"after warm-up each; MoE dispatch `impl={s.get('impl', 'auto')}`. "
        f"Scores from `scoring.collect` on random calibration tokens (Fisher: {s['calib_sequences']} x "
        f"{s['calib_len']}; Pathfinder's trajectories: {s['traj_sequences']} x {s['calib_len']}), so the plans are "
        f"real selections of a random model: speed and memory only, no accuracy. Total {report['seconds']:.0f} s.", "",
        "| variant | weights MiB | params | routed active/token (vs unpruned) | prefill tok/s | decode tok/s "
        "| generate program MiB (XLA) | device peak MiB (process) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["variants"]:
        lines.append(f"| {r['variant']} | {_mib(r['weight_bytes'])} | {r['params']:,} | {r['active_fraction']:.2f} | "
                     f"{fmt(r['prefill_tokens_per_s'], 0)} | {fmt(r['decode_tokens_per_s'], 0)} | "
                     f"{_mib(r['program_bytes'])} | {_mib(r['device_memory']['peak_bytes_in_use'])} |")
    layer = report["moe_layer"]
    secs, useful = layer["seconds"], layer["useful_flops"]
    sh = layer["shape"]
    mm_rate = useful / secs["matmul"]
    lines += [
        "", "Generate program: the bytes XLA's memory analysis plans for one `generate` call (weights, KV cache, "
        "temporaries), a per-variant peak. Device peak: the allocator's `peak_bytes_in_use`, cumulative over the "
        "process (rows run in order; n/a where the backend reports none, as on CPU).", ""]
    for impl in _layer_impls(s.get("impl", "auto")):
        rate = useful / secs[impl]
        size = f"B={layer['block_rows']}" if impl == "blocked" else f"C={layer.get('tile_rows')}"
        lines.append(f"MoE layer ({sh['tokens']} tokens, E={sh['experts']} top-{sh['top_k']} D={sh['hidden']} "
                     f"F={sh['width']}, {s['dtype']}, {impl} dispatch {size}): {rate / 1e12:.4f} TFLOP/s useful vs "
                     f"{mm_rate / 1e12:.4f} TFLOP/s for a dense matmul of the same FLOPs "
                     f"({useful / 1e9:.1f} GFLOP): {100 * rate / mm_rate:.0f}%.")
    lines.append("")
    for name, sec in report["fisher_scoring_seconds"].items():
        lines.append(f"Fisher scoring ({name}, compile included): {report['calibration_tokens']:,} tokens "
                     f"({s['calib_sequences']} x {s['calib_len']}, micro-batch {s['micro_batch_size']}) "
                     f"in {sec:.1f} s.")
    if report["trajectory_seconds"] is not None:
        lines.append(f"Trajectory statistics (Pathfinder): {report['trajectory_tokens']:,} tokens in "
                     f"{report['trajectory_seconds']:.1f} s.")
    if report["trim_calibration_seconds"] is not None:
        lines.append(f"Trimming calibration ({s['trim_bisect_steps']} bisection steps on {s['micro_batch_size']} x "
                     f"{s['calib_len']} tokens): {report['trim_calibration_seconds']:.1f} s.")
    return "\n".join(lines) + "\n"
