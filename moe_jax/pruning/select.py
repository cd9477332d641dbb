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

`width_multiple` N > 1 makes every kept expert width a multiple of N (or the whole original
width): dims are then kept in blocks of an expert's N next-best dims, blocks ranked by their mean
score, so the budget is met as closely as N allows (the plan's meta records N and the fraction
actually removed). Kernels want it: transformers' grouped_mm needs each expert's width in bytes
to be a multiple of 16 (N = 8 covers bfloat16 and float32); GPU GEMM tiles want 64-128 rows.
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
           pathfinder=None, seed: int = 0, keep_experts=None, width_multiple: int = 1) -> PruningPlan:
    """A `PruningPlan` that removes `ratio` of the routed-expert dims ranked by ``scores[method]``.

    Whole-expert methods (`EXPERT_METHODS`: "pathfinder", "frequency", "reap", "naee",
    ...) remove `ratio` of the experts instead; their scope is the allocation, "uniform" or
    "global". `params` (NAEE), `pathfinder` (`PathfinderSettings`), `seed` and `keep_experts`
    ({layer: ids} always kept, within the budget) serve those; they keep whole widths, so any
    `width_multiple` holds for them.
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
    multiple = check_width_multiple(cfg, width_multiple)
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
        kept.update(_select_group(group, per_expert, ratio, floor, scope, multiple))
    experts, dims, restored = {}, {}, 0
    for lyr in layers:
        live = [e for e in range(cfg.experts_per_layer[lyr]) if len(kept[(lyr, e)])]
        if len(live) < cfg.num_experts_per_tok:  # drop_empty_experts went too far: revive the best
            dead = sorted((e for e in range(cfg.experts_per_layer[lyr]) if not len(kept[(lyr, e)])),
                          key=lambda e: -per_expert[(lyr, e)].max())
            for e in dead[:cfg.num_experts_per_tok - len(live)]:  # its best dims, one block of them
                kept[(lyr, e)] = np.argsort(-per_expert[(lyr, e)], kind="stable")[:multiple]
                restored += 1
            live = [e for e in range(cfg.experts_per_layer[lyr]) if len(kept[(lyr, e)])]
        experts[lyr] = tuple(live)
        dims[lyr] = {e: tuple(int(j) for j in np.sort(kept[(lyr, e)])) for e in live}
    plan = PruningPlan(method, scope, ratio, {lyr: tuple(cfg.expert_widths[lyr]) for lyr in layers}, experts, dims,
                       {"min_dims_per_expert": floor, "drop_empty_experts": bool(drop_empty_experts),
                        "experts_revived_for_top_k": restored, "calibration_sequences": scores.num_sequences,
                        "calibration_tokens": scores.num_tokens, "width_multiple": multiple})
    plan.check(cfg)
    plan.meta["dims_removed"] = plan.dims_removed_fraction()  # what the multiple let the ratio become
    return plan


def check_width_multiple(cfg: ModelConfig, width_multiple) -> int:
    """A positive integer no larger than any routed expert's width."""
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, (int, np.integer)) or width_multiple < 1:
        raise PlanError(f"width_multiple={width_multiple!r}: expected a positive integer (1 = any width)")
    for lyr in cfg.moe_layers:
        for e, w in enumerate(cfg.expert_widths[lyr]):
            if w < width_multiple:
                raise PlanError(f"width_multiple={width_multiple} is larger than the width {w} of expert {e} in "
                                f"{cfg.layer_name(lyr)}: no kept width could be a multiple of it (1 keeps any width)")
    return int(width_multiple)


def _select_group(group, per_expert, ratio, floor, scope, multiple=1):
    """Keep the best `total - round(ratio * total)` dims of the group, `floor` per expert reserved
    (in blocks of `multiple` when it is > 1)."""
    total = sum(len(per_expert[k]) for k in group)
    n_keep = total - int(round(ratio * total))
    if multiple > 1:
        return _select_blocks(group, per_expert, n_keep, floor, scope, multiple, ratio)
    reserved = {k: np.argsort(-per_expert[k], kind="stable")[:min(floor, len(per_expert[k]))] for k in group}
    n_reserved = sum(len(v) for v in reserved.values())
    if n_reserved > n_keep:
        if scope == "expert":  # the floor wins over the ratio for a single expert
            return reserved
        raise _floor_error(ratio, n_keep, total, scope, floor, len(group))
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


def _floor_error(ratio, n_keep, total, scope, floor, n_experts, multiple=1) -> PlanError:
    least = f"min_dims_per_expert={floor}" + (f" (one block of width_multiple={multiple})" if multiple > 1 else "")
    return PlanError(f"ratio={ratio}: keeping {n_keep} of {total} dims in the {scope} scope leaves fewer than "
                     f"{least} for each of its {n_experts} experts; lower the ratio, the floor or the multiple, "
                     "or use drop_empty_experts=True")


def _select_blocks(group, per_expert, n_keep, floor, scope, multiple, ratio):
    """Blocks of an expert's `multiple` next-best dims (its last block: what is left), ranked by mean
    score; within an expert block means never rise, so taking blocks greedily keeps each expert's
    best dims and every kept width a multiple of `multiple` or the whole width. Greedy while the
    budget holds, then one more block if that lands closer to it."""
    out, blocks = {}, []
    n_reserved_blocks = 0 if floor == 0 else -(-floor // multiple)
    for i, k in enumerate(group):
        order = np.argsort(-per_expert[k], kind="stable")
        chunks = [order[s:s + multiple] for s in range(0, len(order), multiple)]
        out[k] = [j for c in chunks[:n_reserved_blocks] for j in c]
        blocks += [(-float(per_expert[k][c].mean()), i, n, c) for n, c in enumerate(chunks[n_reserved_blocks:])]
    kept = sum(len(v) for v in out.values())
    if kept > n_keep:
        if scope == "expert":
            return {k: np.asarray(v, np.int64) for k, v in out.items()}
        raise _floor_error(ratio, n_keep, sum(len(per_expert[k]) for k in group), scope, floor, len(group),
                           multiple)
    closed = set()  # experts whose next block was refused: their later blocks may not be taken
    for _, i, _, c in sorted(blocks, key=lambda b: (b[0], b[1], b[2])):
        if i in closed:
            continue
        if kept + len(c) <= n_keep or kept + len(c) - n_keep < n_keep - kept:
            out[group[i]].extend(c)
            kept += len(c)
        else:
            closed.add(i)
        if kept >= n_keep:
            break
    return {k: np.asarray(v, np.int64) for k, v in out.items()}
