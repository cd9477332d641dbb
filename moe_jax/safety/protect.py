"""Safety-critical dims and experts, and pruning that keeps them.

Safety behaviour can live in a few units that utility-only pruning deletes (SAFEx: disabling
12 of 6,144 experts of Qwen3-30B-A3B cut refusals by 22%). Here a unit is safety-critical when
its Fisher importance on the safety domain (forbidden prompts with their refusal and benign
look-alikes with their answers, full-sequence loss) is among the highest:

  dims     the top `dim_fraction` of all routed-expert dims by safety Fisher;
  experts  the top `expert_fraction` of all experts by their summed safety Fisher.

Safety-aware pruning keeps them inside the same budget: `protect_scores` lifts the critical
dims above every other dim of the utility ranking (Fisher-MoE, any scope), and
`critical_experts` feeds `pruning.select(..., keep_experts=)` (Pathfinder and the expert
baselines). `mode="combine"` instead ranks dims by utility share + `weight` x safety share.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.pruning.plan import PruningPlan
from moe_jax.scoring.statistics import Scores

MODES = ("protect", "combine")


@dataclasses.dataclass
class SafetyCritical:
    dims: dict[int, np.ndarray]  # MoE layer -> (E, F_max) bool
    experts: dict[int, np.ndarray]  # MoE layer -> (E,) bool
    statistic: str

    @property
    def n_dims(self) -> int:
        return int(sum(d.sum() for d in self.dims.values()))

    @property
    def n_experts(self) -> int:
        return int(sum(e.sum() for e in self.experts.values()))

    def keep_experts(self) -> dict[int, list[int]]:
        return {lyr: [int(e) for e in np.flatnonzero(m)] for lyr, m in self.experts.items()}


def _fraction(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a fraction in [0, 1]")
    return v


def safety_critical(cfg: ModelConfig, safety_scores: Scores, *, statistic: str = "fisher",
                    dim_fraction: float = 0.05, expert_fraction: float = 0.125) -> SafetyCritical:
    """The units with the highest safety-domain importance (see the module docstring)."""
    dim_fraction, expert_fraction = _fraction("dim_fraction", dim_fraction), _fraction("expert_fraction",
                                                                                         expert_fraction)
    if statistic not in safety_scores:
        raise ValueError(f"safety scores hold no {statistic!r}; collect it on the safety domain "
                         f"(they have {list(safety_scores.names)})")
    safety_scores.check_model(cfg)
    per_layer = {lyr: _real(cfg, lyr, safety_scores[statistic][cfg.layer_name(lyr)]) for lyr in cfg.moe_layers}
    flat = np.concatenate([v[np.isfinite(v)] for v in per_layer.values()])
    n_dims = int(round(dim_fraction * flat.size))
    cut = np.sort(flat)[::-1][n_dims - 1] if n_dims else np.inf
    dims = {lyr: np.isfinite(v) & (v >= cut) for lyr, v in per_layer.items()}
    expert_sum = {lyr: np.nansum(v, axis=1) for lyr, v in per_layer.items()}
    pairs = sorted(((float(s), lyr, e) for lyr, v in expert_sum.items() for e, s in enumerate(v)), reverse=True)
    n_exp = int(round(expert_fraction * len(pairs)))
    experts = {lyr: np.zeros(cfg.experts_per_layer[lyr], bool) for lyr in cfg.moe_layers}
    for _, lyr, e in pairs[:n_exp]:
        experts[lyr][e] = True
    return SafetyCritical(dims, experts, statistic)


def _real(cfg: ModelConfig, layer: int, v: np.ndarray) -> np.ndarray:
    """(E, F_max) float64 with NaN beyond each expert's width."""
    v = np.asarray(v, np.float64).copy()
    for e, w in enumerate(cfg.expert_widths[layer]):
        v[e, w:] = np.nan
    return v


def protect_scores(cfg: ModelConfig, utility: Scores, critical: SafetyCritical, *, statistic: str = "fisher",
                   mode: str = "protect", safety: Scores | None = None, weight: float = 1.0) -> Scores:
    """A copy of `utility` whose `statistic` ranks the safety-critical dims first ("protect"), or
    mixes in the safety ranking ("combine": u / sum u + weight * s / sum s, needs `safety`)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if statistic not in utility:
        raise ValueError(f"utility scores hold no {statistic!r} (they have {list(utility.names)})")
    values = {k: dict(v) for k, v in utility.values.items()}
    layers = {lyr: _real(cfg, lyr, utility[statistic][cfg.layer_name(lyr)]) for lyr in cfg.moe_layers}
    if mode == "protect":
        top = max(float(np.nanmax(v)) for v in layers.values())
        new = {lyr: np.where(critical.dims[lyr], top + 1.0 + np.nan_to_num(v), v) for lyr, v in layers.items()}
    else:
        if safety is None:
            raise ValueError("mode='combine' needs the safety-domain scores (safety=)")
        s_layers = {lyr: _real(cfg, lyr, safety[statistic][cfg.layer_name(lyr)]) for lyr in cfg.moe_layers}
        u_tot = sum(float(np.nansum(v)) for v in layers.values()) or 1.0
        s_tot = sum(float(np.nansum(v)) for v in s_layers.values()) or 1.0
        new = {lyr: layers[lyr] / u_tot + float(weight) * s_layers[lyr] / s_tot for lyr in layers}
    values[statistic] = {cfg.layer_name(lyr): v for lyr, v in new.items()}
    meta = dict(utility.meta)
    meta["safety_aware"] = {"mode": mode, "critical_dims": critical.n_dims, "weight": float(weight)}
    return dataclasses.replace(utility, values=values, meta=meta)


def removed_by(plan: PruningPlan, critical: SafetyCritical) -> dict[str, Any]:
    """How many safety-critical dims and experts `plan` removes."""
    dims_removed = experts_removed = 0
    for lyr, crit in critical.dims.items():
        kept = set(plan.experts[lyr])
        for e in range(crit.shape[0]):
            idx = np.flatnonzero(crit[e])
            if e not in kept:
                dims_removed += len(idx)
            else:
                dims_removed += len(set(map(int, idx)) - set(plan.dims[lyr][e]))
        experts_removed += sum(1 for e in np.flatnonzero(critical.experts[lyr]) if int(e) not in kept)
    return {"critical_dims": critical.n_dims, "critical_dims_removed": dims_removed,
            "critical_experts": critical.n_experts, "critical_experts_removed": experts_removed}

