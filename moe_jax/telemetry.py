"""Routing telemetry: which experts run, how many per token, how the active set rotates, what it costs.

`RoutingTelemetry.record` takes the "routing" captures of one `forward` (per MoE layer
`idx_TK` and `active_TK`, as (B, T, K)) and the real-token mask, and keeps per batch and
cumulatively:

  active experts per token     histogram of how many chosen experts ran (trimming lowers it)
  expert load                  per layer, how many real tokens each expert served
  dormant experts              experts no token used on everything recorded so far
  rotation                     similarity of consecutive batches' active experts: Jaccard of the
                               sets used, and weighted Jaccard of the load distributions (with
                               few experts every batch uses them all; the load still rotates)
  active parameters per token  routed-expert parameters that ran, per real token (all layers)

`observe` runs a model over batches and records each. `active_token_latency` measures wall
time per token in prefill and decode (and tokens/s, memory) for the same masks. Records go
to telemetry.jsonl and TensorBoard; `table` and `plots` summarise them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax import evaluation, footprint, reporting
from moe_jax.checkpoint import summary_writer_class
from moe_jax.config import ModelConfig
from moe_jax.model import transformer
from moe_jax.trimming import expert_param_counts


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _weighted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """sum(min) / sum(max) of two load distributions (each normalised to sum 1): 1 when the
    batches spread their tokens over the experts identically, 0 when they share no expert."""
    a, b = a / max(a.sum(), 1), b / max(b.sum(), 1)
    top = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / top) if top > 0 else 1.0


class RoutingTelemetry:
    """Accumulates routing facts of one model batch by batch (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, log_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.names = [cfg.layer_name(i) for i in cfg.moe_layers]
        self.expert_params = {n: p.astype(np.int64) for n, p in expert_param_counts(cfg).items()}
        K = cfg.num_experts_per_tok
        self.load = {n: np.zeros(cfg.experts_per_layer[i], np.int64) for n, i in zip(self.names, cfg.moe_layers)}
        self.hist = {n: np.zeros(K + 1, np.int64) for n in self.names}
        self.batches: list[dict[str, Any]] = []
        self._previous: tuple[dict[str, set], dict[str, np.ndarray]] | None = None
        self.tokens = 0
        self.active_params = 0
        self.chosen_params = 0
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._tb = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "telemetry.jsonl").write_text("")
            self._tb = summary_writer_class()(str(self.log_dir / "tb"))

    def record(self, routing: Mapping[str, Mapping[str, Any]], valid_BT, **extra: float) -> dict[str, Any]:
        """Add one batch: `routing[layer] = {"idx_TK": (B,T,K), "active_TK": (B,T,K) or absent}`."""
        valid = np.asarray(valid_BT, bool)
        missing = set(self.names) - set(routing)
        if missing:
            raise ValueError(f"telemetry: routing captures lack MoE layer(s) {sorted(missing)}")
        tokens = int(valid.sum())
        sets, loads, rotation, load_rotation = {}, {}, {}, {}
        batch_active = batch_chosen = ran_slots = 0
        for n in self.names:
            idx = np.asarray(routing[n]["idx_TK"])
            active = np.asarray(routing[n].get("active_TK", np.ones(idx.shape, bool)), bool)
            if idx.shape[:2] != valid.shape or active.shape != idx.shape:
                raise ValueError(f"telemetry: {n} routing has idx {idx.shape} / active {active.shape}; expected "
                                 f"(B, T, K) with (B, T) = {valid.shape}")
            ran = active & valid[..., None]
            counts = np.bincount(idx[ran].ravel(), minlength=len(self.load[n]))
            self.load[n] += counts
            self.hist[n] += np.bincount(active.sum(-1)[valid].ravel(), minlength=len(self.hist[n]))
            sizes = self.expert_params[n][idx]
            batch_active += int((sizes * ran).sum())
            ran_slots += int(ran.sum())
            batch_chosen += int((sizes * valid[..., None]).sum())
            sets[n], loads[n] = set(np.flatnonzero(counts).tolist()), counts
            if self._previous is not None:
                rotation[n] = _jaccard(sets[n], self._previous[0][n])
                load_rotation[n] = _weighted_jaccard(counts, self._previous[1][n])
        self._previous = (sets, loads)
        self.tokens += tokens
        self.active_params += batch_active
        self.chosen_params += batch_chosen
        rec = {
            "batch": len(self.batches), "tokens": tokens,
            "active_params_per_token": batch_active / max(tokens, 1),
            "active_fraction": batch_active / max(batch_chosen, 1),
            "mean_active_experts": ran_slots / max(tokens * len(self.names), 1),
            "active_experts": {n: len(s) for n, s in sets.items()},
            "rotation_jaccard": rotation,
            "mean_rotation_jaccard": float(np.mean(list(rotation.values()))) if rotation else None,
            "load_rotation": load_rotation,
            "mean_load_rotation": float(np.mean(list(load_rotation.values()))) if load_rotation else None,
            **{k: float(v) for k, v in extra.items()},
        }
        self.batches.append(rec)
        self._log(rec)
        return rec

    def _log(self, rec: Mapping[str, Any]) -> None:
        if self.log_dir is None:
            return
        with (self.log_dir / "telemetry.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        step = rec["batch"]
        for key in ("active_params_per_token", "active_fraction", "mean_active_experts", "mean_rotation_jaccard",
                    "mean_load_rotation", "tokens"):
            if rec.get(key) is not None:
                self._tb.add_scalar(f"telemetry/{key}", rec[key], step)
        for n, j in rec["rotation_jaccard"].items():
            self._tb.add_scalar(f"rotation/{n}", j, step)
            self._tb.add_scalar(f"load_rotation/{n}", rec["load_rotation"][n], step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # -------------------------------------------------------------- summaries
    def dormant(self) -> dict[str, list[int]]:
        """Per layer: experts no recorded token ran (on everything recorded so far)."""
        return {n: np.flatnonzero(c == 0).tolist() for n, c in self.load.items()}

    def summary(self) -> dict[str, Any]:
        K = self.cfg.num_experts_per_tok
        slots = sum(int(h.sum()) for h in self.hist.values())
        rotations = [r["mean_rotation_jaccard"] for r in self.batches if r["mean_rotation_jaccard"] is not None]
        load_rotations = [r["mean_load_rotation"] for r in self.batches if r["mean_load_rotation"] is not None]
        return {
            "batches": len(self.batches), "tokens": self.tokens,
            "active_params_per_token": self.active_params / max(self.tokens, 1),
            "chosen_params_per_token": self.chosen_params / max(self.tokens, 1),
            "active_fraction": self.active_params / max(self.chosen_params, 1),
            "mean_active_experts": sum(float((h * np.arange(K + 1)).sum()) for h in self.hist.values()) / max(slots, 1),
            "active_experts_hist": {n: h.tolist() for n, h in self.hist.items()},
            "load": {n: c.tolist() for n, c in self.load.items()},
            "dormant": self.dormant(),
            "mean_rotation_jaccard": float(np.mean(rotations)) if rotations else None,
            "mean_load_rotation": float(np.mean(load_rotations)) if load_rotations else None,
        }

    def table(self) -> str:
        """Markdown: one row per MoE layer (load spread, dormant experts, rotation, active experts/token)."""
        K = self.cfg.num_experts_per_tok
        lines = ["| layer | experts used | dormant | max/mean load | rotation: set Jaccard | rotation: load Jaccard "
                 "| active experts/token |", "|---|---|---|---|---|---|---|"]
        for n in self.names:
            c = self.load[n]
            used = int((c > 0).sum())
            spread = float(c.max() / c.mean()) if c.sum() else None
            rot = [r["rotation_jaccard"][n] for r in self.batches if n in r["rotation_jaccard"]]
            load_rot = [r["load_rotation"][n] for r in self.batches if n in r["load_rotation"]]
            h = self.hist[n]
            mean_active = float((h * np.arange(K + 1)).sum() / max(h.sum(), 1))
            dormant = ", ".join(map(str, self.dormant()[n])) or "-"
            rotation = reporting.fmt(float(np.mean(rot)) if rot else None)
            load_rotation = reporting.fmt(float(np.mean(load_rot)) if load_rot else None)
            lines.append(f"| {n} | {used}/{len(c)} | {dormant} | {reporting.fmt(spread)} | {rotation} "
                         f"| {load_rotation} | {mean_active:.3f} |")
        return "\n".join(lines) + "\n"

    def plots(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """load.png (layers x experts heatmap of the cumulative load) and rotation.png (load Jaccard per batch)."""
        out_dir = Path(out_dir)
        fractions = {n: (c / max(c.sum(), 1)).tolist() for n, c in self.load.items()}
        paths = {"load": reporting.plot_expert_load({"all batches": {"fraction": fractions}}, out_dir / "load.png")}
        lines = {n: ([r["batch"] for r in self.batches if n in r["load_rotation"]],
                     [r["load_rotation"][n] for r in self.batches if n in r["load_rotation"]])
                 for n in self.names}
        if any(xs for xs, _ in lines.values()):
            reporting.plot_lines(out_dir / "rotation.png", {"expert-load rotation between batches": lines},
                                 "batch", logx=False, ylabel="weighted Jaccard with previous batch")
            paths["rotation"] = out_dir / "rotation.png"
        return paths


# ============================================================================ running a model
def observe(cfg: ModelConfig, params, batches: Iterable, masks: Mapping[str, Any] | None = None,
            log_dir: str | os.PathLike | None = None) -> RoutingTelemetry:
    """Run `params` (with `masks`: pruning and/or trimming) over `batches` and record each batch's routing."""
    telemetry = RoutingTelemetry(cfg, log_dir)
    for batch in batches:
        tokens, real, _ = evaluation.batch_arrays(batch)
        _, aux = transformer.forward(cfg, params, jnp.asarray(tokens), masks, attention_mask=jnp.asarray(real),
                                     capture=("routing",))
        telemetry.record({n: {"idx_TK": a["idx_TK"], "active_TK": a["active_TK"]} for n, a in aux.items()}, real)
    telemetry.close()
    if not telemetry.batches:
        raise ValueError("telemetry.observe: no batches")
    return telemetry


def active_token_latency(cfg: ModelConfig, params, *, masks: Mapping[str, Any] | None = None, batch_size: int = 8,
                         prompt_len: int = 64, new_tokens: int = 32, repeats: int = 3, seed: int = 0,
                         prompts=None, impl: str = "auto") -> dict[str, Any]:
    """Active Token Latency: wall seconds per token in prefill (per prompt token of the batch) and
    in decode (per generated token of a sequence, i.e. per decode step), tokens/s, peak memory.
    Same protocol as `footprint.throughput` (medians after a compiling warm-up)."""
    t = footprint.throughput(cfg, params, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                              repeats=repeats, seed=seed, masks=masks, prompts=prompts, impl=impl)
    prefill_s = batch_size * prompt_len / t["prefill_tokens_per_s"]
    decode_s = batch_size * (new_tokens - 1) / t["decode_tokens_per_s"] if t["decode_tokens_per_s"] else None
    return {**t, "prefill_latency_ms_per_token": 1e3 * prefill_s / (batch_size * prompt_len),
            "decode_latency_ms_per_token": None if decode_s is None else 1e3 * decode_s / (new_tokens - 1)}
