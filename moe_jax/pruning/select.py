"""Which intermediate dims to keep: rank by a statistic, within an expert, a layer or the model.

Scopes (Fisher-MoE's IntDim-E / -L / -G):
  expert  every expert drops the same fraction of its own dims (uniform widths stay uniform,
          so the result is stock-loadable);
  layer   a layer's dims compete with each other; each layer drops `ratio` of its dims;
  global  all routed dims of the model compete; layers and experts keep what they need.

`ratio` is the fraction of routed-expert intermediate dims removed (rounded per unit of
scope). Higher score = more important. Each expert keeps at least `min_dims_per_expert`
dims (its best ones) unless `drop_empty_experts`, which instead removes experts left
without dims, while never leaving a layer with fewer than top_k experts. Shared experts are
never touched.
"""

from __future__ import annotations

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.pruning.experts import EXPERT_METHODS, select_experts
from moe_jax.pruning.plan import PlanError, PruningPlan
from moe_jax.scoring.statistics import Scores, ScoringError

SCOPES = ("expert", "layer", "global")


def check_ratio(ratio) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise PlanError(f"ratio={ratio!r}: expected a number in [0, 1)") from None
    if not 0.0 <= r < 1.0 or r != r:
        raise PlanError(f"ratio={ratio!r}: the fraction of dims removed must lie in [0, 1)")
    return r


def select(cfg: ModelConfig, scores: Scores, method: str = "fisher", scope: str = "global", ratio: float = 0.5,
           *, min_dims_per_expert: int = 1, drop_empty_experts: bool = False, params: dict | None = None,
           pathfinder=None, seed: int = 0, keep_experts=None) -> PruningPlan:
    """A `PruningPlan` that removes `ratio` of the routed-expert dims ranked by ``scores[method]``.

    Whole-expert methods (`EXPERT_METHODS`: "pathfinder", "frequency", "reap", "naee",
    ...) remove `ratio` of the experts instead; their scope is the allocation, "uniform" or
    "global". `params` (NAEE), `pathfinder` (`PathfinderSettings`), `seed` and `keep_experts`
    ({layer: ids} always kept, within the budget) serve those.
    """
    ratio = check_ratio(ratio)
    if method in EXPERT_METHODS:
        try:
            scores.check_model(cfg)
        except ScoringError as err:
            raise PlanError(str(err)) from None
        return select_experts(cfg, scores, method, scope, ratio, params=params, settings=pathfinder,
                              seed=seed, keep_experts=keep_experts)
    if keep_experts:
        raise PlanError(f"keep_experts applies to whole-expert methods {EXPERT_METHODS}, not {method!r}")
    if scope not in SCOPES:
        raise PlanError(f"scope={scope!r}: expected one of {SCOPES}")
    if method not in scores:
        raise PlanError(f"method={method!r}: the scores hold no such statistic; they have {list(scores.names)}")
    try:
        scores.check_model(cfg)
        scores.check_finite()
    except ScoringError as err:
        raise PlanError(str(err)) from None
    floor = 0 if drop_empty_experts else int(min_dims_per_expert)
    if floor < 0:
        raise PlanError(f"min_dims_per_expert={min_dims_per_expert}: must be >= 0")
    layers = list(cfg.moe_layers)
    # units: (layer, expert, dim index, score) flattened per scope group
    per_expert = {(lyr, e): np.asarray(scores[method][cfg.layer_name(lyr)][e, :w], np.float64)
                  for lyr in layers for e, w in enumerate(cfg.expert_widths[lyr])}
    if scope == "expert":
        groups = [[key] for key in per_expert]
    elif scope == "layer":
        groups = [[(lyr, e) for e in range(cfg.experts_per_layer[lyr])] for lyr in layers]
    else:
        groups = [list(per_expert)]
    kept: dict[tuple[int, int], np.ndarray] = {}
    for group in groups:
        kept.update(_select_group(group, per_expert, ratio, floor, scope))
    experts, dims, restored = {}, {}, 0
    for lyr in layers:
        live = [e for e in range(cfg.experts_per_layer[lyr]) if len(kept[(lyr, e)])]
        if len(live) < cfg.num_experts_per_tok:  # drop_empty_experts went too far: revive the best
            dead = sorted((e for e in range(cfg.experts_per_layer[lyr]) if not len(kept[(lyr, e)])),
                          key=lambda e: -per_expert[(lyr, e)].max())
            for e in dead[:cfg.num_experts_per_tok - len(live)]:
                kept[(lyr, e)] = np.array([int(per_expert[(lyr, e)].argmax())])
                restored += 1
            live = [e for e in range(cfg.experts_per_layer[lyr]) if len(kept[(lyr, e)])]
        experts[lyr] = tuple(live)
        dims[lyr] = {e: tuple(int(j) for j in np.sort(kept[(lyr, e)])) for e in live}
    plan = PruningPlan(method, scope, ratio, {lyr: tuple(cfg.expert_widths[lyr]) for lyr in layers}, experts, dims,
                       {"min_dims_per_expert": floor, "drop_empty_experts": bool(drop_empty_experts),
                        "experts_revived_for_top_k": restored, "calibration_sequences": scores.num_sequences,
                        "calibration_tokens": scores.num_tokens})
    plan.check(cfg)
    return plan


def _select_group(group, per_expert, ratio, floor, scope):
    """Keep the best `total - round(ratio * total)` dims of the group, `floor` per expert reserved."""
    total = sum(len(per_expert[k]) for k in group)
    n_keep = total - int(round(ratio * total))
    reserved = {k: np.argsort(-per_expert[k], kind="stable")[:min(floor, len(per_expert[k]))] for k in group}
    n_reserved = sum(len(v) for v in reserved.values())
    if n_reserved > n_keep:
        if scope == "expert":  # the floor wins over the ratio for a single expert
            return reserved
        raise PlanError(f"ratio={ratio}: keeping {n_keep} of {total} dims in the {scope} scope leaves fewer than "
                        f"min_dims_per_expert={floor} for each of its {len(group)} experts; lower the ratio or "
                        "the floor, or use drop_empty_experts=True")
    keys, idx, vals = [], [], []
    for i, k in enumerate(group):
        free = np.ones(len(per_expert[k]), bool)
        free[reserved[k]] = False
        j = np.flatnonzero(free)
        keys.append(np.full(len(j), i))
        idx.append(j)
        vals.append(per_expert[k][j])
    keys, idx, vals = np.concatenate(keys), np.concatenate(idx), np.concatenate(vals)
    best = np.argsort(-vals, kind="stable")[:n_keep - n_reserved]
    out = {k: list(reserved[k]) for k in group}
    for b in best:
        out[group[keys[b]]].append(idx[b])
    return {k: np.asarray(v, np.int64) for k, v in out.items()}
