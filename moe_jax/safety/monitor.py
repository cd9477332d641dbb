"""A routing-anomaly monitor: score each prompt's routing against calibration statistics.

Two features per prompt, averaged over its real tokens, MoE layers and executed experts:

  surprisal  -log q(e): q the router's own probability of the expert that ran, recomputed from
             the MoE input (softmax of the router logits; sigmoid scores normalised for sigmoid
             routers). Routes the router did not choose (forced routes) are improbable to it.
  rarity     -log p(e | layer): p the expert's share of routed slots on calibration prompts
             (add-one smoothed). Input-side attacks that wake rarely used experts show here.

Each feature is z-scored with the calibration prompts' mean and spread; a prompt's score is
the larger z, and it is flagged when the score exceeds the calibration scores' (1 - fpr)
quantile: floor(fpr * n) of the n calibration prompts score above it (fewer only on ties).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model import transformer
from moe_jax.reporting import atomic_write
from moe_jax.safety import routes as R

FEATURES = ("surprisal", "rarity")
_EPS = 1e-12


def _routing(cfg: ModelConfig, params, rows: R.Rows, masks: Mapping | None) -> dict:
    _, aux = transformer.forward(cfg, params, jnp.asarray(rows.tokens_BT), masks,
                                 attention_mask=jnp.asarray(rows.attn_BT), capture=("routing", "moe_inputs"))
    return jax.tree_util.tree_map(np.asarray, aux)


def _router_probs(cfg: ModelConfig, params, layer: int, x_BTD: np.ndarray, masks: Mapping | None) -> np.ndarray:
    """The router's own (B, T, E) probabilities, pruning masks applied, forcing ignored."""
    name = cfg.layer_name(layer)
    logits = np.asarray(x_BTD, np.float64) @ np.asarray(params[name]["moe"]["router"]["kernel"], np.float64)
    keep = (masks or {}).get(name, {}).get("experts")
    if keep is not None:
        logits = np.where(np.asarray(keep) > 0, logits, -np.inf)
    if cfg.router_score == "softmax":
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z)
    else:
        p = np.where(np.isneginf(logits), 0.0, 1.0 / (1.0 + np.exp(-logits)))
    return p / p.sum(-1, keepdims=True)


def usage(cfg: ModelConfig, aux: Mapping, attn_BT: np.ndarray) -> list[np.ndarray]:
    """Per MoE layer (E,) counts of executed routed slots over real tokens."""
    out = []
    for lyr in cfg.moe_layers:
        ran = R.executed_experts(aux[cfg.layer_name(lyr)])[attn_BT]
        out.append(np.bincount(ran[ran >= 0], minlength=cfg.experts_per_layer[lyr]).astype(np.float64))
    return out


def features(cfg: ModelConfig, params, rows: R.Rows, usage_counts: Sequence[np.ndarray],
             masks: Mapping | None = None) -> np.ndarray:
    """(B, 2) [surprisal, rarity] per row (see the module docstring)."""
    aux = _routing(cfg, params, rows, masks)
    B = len(rows.tokens_BT)
    sur, rar, n = np.zeros(B), np.zeros(B), np.zeros(B)
    for li, lyr in enumerate(cfg.moe_layers):
        a = aux[cfg.layer_name(lyr)]
        ran_BTK = R.executed_experts(a)
        q_BTE = _router_probs(cfg, params, lyr, a["x"], masks)
        q_BTK = np.take_along_axis(q_BTE, np.maximum(ran_BTK, 0), axis=-1)
        share = (usage_counts[li] + 1.0) / (usage_counts[li].sum() + len(usage_counts[li]))
        valid = (ran_BTK >= 0) & rows.attn_BT[..., None]
        sur += np.where(valid, -np.log(q_BTK + _EPS), 0.0).sum((1, 2))
        rar += np.where(valid, -np.log(share[np.maximum(ran_BTK, 0)]), 0.0).sum((1, 2))
        n += valid.sum((1, 2))
    n = np.maximum(n, 1)
    return np.stack([sur / n, rar / n], axis=1)


@dataclasses.dataclass
class RoutingMonitor:
    usage: list[np.ndarray]  # per MoE layer, calibration routed-slot counts
    mean: np.ndarray  # (2,) calibration feature means
    std: np.ndarray  # (2,)
    threshold: float
    fpr: float
    calibration_scores: np.ndarray  # (N,)

    @classmethod
    def fit(cls, cfg: ModelConfig, params, rows: R.Rows, *, fpr: float = 0.05, masks: Mapping | None = None
            ) -> RoutingMonitor:
        """Calibrate on clean prompts `rows` (their routing defines normal)."""
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"monitor fpr={fpr!r}: expected a fraction in (0, 1)")
        if len(rows.tokens_BT) < 2:
            raise ValueError(f"monitor: need >= 2 calibration prompts, got {len(rows.tokens_BT)}")
        counts = usage(cfg, _routing(cfg, params, rows, masks), rows.attn_BT)
        f = features(cfg, params, rows, counts, masks)
        mean, std = f.mean(0), np.maximum(f.std(0), _EPS)
        scores = ((f - mean) / std).max(1)
        n_flag = int(np.floor(fpr * len(scores) + 1e-9))  # flag exactly this many calibration prompts (no ties)
        threshold = float(np.sort(scores)[len(scores) - n_flag - 1])
        return cls(counts, mean, std, threshold, float(fpr), scores)

    def score(self, cfg: ModelConfig, params, rows: R.Rows, masks: Mapping | None = None) -> np.ndarray:
        f = features(cfg, params, rows, self.usage, masks)
        return ((f - self.mean) / self.std).max(1)

    def flag(self, cfg: ModelConfig, params, rows: R.Rows, masks: Mapping | None = None) -> np.ndarray:
        return self.score(cfg, params, rows, masks) > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "usage": [u.tolist() for u in self.usage], "mean": self.mean.tolist(),
                "std": self.std.tolist(), "threshold": self.threshold, "fpr": self.fpr,
                "calibration_scores": self.calibration_scores.tolist()}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingMonitor:
        try:
            d = json.loads(open(path).read())
            return cls([np.asarray(u) for u in d["usage"]], np.asarray(d["mean"]), np.asarray(d["std"]),
                       float(d["threshold"]), float(d["fpr"]), np.asarray(d["calibration_scores"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a routing monitor file ({err})") from None


def detection_rates(monitor: RoutingMonitor, cfg: ModelConfig, params, attacked: R.Rows, attacked_masks,
                    clean: R.Rows, masks: Mapping | None = None) -> dict[str, float]:
    """TPR on attacked rows (run under `attacked_masks`), FPR on held-out clean rows."""
    tpr = float(monitor.flag(cfg, params, attacked, attacked_masks).mean())
    fpr = float(monitor.flag(cfg, params, clean, masks).mean())
    return {"tpr": tpr, "fpr": fpr, "calibration_fpr": float((monitor.calibration_scores > monitor.threshold).mean()),
            "n_attacked": len(attacked.tokens_BT), "n_clean": len(clean.tokens_BT)}
