"""MoE Pathfinder: experts chosen by the trajectories tokens take through the layers.

The MoE is a layered graph: source -> experts of MoE layer 1 -> ... -> experts of the last
MoE layer -> sink. For each calibration sequence the node weight of expert e in layer l is

    w_prob * log p(e) + w_strength * log a(e) + w_recon * log softmax(z(e) / tau)

with p the sequence's router probability mass, a its activation strength (sum of
g * ||f_e(x)||; each normalised over the layer's experts), and z the expert's reconstruction
signal scaled by the layer mean: the `routed` error of removing e (large = important) or the
reference code's `dense` error ||y - f_e(x)|| (small = important, so z = -error). An edge
i -> j between consecutive MoE layers weighs w_transition * log P(j | i), the calibration
tokens' transition frequencies (add-one smoothed).

Selection: each sequence's paths are counted per expert, either as the expected visits of a
path drawn from its whole path distribution ("posterior", `path_posterior`) or over its k best
paths ("k_best", `k_best_paths`: the reference code's, winner-take-all). Each visit is priced
by what breaking the trajectory there costs (`path_priority`: the expert's routed
reconstruction error per token, "expert"; the layer's, "recon"; none), because path counts give
every layer the same total and a global budget must tell the layers apart. Experts are kept by
priority up to one global budget, never fewer than top_k per layer, so layers end up with
different expert counts. `layer_scale="none"`, `counting="k_best"`, `w_strength=1` is the
reference's selection; why the defaults differ, with the evidence: docs/pathfinder.md.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.pruning.plan import PlanError
from moe_jax.scoring.statistics import Scores

_EPS = 1e-6
LAYER_SCALES = ("expert", "recon", "none")


@dataclasses.dataclass(frozen=True)
class PathfinderSettings:
    w_prob: float = 1.0
    w_strength: float = 0.0  # 1.0 in the reference code; see the module docstring
    w_recon: float = 1.0
    w_transition: float = 1.0
    tau: float = 1.0
    recon: str = "routed"  # or "dense" (needs the "recon_dense" statistic)
    path_topk: int = 10
    counting: str = "posterior"  # or "k_best": each sequence's path_topk best paths (the reference)
    layer_scale: str = "expert"  # or "recon", "none": what a visit costs (`path_priority`)
    max_sequences: int = 0  # 0: every calibration sequence gets its own graph
    force_keep_z: float = 0.0  # > 0: keep experts whose probability mass z-score in their layer exceeds it


def k_best_paths(node: Sequence[np.ndarray], edge: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest-scoring paths through a layered graph, best first.

    node[l]: (E_l,) log weights; edge[l]: (E_l, E_{l+1}) log weights. Returns (paths (k', L)
    int, scores (k',)) with k' = min(k, number of paths). Per layer it keeps, for every node,
    the k best partial paths ending there: O(sum_l E_l * E_{l+1} * k).
    """
    if k < 1 or not node:
        raise PlanError(f"k_best_paths: need k >= 1 and at least one layer (k={k}, layers={len(node)})")
    best = np.asarray(node[0], np.float64)[:, None]  # (E_0, kk): the kk best partial paths ending at each node
    backs = []
    for lyr in range(1, len(node)):
        e_prev, kk = best.shape
        # (E_l, E_prev * kk), rows contiguous so the per-node top-k is a fast row-wise partition.
        cand = (np.asarray(edge[lyr - 1], np.float64).T[:, :, None] + best[None, :, :]).reshape(-1, e_prev * kk)
        keep = min(k, cand.shape[1])
        top = (np.argpartition(-cand, keep - 1, axis=1)[:, :keep] if keep < cand.shape[1]
               else np.broadcast_to(np.arange(cand.shape[1]), cand.shape))
        vals = np.take_along_axis(cand, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        top, vals = np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)
        backs.append((top, kk))  # (E_l, keep): flat index into (E_prev, kk_prev)
        best = vals + np.asarray(node[lyr], np.float64)[:, None]
    flat = best.reshape(-1)
    keep = min(k, flat.size)
    final = np.argsort(-flat, kind="stable")[:keep]
    kk_last = best.shape[1]
    paths = np.zeros((keep, len(node)), np.int64)
    for p, f in enumerate(final):
        e, j = divmod(int(f), kk_last)
        paths[p, -1] = e
        for lyr in range(len(node) - 1, 0, -1):
            back, kk_prev = backs[lyr - 1]
            prev = int(back[e, j])
            e, j = divmod(prev, kk_prev)
            paths[p, lyr - 1] = e
    return paths, flat[final]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def path_posterior(node: Sequence[np.ndarray], edge: Sequence[np.ndarray]) -> list[np.ndarray]:
    """P(a path visits expert e of layer l) when path ~ exp(path score): forward-backward.

    node[l]: (..., E_l) log weights (leading axes, e.g. sequences, are batched); edge[l]:
    (E_l, E_{l+1}). Returns per layer (..., E_l) marginals summing to 1 over E_l: the expected
    visits of one path drawn from the whole path distribution, the soft limit of counting
    the k best paths (which gives a node nothing unless it tops some sequence).
    O(sum_l E_l * E_{l+1}) per sequence.
    """
    if not node:
        raise PlanError("path_posterior: the graph has no layers")
    fwd = [np.asarray(node[0], np.float64)]
    for lyr in range(1, len(node)):
        e = np.asarray(edge[lyr - 1], np.float64)
        fwd.append(_logsumexp(fwd[-1][..., :, None] + e, axis=-2) + np.asarray(node[lyr], np.float64))
    bwd = [np.zeros_like(fwd[-1])]
    for lyr in range(len(node) - 1, 0, -1):
        e = np.asarray(edge[lyr - 1], np.float64)
        nxt = bwd[0] + np.asarray(node[lyr], np.float64)
        bwd.insert(0, _logsumexp(e + nxt[..., None, :], axis=-1))
    log_z = _logsumexp(fwd[-1], axis=-1)[..., None]
    return [np.exp(f + b - log_z) for f, b in zip(fwd, bwd)]


def _normalised(v: np.ndarray) -> np.ndarray:
    total = v.sum(-1, keepdims=True)
    return v / np.where(total > 0, total, 1.0)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def graph(cfg: ModelConfig, scores: Scores, settings: PathfinderSettings) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(node log weights per layer, (S, E_l) each; edge log weights (E_l, E_{l+1})) from the scores."""
    need = ["seq_prob_mass", "seq_strength", "seq_recon_routed", "transitions"]
    if settings.recon == "dense":
        need.append("expert_recon_dense")
    elif settings.recon != "routed":
        raise PlanError(f"pathfinder: recon={settings.recon!r}; expected 'routed' or 'dense'")
    missing = [n for n in need if n not in scores]
    if missing:
        raise PlanError(f"pathfinder needs the statistics {missing}: collect with 'trajectory'"
                        + (" and 'recon_dense'" if settings.recon == "dense" else ""))
    names = [cfg.layer_name(i) for i in cfg.moe_layers]
    S = len(scores["seq_prob_mass"][names[0]])
    if S == 0:
        raise PlanError("pathfinder: the scores hold no calibration sequences (empty trajectory set)")
    take = slice(None) if not settings.max_sequences else slice(0, settings.max_sequences)
    nodes = []
    for name in names:
        p = _normalised(np.asarray(scores["seq_prob_mass"][name])[take])
        a = _normalised(np.asarray(scores["seq_strength"][name])[take])
        if settings.recon == "routed":
            r = np.asarray(scores["seq_recon_routed"][name])[take]
            z = r / np.maximum(r.mean(-1, keepdims=True), _EPS)
        else:
            d = np.asarray(scores["expert_recon_dense"][name])[None, :]
            z = np.broadcast_to(-d / max(float(d.mean()), _EPS), p.shape)
        nodes.append(settings.w_prob * np.log(p + _EPS) + settings.w_strength * np.log(a + _EPS)
                     + settings.w_recon * _log_softmax(z / settings.tau))
    edges = []
    for name in names[:-1]:
        t = np.asarray(scores["transitions"][name], np.float64) + 1.0
        edges.append(settings.w_transition * np.log(t / t.sum(-1, keepdims=True)))
    return nodes, edges


def path_visits(cfg: ModelConfig, scores: Scores, settings: PathfinderSettings) -> list[np.ndarray]:
    """Per MoE layer (S, E_l): how many of sequence s's paths visit each expert, out of path_topk.

    counting "k_best": its path_topk best paths (the reference); "posterior": path_topk times
    the expected visits of one path drawn from its whole path distribution."""
    nodes, edges = graph(cfg, scores, settings)
    if settings.counting == "posterior":
        return [settings.path_topk * m for m in path_posterior(nodes, edges)]
    if settings.counting != "k_best":
        raise PlanError(f"pathfinder: counting={settings.counting!r}; expected 'posterior' or 'k_best'")
    visits = [np.zeros_like(n) for n in nodes]
    for s in range(nodes[0].shape[0]):
        paths, _ = k_best_paths([n[s] for n in nodes], edges, settings.path_topk)
        for lyr in range(len(nodes)):
            np.add.at(visits[lyr][s], paths[:, lyr], 1.0)
    return visits


def path_priority(cfg: ModelConfig, scores: Scores, settings: PathfinderSettings,
                  visits: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """What the selection ranks by, (E_l,) per MoE layer, on one scale across layers.

    layer_scale "expert": sum over sequences of the visits of e times the sequence's mean routed
    reconstruction error per token routed to e (how much breaking its trajectories at e costs);
    "recon": visits times the sequence's routed reconstruction error summed over the layer's
    experts (the same cost for every expert of the layer); "none": the visits alone.
    visits: `path_visits` if already computed."""
    if settings.layer_scale not in LAYER_SCALES:
        raise PlanError(f"pathfinder: layer_scale={settings.layer_scale!r}; expected one of {LAYER_SCALES}")
    visits = path_visits(cfg, scores, settings) if visits is None else visits
    if settings.layer_scale == "none":
        return [v.sum(0) for v in visits]
    take = slice(None) if not settings.max_sequences else slice(0, settings.max_sequences)
    out = []
    for lyr, v in zip(cfg.moe_layers, visits):
        recon_BE = np.asarray(scores["seq_recon_routed"][cfg.layer_name(lyr)], np.float64)[take]
        if settings.layer_scale == "expert":  # the sequence's mean cost of one use of e (0 where it never used e)
            count_BE = np.asarray(scores["seq_count"][cfg.layer_name(lyr)], np.float64)[take]
            out.append((v * recon_BE / np.maximum(count_BE, 1.0)).sum(0))
        else:
            out.append(recon_BE.sum(-1) @ v)
    return out


def keep_by_priority(cfg: ModelConfig, priority: Sequence[np.ndarray], tiebreak: Sequence[np.ndarray], ratio: float,
                     allocation: str, forced: Sequence[np.ndarray] | None = None) -> dict[int, tuple[int, ...]]:
    """Experts to keep per MoE layer: the highest `priority` (ties: `tiebreak`) up to the budget.

    allocation "uniform": each layer removes round(ratio * E_l); "global": one budget of
    total - round(ratio * total), every layer keeping at least top_k (and its forced experts),
    the rest going to the largest priorities of the whole model compared as they are: a signal
    must be on one scale across layers (token counts, probability mass and output norms are).
    """
    layers = list(cfg.moe_layers)
    K = cfg.num_experts_per_tok
    rank = [np.lexsort((-np.asarray(t, np.float64), -np.asarray(p, np.float64))) for p, t in zip(priority, tiebreak)]
    kept: dict[int, list[int]] = {}
    if allocation == "uniform":
        for i, lyr in enumerate(layers):
            n = cfg.experts_per_layer[lyr] - int(round(ratio * cfg.experts_per_layer[lyr]))
            if n < K:
                raise PlanError(f"ratio={ratio} leaves MoE layer {lyr} {n} of {cfg.experts_per_layer[lyr]} experts, "
                                f"fewer than top_k={K}; lower the ratio or use global allocation")
            forced_i = [] if forced is None else [int(e) for e in np.flatnonzero(forced[i])]
            order = forced_i + [int(e) for e in rank[i] if e not in forced_i]
            kept[lyr] = order[:max(n, len(forced_i))]
        return {lyr: tuple(sorted(v)) for lyr, v in kept.items()}
    if allocation != "global":
        raise PlanError(f"allocation={allocation!r}: expected 'uniform' or 'global'")
    total = sum(cfg.experts_per_layer[lyr] for lyr in layers)
    budget = total - int(round(ratio * total))
    for i, lyr in enumerate(layers):
        forced_i = [] if forced is None else [int(e) for e in np.flatnonzero(forced[i])]
        kept[lyr] = forced_i + [int(e) for e in rank[i] if e not in forced_i][:max(0, K - len(forced_i))]
    used = sum(len(v) for v in kept.values())
    if used > budget:
        raise PlanError(f"ratio={ratio}: keeping {budget} of {total} experts cannot give each of the {len(layers)} "
                        f"MoE layers its top_k={K} experts (and the forced ones: {used} needed)")
    pool = [(float(priority[i][e]), float(tiebreak[i][e]), lyr, int(e))
            for i, lyr in enumerate(layers) for e in rank[i] if int(e) not in kept[lyr]]
    pool.sort(key=lambda x: (-x[0], -x[1]))
    for _, _, lyr, e in pool[:budget - used]:
        kept[lyr].append(e)
    return {lyr: tuple(sorted(v)) for lyr, v in kept.items()}


def force_keep(cfg: ModelConfig, scores: Scores, z: float) -> list[np.ndarray] | None:
    """Experts whose probability mass is an outlier of their layer (z-score above `z`)."""
    if z <= 0:
        return None
    out = []
    for lyr in cfg.moe_layers:
        m = np.asarray(scores["seq_prob_mass"][cfg.layer_name(lyr)]).sum(0)
        out.append((m - m.mean()) / max(float(m.std()), _EPS) > z)
    return out
