"""Measure what trimming costs and saves, and choose thresholds that hit an active-parameter target.

The quantity calibrated is the *active routed-expert parameter fraction*: over every real
token and MoE layer, the parameters of the experts that still run after trimming divided by
those of the K experts the router chose (real per-expert widths, so pruned models count
right). Thresholds travel as arrays through `forward`'s masks: every probe of a calibration
reuses one compilation.

Two ways to choose tau:
  global     one tau for every layer, by bisection: the smallest tau (least trimming, so the
             least loss) whose fraction is at or under the target.
  per_layer  greedy: from tau = 0 everywhere, repeatedly raise the one layer's tau (on a
             grid) that buys the most parameters per unit of calibration-loss increase,
             until the target is passed; the last move is refined by bisection.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.evaluation import batch_arrays
from moe_jax.model import transformer
from moe_jax.trimming.policy import LayerTrim, TrimmingError, TrimmingPolicy

MODES = ("global", "per_layer")
_TAU_MAX = 0.5  # a non-best gate never exceeds 1/2, so tau >= 1/2 keeps only each token's best expert


def expert_param_counts(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Per MoE layer name: (E,) parameters of each routed expert (3 * hidden * real width)."""
    return {cfg.layer_name(i): 3 * cfg.hidden_size * np.asarray(cfg.expert_widths[i], np.float64)
            for i in cfg.moe_layers}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_stats(cfg: ModelConfig, params, tokens_BT, real_BT, loss_w_BT, masks, sizes):
    logits_BTV, aux = transformer.forward(cfg, params, tokens_BT, masks, attention_mask=real_BT,
                                          capture=("routing",))
    logits_BTV = logits_BTV[:, :-1]
    target_BT = tokens_BT[:, 1:]
    nll_BT = jax.nn.logsumexp(logits_BTV, -1) - jnp.take_along_axis(logits_BTV, target_BT[..., None], -1)[..., 0]
    w_BT = (real_BT[:, 1:] & real_BT[:, :-1]).astype(jnp.float32) * loss_w_BT[:, 1:]
    out = {"nll": jnp.sum(jnp.where(w_BT > 0, nll_BT, 0.0) * w_BT), "targets": jnp.sum(w_BT)}
    real = real_BT.astype(jnp.float32)[..., None]
    K = cfg.num_experts_per_tok
    for name, a in aux.items():
        p_BTK = sizes[name][a["idx_TK"]] * real
        active_BTK = a["active_TK"].astype(jnp.float32)
        n_active_BT = jnp.sum(active_BTK, -1).astype(jnp.int32)
        out[name] = {"active": jnp.sum(p_BTK * active_BTK), "full": jnp.sum(p_BTK),
                     "hist": jnp.sum(jax.nn.one_hot(n_active_BT, K + 1) * real, axis=(0, 1))}
    return out


@dataclasses.dataclass(frozen=True)
class TrimStats:
    """What a set of masks (trimming or not) does on some data."""

    loss: float  # mean next-token NLL over real targets, weighted by the batches' loss_mask if any
    targets: int
    active_fraction: float  # active / chosen routed-expert parameters, all layers
    active_params_per_token: float  # routed-expert parameters that ran, per real token (all layers)
    layer_fraction: dict[str, float]
    active_experts_hist: dict[str, list[int]]  # per layer: tokens with 0..K active experts
    mean_active_experts: float  # per token and MoE layer

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure(cfg: ModelConfig, params, batches: Iterable, masks: Mapping[str, Any] | None = None) -> TrimStats:
    """Loss and active-parameter fraction of `params` under `masks` on `batches` (pipeline dicts).

    The loss weighs targets by the batches' `loss_mask` when they have one (answer tokens of
    `calibration_batches(..., answer_only=True)`), else every real target; the active
    fraction always counts every real token."""
    sizes = {k: jnp.asarray(v, jnp.float32) for k, v in expert_param_counts(cfg).items()}
    names = list(sizes)
    nll = targets = 0.0
    active = dict.fromkeys(names, 0.0)
    full = dict.fromkeys(names, 0.0)
    hist = {n: np.zeros(cfg.num_experts_per_tok + 1, np.int64) for n in names}
    seen = 0
    for batch in batches:
        tokens, real, loss_w = batch_arrays(batch)
        loss_w = np.ones(tokens.shape, np.float32) if loss_w is None else loss_w.astype(np.float32)
        out = jax.device_get(_batch_stats(cfg, params, jnp.asarray(tokens), jnp.asarray(real), jnp.asarray(loss_w),
                                          masks, sizes))
        nll += float(out["nll"])
        targets += float(out["targets"])
        for n in names:
            active[n] += float(out[n]["active"])
            full[n] += float(out[n]["full"])
            hist[n] += np.rint(out[n]["hist"]).astype(np.int64)
        seen += 1
    if not seen or targets == 0 or not names:
        raise TrimmingError("trimming measure: no batches with real tokens (or a model without MoE layers)")
    tokens_layers = sum(int(h.sum()) for h in hist.values())
    mean_active = sum(float((h * np.arange(len(h))).sum()) for h in hist.values()) / max(tokens_layers, 1)
    return TrimStats(
        loss=nll / targets, targets=int(targets),
        active_fraction=sum(active.values()) / sum(full.values()),
        active_params_per_token=sum(active.values()) / max(int(hist[names[0]].sum()), 1),
        layer_fraction={n: active[n] / full[n] for n in names},
        active_experts_hist={n: h.tolist() for n, h in hist.items()},
        mean_active_experts=mean_active)


def _masks_for(cfg, params, taus: Mapping[str, float], base) -> dict:
    policy = TrimmingPolicy.for_model(cfg, params, LayerTrim(), {n: LayerTrim(float(t)) for n, t in taus.items()})
    return policy.masks(cfg, params, base)


def calibrate(cfg: ModelConfig, params, batches: Sequence, target: float, *, mode: str = "global",
              base_masks: Mapping[str, Any] | None = None, grid: int = 10, bisect_steps: int = 14,
              data_id: str = "") -> TrimmingPolicy:
    """A policy whose tau gives an active routed-expert parameter fraction at or just under `target`
    on `batches`, choosing (see the module docstring) for the least calibration-loss increase.

    base_masks: pruning masks the model will also run with (calibrate the trimming of a pruned
    simulation). The returned policy records the measured fraction and loss in `calibration`.
    """
    if mode not in MODES:
        raise TrimmingError(f"calibrate: mode={mode!r}; expected one of {MODES}")
    if not 0.0 < target <= 1.0:
        raise TrimmingError(f"calibrate: target={target!r} is an active-parameter fraction; expected (0, 1]")
    batches = list(batches)
    if not batches:
        raise TrimmingError("calibrate: no calibration batches")
    names = [cfg.layer_name(i) for i in cfg.moe_layers]
    probes: list[dict[str, Any]] = []

    def probe(taus: Mapping[str, float]) -> TrimStats:
        stats = measure(cfg, params, batches, _masks_for(cfg, params, taus, base_masks))
        probes.append({"taus": {n: round(float(t), 6) for n, t in taus.items()},
                       "active_fraction": stats.active_fraction, "loss": stats.loss})
        return stats

    untrimmed = probe(dict.fromkeys(names, 0.0))
    floor = probe(dict.fromkeys(names, _TAU_MAX))
    if target < floor.active_fraction - 1e-9:
        raise TrimmingError(f"calibrate: target {target} is below the smallest active fraction tau can reach on "
                            f"this data, {floor.active_fraction:.4f} (every token keeps its best expert)")
    if untrimmed.active_fraction <= target:
        taus = dict.fromkeys(names, 0.0)
    elif mode == "global":
        taus = _bisect(lambda t: probe(dict.fromkeys(names, t)).active_fraction, 0.0, _TAU_MAX, target,
                       bisect_steps, names)
    else:
        taus = _greedy(probe, names, untrimmed, target, grid, bisect_steps)
    final = measure(cfg, params, batches, _masks_for(cfg, params, taus, base_masks))
    calibration = {
        "mode": mode, "target": target, "data": data_id, "targets": final.targets,
        "active_fraction": final.active_fraction, "layer_fraction": final.layer_fraction,
        "loss": final.loss, "untrimmed_loss": untrimmed.loss, "loss_increase": final.loss - untrimmed.loss,
        "probes": len(probes), "base_masks": bool(base_masks),
    }
    default = taus[names[0]] if len(set(taus.values())) == 1 else 0.0
    layers = {} if len(set(taus.values())) == 1 else {n: LayerTrim(float(t)) for n, t in taus.items()}
    return TrimmingPolicy.for_model(cfg, params, LayerTrim(float(default)), layers, calibration)


def _bisect(fraction_at, lo: float, hi: float, target: float, steps: int, names) -> dict[str, float]:
    """Smallest tau in (lo, hi] with fraction_at(tau) <= target (fraction falls as tau rises)."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if fraction_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return dict.fromkeys(names, hi)


def _greedy(probe, names, untrimmed: TrimStats, target: float, grid: int, steps: int) -> dict[str, float]:
    values = np.linspace(0.0, _TAU_MAX, grid + 1)
    taus, at = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    current = untrimmed
    while current.active_fraction > target:
        best = None
        for n in names:
            if at[n] == grid:
                continue
            trial = probe({**taus, n: float(values[at[n] + 1])})
            saved = current.active_fraction - trial.active_fraction
            cost = max(trial.loss - current.loss, 0.0)
            key = (saved <= 1e-12, cost / saved if saved > 1e-12 else 0.0)
            if best is None or key < best[0]:
                best = (key, n, trial)
        if best is None:  # every layer at tau max: the floor check makes this unreachable
            break
        _, n, trial = best
        previous = taus[n]
        at[n] += 1
        taus[n] = float(values[at[n]])
        if trial.active_fraction <= target:  # refine the move that crossed the target
            lo, hi = previous, taus[n]
            for _ in range(steps):
                mid = 0.5 * (lo + hi)
                if probe({**taus, n: mid}).active_fraction <= target:
                    hi = mid
                else:
                    lo = mid
            taus[n] = hi
            break
        current = trial
    return taus
