"""Whole-expert pruning: Pathfinder and the expert-level baselines, as `PruningPlan`s.

Methods (``ratio`` = fraction of routed experts removed):
  pathfinder  experts on the most calibration trajectories, weighted by what breaking
              them costs in each layer (`pathfinder.py`)
  frequency   most routed tokens                     soft_count  most router probability mass
  reap        largest mean g * ||f_e(x)|| (REAP)     recon       largest routed reconstruction error
  naee        per layer, the subset whose outputs best reconstruct the full layer's on a token
              sample (NAEE): exhaustive when C(E, r) <= 10,000, greedy backward elimination beyond
  random      seeded
Allocations: "uniform" (each layer removes the same share) and "global" (one budget over the
model; every layer keeps >= top_k; signals compared across layers as they are: counts and
probability mass have the same total in every layer, REAP's and recon's output norms do not,
so these two move experts to the layers whose experts change the output most). NAEE is per
layer, so uniform only.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model import moe
from moe_jax.pruning import pathfinder as pf
from moe_jax.pruning.plan import PlanError, PruningPlan
from moe_jax.scoring.statistics import Scores

EXPERT_METHODS = ("pathfinder", "frequency", "soft_count", "reap", "recon", "naee", "random_experts")
ALLOCATIONS = ("uniform", "global")
NAEE_EXHAUSTIVE_LIMIT = 10_000
_SIGNAL = {"frequency": "expert_count", "soft_count": "expert_prob_mass", "reap": "expert_reap",
           "recon": "expert_recon_routed"}


def select_experts(cfg: ModelConfig, scores: Scores, method: str, allocation: str, ratio: float, *,
                   params: dict | None = None, settings: pf.PathfinderSettings | None = None,
                   seed: int = 0, keep_experts: Mapping[int, Sequence[int]] | None = None) -> PruningPlan:
    """A plan keeping whole experts (all their dims) chosen by `method` under `allocation`.

    keep_experts: {layer: expert ids} always kept, inside the same budget (e.g. the
    safety-critical experts of `moe_jax.safety.protect`)."""
    if method not in EXPERT_METHODS:
        raise PlanError(f"method={method!r}: expected one of {EXPERT_METHODS}")
    if allocation not in ALLOCATIONS:
        raise PlanError(f"allocation={allocation!r} for expert pruning: expected one of {ALLOCATIONS}")
    names = [cfg.layer_name(i) for i in cfg.moe_layers]
    meta: dict[str, Any] = {"unit": "experts"}
    if method == "pathfinder":
        settings = settings or pf.PathfinderSettings()
        visits = pf.path_visits(cfg, scores, settings)
        priority = pf.path_priority(cfg, scores, settings, visits)
        tiebreak = [np.asarray(scores["seq_prob_mass"][n]).sum(0) for n in names]
        kept = pf.keep_by_priority(cfg, priority, tiebreak, ratio, allocation,
                                   _forced(cfg, pf.force_keep(cfg, scores, settings.force_keep_z), keep_experts))
        meta["path_frequency"] = [v.sum(0).tolist() for v in visits]
        meta["path_priority"] = [p.tolist() for p in priority]
    elif method == "naee":
        if allocation != "uniform":
            raise PlanError("naee searches each layer separately: use allocation 'uniform'")
        if keep_experts:
            raise PlanError("naee's exhaustive subset search takes no keep_experts; use another method")
        if params is None:
            raise PlanError("naee needs the model params (it runs the experts on the calibration sample)")
        kept, errors = {}, {}
        for lyr in cfg.moe_layers:
            n_keep = cfg.experts_per_layer[lyr] - int(round(ratio * cfg.experts_per_layer[lyr]))
            kept[lyr], errors[lyr] = naee_layer(cfg, params, lyr, _sample(scores, cfg.layer_name(lyr)), n_keep)
        meta["naee_error"] = errors
    else:
        if method == "random_experts":
            rng = np.random.default_rng([seed, 4242])
            priority = [rng.uniform(size=cfg.experts_per_layer[i]) for i in cfg.moe_layers]
        else:
            if _SIGNAL[method] not in scores:
                raise PlanError(f"method {method!r} needs the statistic {_SIGNAL[method]!r}; collect "
                                f"{'routing' if method in ('frequency', 'soft_count', 'reap') else 'trajectory'}")
            priority = [np.asarray(scores[_SIGNAL[method]][n], np.float64) for n in names]
        kept = pf.keep_by_priority(cfg, priority, [np.zeros_like(p) for p in priority], ratio, allocation,
                                   _forced(cfg, None, keep_experts))
    widths = {i: tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
    dims = {i: {e: tuple(range(widths[i][e])) for e in kept[i]} for i in cfg.moe_layers}
    plan = PruningPlan(method, allocation, float(ratio), widths, {i: tuple(kept[i]) for i in cfg.moe_layers}, dims,
                       {**meta, "calibration_sequences": scores.num_sequences})
    plan.check(cfg)
    return plan


def _forced(cfg: ModelConfig, outliers: list[np.ndarray] | None,
            keep_experts: Mapping[int, Sequence[int]] | None) -> list[np.ndarray] | None:
    """Union of Pathfinder's outlier force-keep and the caller's `keep_experts`, per MoE layer."""
    if not keep_experts:
        return outliers
    out = []
    for i, lyr in enumerate(cfg.moe_layers):
        f = np.zeros(cfg.experts_per_layer[lyr], bool) if outliers is None else np.asarray(outliers[i], bool).copy()
        for e in keep_experts.get(lyr, ()):
            if not 0 <= int(e) < len(f):
                raise PlanError(f"keep_experts: expert {e} does not exist in MoE layer {lyr} ({len(f)} experts)")
            f[int(e)] = True
        out.append(f)
    bad = sorted(set(map(int, keep_experts)) - set(cfg.moe_layers))
    if bad:
        raise PlanError(f"keep_experts names layers {bad} that are not MoE layers ({list(cfg.moe_layers)})")
    return out


def _sample(scores: Scores, name: str) -> np.ndarray:
    if "moe_input_sample" not in scores or not len(scores["moe_input_sample"][name]):
        raise PlanError("naee needs MoE inputs of calibration tokens: collect with 'trajectory' (empty sample)")
    return np.asarray(scores["moe_input_sample"][name], np.float32)


def naee_layer(cfg: ModelConfig, params: dict, layer: int, x_ND: np.ndarray, n_keep: int
               ) -> tuple[tuple[int, ...], float]:
    """The n_keep experts whose routing-restricted output is closest (mean squared) to the full one."""
    E, K = cfg.experts_per_layer[layer], cfg.num_experts_per_tok
    if n_keep < K:
        raise PlanError(f"naee: layer {layer} would keep {n_keep} experts, fewer than top_k={K}")
    moe_params = params[cfg.layer_name(layer)]["moe"]
    x_ND = jnp.asarray(x_ND, jnp.float32)
    outs_END = _every_expert_output(cfg, layer, moe_params["experts"], x_ND)

    def errors(masks_ME: np.ndarray, batch: int) -> np.ndarray:
        """Padded to `batch` rows, so every call of a search runs one compiled program."""
        padded = np.concatenate([masks_ME, np.repeat(masks_ME[:1], batch - len(masks_ME), 0)])
        return np.asarray(_subset_errors(cfg, layer, moe_params, x_ND, outs_END, jnp.asarray(padded)))[:len(masks_ME)]

    if math.comb(E, n_keep) <= NAEE_EXHAUSTIVE_LIMIT:
        subsets = np.array(list(itertools.combinations(range(E), n_keep)))
        masks = np.zeros((len(subsets), E), np.float32)
        np.put_along_axis(masks, subsets, 1.0, axis=1)
        batch = min(256, len(masks))
        errs = np.concatenate([errors(masks[i:i + batch], batch) for i in range(0, len(masks), batch)])
        best = int(np.argmin(errs))
        return tuple(int(e) for e in subsets[best]), float(errs[best])
    keep = list(range(E))
    err = float("nan")
    while len(keep) > n_keep:  # greedy: drop the expert whose removal hurts least
        masks = np.zeros((len(keep), E), np.float32)
        for i, drop in enumerate(keep):
            masks[i, [e for e in keep if e != drop]] = 1.0
        errs = errors(masks, E)
        i = int(np.argmin(errs))
        err = float(errs[i])
        keep.pop(i)
    return tuple(keep), err


def _every_expert_output(cfg: ModelConfig, layer: int, experts: Mapping[str, Any], x_ND: jax.Array) -> jax.Array:
    """(E, N, D): every expert's output on every sample token, in one dispatch (each token routed
    to all E experts with weight 1)."""
    E, N = cfg.experts_per_layer[layer], x_ND.shape[0]
    every_NE = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (N, E))
    _, stats = moe.experts_forward(cfg, layer, experts, x_ND, (every_NE, jnp.ones((N, E), jnp.float32)),
                                   per_choice=True)
    return jnp.swapaxes(stats["out_TKD"], 0, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _subset_errors(cfg: ModelConfig, layer: int, moe_params, x_ND, outs_END, masks_ME) -> jax.Array:
    """(M,) mean ||y_full - y_subset||^2 over the sample, routing re-run with each subset's mask."""
    E, N = outs_END.shape[:2]

    def output(expert_mask_E):
        mask_NE = None if expert_mask_E is None else jnp.broadcast_to(expert_mask_E, (N, E))
        r = moe.route(cfg, layer, moe_params, x_ND, expert_mask=mask_NE)
        picked_NKD = outs_END[r.idx_TK, jnp.arange(N)[:, None]]
        return jnp.einsum("nk,nkd->nd", r.weights_TK, picked_NKD)

    full_ND = output(None)
    return jax.vmap(lambda m: jnp.mean(jnp.sum((output(m) - full_ND) ** 2, -1)))(masks_ME)
