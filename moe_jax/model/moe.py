"""MoE routing and dropless routed-expert dispatch over width-bucketed expert weights.

`route` turns hidden states into a `Routing` (float32 router maths, as the Hugging Face
reference routers do, plus an optional expert mask). `experts_forward` computes

    y_t = sum_k w_{t,k} * down_e(silu(x_t @ gate_e) * (x_t @ up_e) * dims_mask[e]),  e = e_{t,k}

for every routed (token, k) pair without dropping any. Experts live in width buckets
(`ModelConfig.expert_buckets`) and every path runs a bucket at its own width, so pruned,
non-uniform layers are never padded to their widest expert. The paths give equal results:

  dense    every expert on every token: the reference (E/K times the useful FLOPs).
  ragged   rows sorted by expert, `jax.lax.ragged_dot` per bucket (dense-masked on CPU).
  blocked  rows sorted by expert into fixed-size blocks that each hold one expert's rows,
           one dense matmul chain per block: the fast default.
  gather   each row gathers its own copy of its expert's weights: a cross-check for tiny T*K.
  expert_parallel  rows sent to the devices owning their experts with an all-to-all, run there
           by "blocked", and sent back (`moe_jax.sharding.expert_parallel`; needs a mesh with an
           `expert` axis set by `jax.set_mesh`).

"auto" is "blocked": on CPU it beat "gather" even at decode (T=1..8) and the rest at all T,
since it reads each used expert's weights once and skips unused experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ExpertBucket, ModelConfig

IMPLS = ("auto", "dense", "ragged", "blocked", "gather", "expert_parallel")
STAT_KEYS = ("act_abs_sum", "act_weighted_abs_sum", "count", "out_norm_sum", "weighted_out_norm_sum")
MAX_BLOCK_ROWS = 256  # the default block size of "blocked" never exceeds this
_F32 = jnp.float32
_EXACT = jax.lax.Precision.HIGHEST


class Routing(NamedTuple):
    """Router output for T tokens (a pytree, so it can leave jit or be captured)."""

    logits_TE: jax.Array  # float32 router logits, -inf where the expert mask is 0
    scores_TE: jax.Array  # float32 softmax probabilities or sigmoid scores (0 where masked)
    idx_TK: jax.Array  # int32 chosen experts, best first
    weights_TK: jax.Array  # float32 combine weights (normalised if configured, then scaled)
    active_TK: jax.Array | None = None  # bool, False where run-time trimming dropped the choice


# ======================================================================================= routing
def route(
    cfg: ModelConfig,
    layer: int,
    moe_params: Mapping[str, Any],
    x_TD: jax.Array,
    expert_mask: jax.Array | None = None,
    force_TE: jax.Array | None = None,
) -> Routing:
    """Choose the top-k experts of each token as `cfg`'s reference implementation does.

    `moe_params` holds `router/kernel` (D, E) and, when `cfg.router_bias`, `score_bias` (E,).
    `expert_mask` is None or a (T, E) 0/1 array: a masked expert gets logit -inf before
    scoring, so it is never chosen and softmax renormalises over the others.
    `force_TE` (T, E) 0/1 restricts the *choice* to the allowed experts (route forcing), group
    limits overridden; their weights stay the router's own scores, so forcing the router's own
    top-k changes nothing. (Unsafe Routes' code instead masks the logits, which renormalises
    the softmax over the forced set; with norm_topk_prob the two agree.)
    """
    E, K = cfg.experts_per_layer[layer], cfg.num_experts_per_tok
    kernel = moe_params["router"]["kernel"]
    if tuple(kernel.shape) != (cfg.hidden_size, E):
        raise ValueError(f"layer {layer}: router kernel has shape {tuple(kernel.shape)}, expected "
                         f"(hidden_size, experts) = {(cfg.hidden_size, E)}")
    if x_TD.ndim != 2 or x_TD.shape[1] != cfg.hidden_size:
        raise ValueError(f"route: x_TD has shape {x_TD.shape}, expected (T, {cfg.hidden_size})")
    logits_TE = jnp.dot(jnp.asarray(x_TD, _F32), jnp.asarray(kernel, _F32), preferred_element_type=_F32,
                        precision=_EXACT)  # full float32 on accelerators too: routing is discrete
    keep_TE = None
    if expert_mask is not None:
        if expert_mask.shape != logits_TE.shape:
            raise ValueError(f"route: expert_mask has shape {expert_mask.shape}, expected (T, E) = "
                             f"{logits_TE.shape}; expand (E,) or per-sequence masks to tokens first")
        keep_TE = jnp.asarray(expert_mask) != 0
        logits_TE = jnp.where(keep_TE, logits_TE, -jnp.inf)

    if cfg.router_score == "softmax":
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
        choice_TE = scores_TE
    else:
        scores_TE = jax.nn.sigmoid(logits_TE)
        choice_TE = scores_TE
        if cfg.router_bias:
            choice_TE = choice_TE + jnp.asarray(moe_params["score_bias"], _F32)
    if keep_TE is not None:  # -inf, not 0: a masked expert must lose even to excluded groups' 0
        choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
    if force_TE is not None:
        choice_TE = jnp.where(jnp.asarray(force_TE) != 0, choice_TE, -jnp.inf)
    elif cfg.topk_method != "greedy":
        choice_TE = _limit_to_groups(cfg, choice_TE)

    chosen_TK, idx_TK = jax.lax.top_k(choice_TE, K)
    weights_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=-1)
    # A -inf choice (masks and groups left fewer than K experts) routes with weight 0.
    weights_TK = jnp.where(jnp.isneginf(chosen_TK), 0.0, weights_TK)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
    weights_TK = weights_TK * cfg.routed_scaling_factor
    return Routing(logits_TE, scores_TE, idx_TK.astype(jnp.int32), weights_TK.astype(_F32))


def _limit_to_groups(cfg: ModelConfig, choice_TE: jax.Array) -> jax.Array:
    """Set experts outside the `topk_group` best of `n_group` contiguous groups to -inf.

    Group score: the group's max (group_limited_greedy, DeepSeek-V2) or the sum of its top
    two (noaux_tc, DeepSeek-V3). A masked (-inf) expert adds nothing to a top-two sum; a
    fully masked group scores -inf.
    """
    T, E = choice_TE.shape
    G = cfg.n_group
    grouped_TGN = choice_TE.reshape(T, G, E // G)
    if cfg.topk_method == "group_limited_greedy":
        group_TG = jnp.max(grouped_TGN, axis=-1)
    elif cfg.topk_method == "noaux_tc":
        top2_TG2 = jax.lax.top_k(grouped_TGN, min(2, E // G))[0]
        finite_sum = jnp.where(jnp.isneginf(top2_TG2), 0.0, top2_TG2).sum(-1)
        group_TG = jnp.where(jnp.isneginf(top2_TG2[..., 0]), -jnp.inf, finite_sum)
    else:
        raise ValueError(f"topk_method={cfg.topk_method!r} has no group rule")
    kept_TG = jax.lax.top_k(group_TG, cfg.topk_group)[1]
    keep_TG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], kept_TG].set(True)
    return jnp.where(keep_TG[..., None], grouped_TGN, -jnp.inf).reshape(T, E)


def trim(routing: Routing, tau: jax.Array | float = 0.0, top_p: jax.Array | float = 1.0,
         max_active: jax.Array | int | None = None) -> Routing:
    """Drop the chosen experts that would contribute little to each token (dynamic trimming).

    On the gates renormalised over the K chosen experts, g_k = w_k / sum_j w_j, a choice
    survives when g_k >= tau, when the gates ranked above it hold less than `top_p` of the
    mass, and when its rank is below `max_active`; each token keeps its largest gate. The
    survivors' weights are rescaled to the K chosen experts' total, so normalised routers stay
    normalised and unnormalised ones keep their output scale. Arguments may be traced arrays
    (one compilation serves every threshold); tau = 0, top_p >= 1, max_active >= K reproduce
    the untrimmed routing exactly. Dropped choices get weight 0 and `active_TK` False, and
    `experts_forward` skips their work.
    """
    w_TK = routing.weights_TK
    K = w_TK.shape[-1]
    total_T1 = jnp.sum(w_TK, axis=-1, keepdims=True)
    g_TK = w_TK / (total_T1 + 1e-20)
    order_TK = jnp.argsort(-g_TK, axis=-1, stable=True)
    rank_TK = jnp.argsort(order_TK, axis=-1, stable=True)
    g_sorted_TK = jnp.take_along_axis(g_TK, order_TK, axis=-1)
    mass_above_TK = jnp.take_along_axis(jnp.cumsum(g_sorted_TK, axis=-1) - g_sorted_TK, rank_TK, axis=-1)
    top_p = jnp.asarray(top_p, _F32)
    max_active = K if max_active is None else max_active
    keep_TK = ((g_TK >= jnp.asarray(tau, _F32)) & ((mass_above_TK < top_p) | (top_p >= 1.0))
               & (rank_TK < jnp.asarray(max_active, jnp.int32)))
    keep_TK = keep_TK | (rank_TK == 0)
    if routing.active_TK is not None:
        keep_TK = keep_TK & routing.active_TK
    kept_T1 = jnp.sum(jnp.where(keep_TK, w_TK, 0.0), axis=-1, keepdims=True)
    rescaled_TK = jnp.where(keep_TK, w_TK * (total_T1 / jnp.where(kept_T1 > 0, kept_T1, 1.0)), 0.0)
    weights_TK = jnp.where(jnp.all(keep_TK, axis=-1, keepdims=True), w_TK, rescaled_TK)
    return routing._replace(weights_TK=weights_TK.astype(_F32), active_TK=keep_TK)


# =============================================================================== expert dispatch
class _Layer(NamedTuple):
    """Static facts about one layer's experts."""

    buckets: tuple[ExpertBucket, ...]
    E: int
    F_max: int
    bucket_of: np.ndarray  # (E,) bucket of each router index
    local_of: np.ndarray  # (E,) index of each expert inside its bucket
    order: np.ndarray  # (E,) router indices bucket by bucket (the "position" order)


class _Rows(NamedTuple):
    """The R = T*K routed (token, k) rows, row r = t*K + k."""

    tok_R: jax.Array
    exp_R: jax.Array
    w_R: jax.Array
    v_R: jax.Array  # 1 where the row's token counts in the statistics, 0 for padding and dropped rows
    active_R: jax.Array | None  # bool, False for rows that trimming dropped (None: all run)


def experts_forward(
    cfg: ModelConfig,
    layer: int,
    experts_params: Mapping[str, Any],
    x_TD: jax.Array,
    routing: Routing | tuple[jax.Array, jax.Array],
    *,
    dims_mask: jax.Array | None = None,
    seq_id_T: jax.Array | None = None,
    impl: str = "auto",
    collect_stats: bool = False,
    token_valid_T: jax.Array | None = None,
    block_rows: int | None = None,
    per_choice: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Dropless routed experts of one layer; returns (y_TD float32, stats).

    Matmuls take inputs in the weights' dtype and accumulate in float32; the combine with
    routing weights is float32. Differentiable in x, weights, routing weights and dims_mask.

    Args:
      experts_params: `{bucket_b: {gate (E_b,D,F_b), up (E_b,D,F_b), down (E_b,F_b,D)}}`.
      routing: a `Routing`, or `(idx_TK, weights_TK)`. Rows a trimmed routing marks inactive
        (`active_TK` False) are not run by "blocked" (fewer blocks: real work saved); the
        reference paths run them and weight them 0. Either way they count in no statistic.
      dims_mask: None, (E, F_max), or (S, E, F_max) with `seq_id_T` (T,) naming each token's
        sequence. It scales the intermediate activations; its gradient is the Fisher signal.
      impl: one of `IMPLS`; "auto" is "blocked".
      collect_stats: also return per-expert sums over the routed (token, expert) pairs:
        act_abs_sum, act_weighted_abs_sum (E, F_max) of |h| and w*|h| (h after the dims mask),
        count (E,), out_norm_sum, weighted_out_norm_sum (E,) of ||f_e(x)|| and w*||f_e(x)||.
        Otherwise stats is {}. Stats carry no gradient.
      token_valid_T: (T,) which tokens the stats count (padding excluded); default all.
      block_rows: rows per block of "blocked" (default: `block_rows_for`).
      per_choice: also return stats["out_TKD"] (T, K, D): each routed choice's output f_e(x)
        before the combine (0 for trimmed choices), so calibration can reuse the forward's
        expert work instead of running the routed experts again. Not with "expert_parallel".

    "blocked" has a hand-written backward pass, so it supports reverse mode (grad, vjp) but
    not forward mode (jvp); use "ragged" or "dense" there.
    """
    info = _layer_info(cfg, layer, experts_params)
    if isinstance(routing, Routing):
        idx_TK, weights_TK, active_TK = routing.idx_TK, routing.weights_TK, routing.active_TK
    else:
        (idx_TK, weights_TK), active_TK = routing, None
    x_TD, idx_TK, weights_TK = jnp.asarray(x_TD), jnp.asarray(idx_TK, jnp.int32), jnp.asarray(weights_TK)
    if x_TD.ndim != 2 or x_TD.shape[1] != cfg.hidden_size:
        raise ValueError(f"experts_forward: x_TD has shape {x_TD.shape}, expected (T, {cfg.hidden_size})")
    T, D = x_TD.shape
    if idx_TK.ndim != 2 or idx_TK.shape[0] != T or weights_TK.shape != idx_TK.shape:
        raise ValueError(f"experts_forward: idx_TK {idx_TK.shape} and weights_TK {weights_TK.shape} "
                         f"must both be (T={T}, K)")
    mask, seq_id_T = _check_mask(info, dims_mask, seq_id_T, T)
    if impl not in IMPLS:
        raise ValueError(f"experts_forward: impl={impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = "blocked"

    valid_T = jnp.ones(T, _F32) if token_valid_T is None else jnp.asarray(token_valid_T).astype(_F32)
    if valid_T.shape != (T,):
        raise ValueError(f"experts_forward: token_valid_T has shape {valid_T.shape}, expected ({T},)")
    if active_TK is not None:
        active_TK = jnp.asarray(active_TK, bool)
        if active_TK.shape != idx_TK.shape:
            raise ValueError(f"experts_forward: active_TK has shape {active_TK.shape}, expected {idx_TK.shape}")
        weights_TK = jnp.where(active_TK, weights_TK, 0)
    if impl == "expert_parallel":
        if per_choice:
            raise ValueError("experts_forward: per_choice=True is not supported with impl='expert_parallel'; "
                             "use 'blocked' to capture per-choice outputs")
        from moe_jax.sharding import expert_parallel  # lazy: sharding imports this module

        return expert_parallel.experts_forward(cfg, layer, experts_params, x_TD, idx_TK, weights_TK, active_TK,
                                               mask, seq_id_T, valid_T, collect_stats)
    if impl == "dense":
        y_TD, stats, out_TKD = _dense(info, experts_params, x_TD, idx_TK, weights_TK, mask, seq_id_T, collect_stats,
                                      valid_T, active_TK, per_choice)
        return y_TD, (stats | {"out_TKD": jax.lax.stop_gradient(out_TKD)} if per_choice else stats)
    K = idx_TK.shape[1]
    tok_R = jnp.repeat(jnp.arange(T, dtype=jnp.int32), K)
    active_R = None if active_TK is None else active_TK.reshape(-1)
    v_R = valid_T[tok_R] if active_R is None else valid_T[tok_R] * active_R
    rows = _Rows(tok_R, idx_TK.reshape(-1), weights_TK.reshape(-1), v_R, active_R)
    if impl == "blocked":
        B = block_rows_for(T, K, info.E) if block_rows is None else int(block_rows)
        if B < 1:
            raise ValueError(f"experts_forward: block_rows={block_rows} must be positive")
        out_RD, sums = _blocked(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, B)
    else:
        bucket_fn = _ragged_bucket if impl == "ragged" else _gather_bucket
        out_RD, sums = _per_bucket(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, bucket_fn)
    y_TD = jnp.sum(out_RD.reshape(T, K, D) * weights_TK.astype(_F32)[..., None], axis=1)
    stats = _row_stats(info, rows, out_RD, *sums) if collect_stats else {}
    if per_choice:  # trimmed rows read 0 whichever path ran them
        out_ok_RD = out_RD if active_R is None else jnp.where(active_R[:, None], out_RD, 0.0)
        stats["out_TKD"] = jax.lax.stop_gradient(out_ok_RD.reshape(T, K, D))
    return y_TD, stats


def block_rows_for(T: int, K: int, E: int) -> int:
    """Default rows per block: half the mean rows per expert, rounded up to a multiple of 8,
    in [8, MAX_BLOCK_ROWS]. Each expert wastes about half a block to padding (~1/4 of the
    rows at this size); smaller blocks waste less but re-read the expert's weights more
    often and run slower matmuls on CPU."""
    half_mean = T * min(K, E) / E / 2
    return int(min(MAX_BLOCK_ROWS, max(8, 8 * math.ceil(half_mean / 8))))


def _layer_info(cfg: ModelConfig, layer: int, experts_params: Mapping[str, Any]) -> _Layer:
    if cfg.layer_kinds[layer] != "moe":
        raise ValueError(f"layer {layer} is a dense layer; it has no routed experts")
    buckets = cfg.expert_buckets(layer)
    E, D = cfg.experts_per_layer[layer], cfg.hidden_size
    if sorted(experts_params) != sorted(f"bucket_{b}" for b in range(len(buckets))):
        raise ValueError(f"layer {layer}: experts params hold {sorted(experts_params)}, but the config has "
                         f"{len(buckets)} width bucket(s) {[b.width for b in buckets]}")
    bucket_of, local_of = np.zeros(E, np.int32), np.zeros(E, np.int32)
    for b, bucket in enumerate(buckets):
        n, F = len(bucket.expert_ids), bucket.width
        for key, shape in {"gate": (n, D, F), "up": (n, D, F), "down": (n, F, D)}.items():
            got = tuple(experts_params[f"bucket_{b}"][key].shape)
            if got != shape:
                raise ValueError(f"layer {layer}: experts/bucket_{b}/{key} has shape {got}, expected {shape}")
        bucket_of[list(bucket.expert_ids)] = b
        local_of[list(bucket.expert_ids)] = np.arange(n)
    order = np.concatenate([np.asarray(b.expert_ids, np.int32) for b in buckets])
    return _Layer(buckets, E, cfg.max_width(layer), bucket_of, local_of, order)


def _check_mask(info: _Layer, dims_mask, seq_id_T, T):
    if dims_mask is None:
        return None, seq_id_T
    dims_mask = jnp.asarray(dims_mask)
    if dims_mask.ndim not in (2, 3) or dims_mask.shape[-2:] != (info.E, info.F_max):
        raise ValueError(f"dims_mask has shape {dims_mask.shape}, expected (E, F_max) or (S, E, F_max) "
                         f"with E={info.E}, F_max={info.F_max}")
    if dims_mask.ndim == 3:
        if seq_id_T is None or tuple(seq_id_T.shape) != (T,):
            got = None if seq_id_T is None else tuple(seq_id_T.shape)
            raise ValueError(f"a per-sequence dims_mask {dims_mask.shape} needs seq_id_T of shape ({T},), "
                             f"got {got}")
        seq_id_T = jnp.asarray(seq_id_T, jnp.int32)
    return dims_mask, seq_id_T


def _bucket_mask(mask, bucket: ExpertBucket):
    """The bucket's rows and columns of a dims mask: (E_b, F_b) or (S, E_b, F_b)."""
    return None if mask is None else mask[..., np.asarray(bucket.expert_ids), : bucket.width]


def swiglu(x_ND, gate_DF, up_DF, down_FD, mask_NF=None):
    """SwiGLU in the weights' dtype, float32 accumulation; returns (h_NF f32, out_ND f32)."""
    dt = gate_DF.dtype
    x = x_ND.astype(dt)
    h = jax.nn.silu(jnp.dot(x, gate_DF, preferred_element_type=_F32)) * jnp.dot(
        x, up_DF, preferred_element_type=_F32)
    if mask_NF is not None:
        h = h * mask_NF.astype(_F32)
    return h, jnp.dot(h.astype(dt), down_FD, preferred_element_type=_F32)


def _row_stats(info: _Layer, rows: _Rows, out_RD, act_abs_EF, act_wabs_EF):
    """Per-expert sums over the routed rows (row outputs give the norms)."""
    norm_R = jnp.linalg.norm(out_RD, axis=-1)
    w_R, v_R = rows.w_R.astype(_F32), rows.v_R
    per_expert = lambda a_R: jax.ops.segment_sum(a_R * v_R, rows.exp_R, num_segments=info.E)
    return jax.lax.stop_gradient({
        "act_abs_sum": act_abs_EF,
        "act_weighted_abs_sum": act_wabs_EF,
        "count": per_expert(jnp.ones_like(w_R)),
        "out_norm_sum": per_expert(norm_R),
        "weighted_out_norm_sum": per_expert(w_R * norm_R),
    })


# ----------------------------------------------------------------------------- dense reference
def _dense(info, experts_params, x_TD, idx_TK, weights_TK, mask, seq_id_T, collect_stats, valid_T, active_TK,
           per_choice=False):
    """Returns (y_TD, stats, out_TKD or None)."""
    T, D = x_TD.shape
    onehot_TKE = jax.nn.one_hot(idx_TK, info.E, dtype=_F32)
    if active_TK is not None:
        onehot_TKE = onehot_TKE * active_TK[..., None]
    sel_TE = onehot_TKE.sum(1)
    comb_TE = jnp.einsum("tk,tke->te", weights_TK.astype(_F32), onehot_TKE, precision=_EXACT)
    y_TD = jnp.zeros((T, D), _F32)
    act_abs, act_wabs = jnp.zeros((2, info.E, info.F_max), _F32)
    norm_TE = jnp.zeros((T, info.E), _F32)
    out_TKD = jnp.zeros((*idx_TK.shape, D), _F32) if per_choice else None
    for b, bucket in enumerate(info.buckets):
        w = experts_params[f"bucket_{b}"]
        ids, F = np.asarray(bucket.expert_ids), bucket.width
        m = _bucket_mask(mask, bucket)
        if m is not None:
            m = m[:, None, :] if m.ndim == 2 else m[seq_id_T].transpose(1, 0, 2)  # (E_b, 1|T, F_b)
        h_ETF, out_ETD = jax.vmap(swiglu, in_axes=(None, 0, 0, 0, None if m is None else 0))(
            x_TD, w["gate"], w["up"], w["down"], m)
        y_TD = y_TD + jnp.einsum("te,etd->td", comb_TE[:, ids], out_ETD, precision=_EXACT)
        if per_choice:  # choice (t, k) reads out_ETD[local e, t] where its expert is in this bucket
            in_b_TK = jnp.asarray(info.bucket_of)[idx_TK] == b
            if active_TK is not None:
                in_b_TK = in_b_TK & active_TK
            got_TKD = out_ETD[jnp.asarray(info.local_of)[idx_TK], jnp.arange(T)[:, None]]
            out_TKD = out_TKD + jnp.where(in_b_TK[..., None], got_TKD, 0.0)
        if collect_stats:
            a_ETF = jnp.abs(h_ETF) * valid_T[None, :, None]
            act_abs = act_abs.at[ids, :F].set(jnp.einsum("te,etf->ef", sel_TE[:, ids], a_ETF, precision=_EXACT))
            act_wabs = act_wabs.at[ids, :F].set(jnp.einsum("te,etf->ef", comb_TE[:, ids], a_ETF,
                                                           precision=_EXACT))
            norm_TE = norm_TE.at[:, ids].set(jnp.linalg.norm(out_ETD, axis=-1).T)
    if not collect_stats:
        return y_TD, {}, out_TKD
    sel_TE, comb_TE = sel_TE * valid_T[:, None], comb_TE * valid_T[:, None]
    return y_TD, jax.lax.stop_gradient({
        "act_abs_sum": act_abs,
        "act_weighted_abs_sum": act_wabs,
        "count": sel_TE.sum(0),
        "out_norm_sum": (sel_TE * norm_TE).sum(0),
        "weighted_out_norm_sum": (comb_TE * norm_TE).sum(0),
    }), out_TKD


# ------------------------------------------------------------------- per-bucket: ragged, gather
BucketFn = Callable[..., tuple[jax.Array, Any]]


def _per_bucket(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, bucket_fn: BucketFn):
    """Run `bucket_fn` on each bucket; returns (out_RD, (act_abs_EF, act_wabs_EF) or None)."""
    out_RD = jnp.zeros((rows.exp_R.shape[0], x_TD.shape[1]), _F32)
    abs_sums, wabs_sums = [], []
    for b, bucket in enumerate(info.buckets):
        in_b_R = jnp.asarray(info.bucket_of)[rows.exp_R] == b
        local_R = jnp.where(in_b_R, jnp.asarray(info.local_of)[rows.exp_R], 0)  # in range for gathers
        out_b, sums = bucket_fn(experts_params[f"bucket_{b}"], x_TD, rows, in_b_R, local_R,
                                _bucket_mask(mask, bucket), seq_id_T, collect_stats)
        out_RD = out_RD + out_b
        if collect_stats:
            pad = ((0, 0), (0, info.F_max - bucket.width))
            abs_sums.append(jnp.pad(sums[0], pad))
            wabs_sums.append(jnp.pad(sums[1], pad))
    if not collect_stats:
        return out_RD, None
    to_router = np.argsort(info.order)
    return out_RD, (jnp.concatenate(abs_sums)[to_router], jnp.concatenate(wabs_sums)[to_router])


def _row_mask(mask_b, seq_N, local_N):
    """Each row's dims-mask row (N, F_b) from a bucket mask (E_b, F_b) or (S, E_b, F_b)."""
    if mask_b is None:
        return None
    return mask_b[local_N] if mask_b.ndim == 2 else mask_b[seq_N, local_N]


def _act_sums(h_NF, w_N, v_N, local_N, valid_N, n_experts, collect_stats):
    """(sum |h|, sum w*|h|) per local expert over the bucket's rows, weighted by v (padding 0), or None."""
    if not collect_stats:
        return None
    seg_N = jnp.where(valid_N, local_N, n_experts)
    a_NF = jnp.abs(h_NF) * v_N[:, None]
    total = lambda v: jax.ops.segment_sum(v, seg_N, num_segments=n_experts + 1)[:-1]
    return total(a_NF), total(a_NF * w_N.astype(_F32)[:, None])


def _gather_bucket(w, x_TD, rows, in_b_R, local_R, mask_b, seq_id_T, collect_stats):
    """Every row against its own gathered expert weights (R copies of (D, F_b): decode only)."""
    m = _row_mask(mask_b, None if seq_id_T is None else seq_id_T[rows.tok_R], local_R)
    in_b = in_b_R.astype(_F32)[:, None]
    m = in_b if m is None else m * in_b
    h_RF, out_RD = jax.vmap(swiglu)(x_TD[rows.tok_R][:, None], w["gate"][local_R], w["up"][local_R],
                                    w["down"][local_R], m[:, None])
    h_RF, out_RD = h_RF[:, 0], out_RD[:, 0]
    return out_RD, _act_sums(h_RF, rows.w_R, rows.v_R, local_R, in_b_R, w["gate"].shape[0], collect_stats)


def _ragged_bucket(w, x_TD, rows, in_b_R, local_R, mask_b, seq_id_T, collect_stats):
    """The bucket's rows sorted by expert come first; the rest follow, uncovered (output 0)."""
    n = w["gate"].shape[0]
    key_R = jnp.where(in_b_R, local_R, n)
    perm = jnp.argsort(key_R, stable=True)
    sizes = jnp.bincount(key_R, length=n + 1)[:n].astype(jnp.int32)
    dt = w["gate"].dtype
    x_SD = x_TD[rows.tok_R[perm]].astype(dt)
    gated = jax.nn.silu(jax.lax.ragged_dot(x_SD, w["gate"], sizes, preferred_element_type=_F32))
    h_SF = gated * jax.lax.ragged_dot(x_SD, w["up"], sizes, preferred_element_type=_F32)
    m = _row_mask(mask_b, None if seq_id_T is None else seq_id_T[rows.tok_R[perm]], local_R[perm])
    if m is not None:
        h_SF = h_SF * m.astype(_F32)
    out_SD = jax.lax.ragged_dot(h_SF.astype(dt), w["down"], sizes, preferred_element_type=_F32)
    out_SD = out_SD * in_b_R[perm][:, None]
    out_RD = jnp.zeros_like(out_SD).at[perm].set(out_SD, unique_indices=True)
    return out_RD, _act_sums(h_SF, rows.w_R[perm], rows.v_R[perm], local_R[perm], in_b_R[perm], n,
                             collect_stats)


# ------------------------------------------------------------------------------------- blocked
def _blocked(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, B):
    """Rows sorted by expert into blocks of B rows that each hold one expert's rows.

    Experts are ordered bucket by bucket and each expert's rows start a fresh block (padded
    with zero rows), so a block is one (B, D) @ (D, F_b) matmul chain against one expert.
    The static block count bounds the worst case, sum_e ceil(n_e / B); loops with dynamic
    bounds visit only the used blocks.
    """
    T, D = x_TD.shape
    R, E = rows.exp_R.shape[0], info.E
    NB = max(1, min((R + min(E, R) * (B - 1)) // B, E * -(-T // B)))

    # Layout: p = the expert's position in bucket order; sorted row -> slot = block * B + offset.
    # Rows dropped by trimming get position E: sorted last, in no block, never run (output 0).
    pos_R = jnp.asarray(np.argsort(info.order).astype(np.int32))[rows.exp_R]
    if rows.active_R is not None:
        pos_R = jnp.where(rows.active_R, pos_R, E)
    perm = jnp.argsort(pos_R, stable=True)
    sizes_P = jnp.bincount(pos_R, length=E + 1)[:E].astype(jnp.int32)
    blocks_P = (sizes_P + B - 1) // B
    blk_end_P = jnp.cumsum(blocks_P)
    pos_sorted = pos_R[perm]
    run_sorted, pos_sorted = pos_sorted < E, jnp.minimum(pos_sorted, E - 1)
    rank_sorted = jnp.arange(R, dtype=jnp.int32) - (jnp.cumsum(sizes_P) - sizes_P)[pos_sorted]
    slot_sorted = jnp.where(run_sorted, (blk_end_P - blocks_P)[pos_sorted] * B + rank_sorted, NB * B)
    slot_R = jnp.zeros(R, jnp.int32).at[perm].set(slot_sorted, unique_indices=True)
    src_S = jnp.full(NB * B + 1, R, jnp.int32).at[slot_sorted].set(perm)[:NB * B]  # slot NB*B: dropped rows
    filled_S, src_S = src_S < R, jnp.minimum(src_S, R - 1)  # empty slots hold zeros

    x_NBD = jnp.where(filled_S[:, None], x_TD[rows.tok_R[src_S]], 0).reshape(NB, B, D)
    seq_NB = None if mask is None or mask.ndim == 2 else seq_id_T[rows.tok_R[src_S]].reshape(NB, B)
    # Stats weights of each slot: (validity, gate weight * validity); empty slots count nothing.
    w_NB = (jnp.where(filled_S[:, None], jnp.stack([rows.v_R, rows.w_R.astype(_F32) * rows.v_R], 1)[src_S], 0.0)
            .reshape(NB, B, 2) if collect_stats else None)
    spans_P2 = jnp.stack([blk_end_P - blocks_P, blk_end_P], axis=1).astype(jnp.int32)  # [first, end) block
    plans, p0 = [], 0
    for bucket in info.buckets:  # per bucket: its experts' spans, the busy ones first, how many are busy
        busy = blocks_P[p0:p0 + len(bucket.expert_ids)] > 0
        plans.append((spans_P2[p0:p0 + len(bucket.expert_ids)], jnp.argsort(~busy, stable=True).astype(jnp.int32),
                      busy.sum().astype(jnp.int32)))
        p0 += len(bucket.expert_ids)
    weights = tuple((w["gate"], w["up"], w["down"]) for w in (experts_params[f"bucket_{b}"]
                                                              for b in range(len(info.buckets))))
    masks = None if mask is None else tuple(_bucket_mask(mask, bucket) for bucket in info.buckets)

    out_NBD, sums = _block_ffn(collect_stats)(weights, masks, x_NBD, tuple(plans), seq_NB, w_NB)
    out_SD = out_NBD.reshape(NB * B, D)
    if rows.active_R is not None:  # dropped rows read the zero row appended at slot NB*B
        out_SD = jnp.concatenate([out_SD, jnp.zeros((1, D), _F32)])
    out_RD = out_SD[slot_R]
    if not collect_stats:
        return out_RD, None
    pad = lambda a, bucket: jnp.pad(a, ((0, 0), (0, info.F_max - bucket.width)))
    to_router = np.argsort(info.order)
    stacked = [jnp.concatenate([pad(s[k], bk) for s, bk in zip(sums, info.buckets)])[to_router] for k in (0, 1)]
    return out_RD, tuple(stacked)


def _rows_mask(mask_b, j, seq_NB, i):
    """Dims-mask rows for block i of the bucket's expert j: (1, F_b), (B, F_b), or None."""
    if mask_b is None:
        return None
    return mask_b[j][None] if mask_b.ndim == 2 else mask_b[seq_NB[i], j]


def _block_ffn(collect_stats: bool):
    """The block loops as a custom-VJP function (made per call: `collect_stats` is static).

    Per bucket, an outer loop over the experts that have rows slices each one's weights once
    and an inner loop runs that expert's blocks; `plans[b]` = (spans_E2: [first, end) block
    of each expert, busy_E: expert indices with rows first, n_busy). Plain autodiff of a loop
    over stacked weights would add a full-size weight cotangent every iteration; the
    backward here accumulates each expert's gradient locally and recomputes gate/up
    instead of storing them.
    """

    @jax.custom_vjp
    def block_ffn(weights, masks, x_NBD, plans, seq_NB, w_NB):
        out_NBD, sums = jnp.zeros(x_NBD.shape, _F32), []
        for b, (gate, up, down) in enumerate(weights):
            mask_b = None if masks is None else masks[b]
            out_NBD, bucket_sums = _bucket_forward(gate, up, down, mask_b, plans[b], x_NBD, seq_NB, w_NB,
                                                   out_NBD, collect_stats)
            sums.append(bucket_sums)
        return out_NBD, tuple(sums)

    def fwd(weights, masks, x_NBD, plans, seq_NB, w_NB):
        return block_ffn(weights, masks, x_NBD, plans, seq_NB, w_NB), (weights, masks, x_NBD, plans, seq_NB)

    def bwd(res, cts):
        weights, masks, x_NBD, plans, seq_NB = res
        dout_NBD = cts[0]  # stats carry no gradient
        dx_NBD, dweights, dmasks = jnp.zeros(x_NBD.shape, _F32), [], []
        for b, (gate, up, down) in enumerate(weights):
            mask_b = None if masks is None else masks[b]
            dx_NBD, grads, dmask = _bucket_backward(gate, up, down, mask_b, plans[b], x_NBD, seq_NB, dout_NBD,
                                                    dx_NBD)
            dweights.append(grads)
            dmasks.append(dmask)
        dmasks = None if masks is None else tuple(dmasks)
        return tuple(dweights), dmasks, dx_NBD.astype(x_NBD.dtype), None, None, None

    block_ffn.defvjp(fwd, bwd)
    return block_ffn


def _bucket_forward(gate, up, down, mask_b, plan, x_NBD, seq_NB, w_NB, out_NBD, collect_stats):
    """Writes the bucket's blocks into out_NBD; returns it and (abs_EF, wabs_EF) or ()."""
    spans_E2, busy_E, n_busy = plan
    zero_F = jnp.zeros(gate.shape[2], _F32)

    def expert(v, carry):
        out_NBD, abs_EF, wabs_EF = carry
        j = busy_E[v]
        gate_DF, up_DF, down_FD = gate[j], up[j], down[j]

        def block(i, carry):
            out_NBD, abs_F, wabs_F = carry
            h_BF, out_BD = swiglu(x_NBD[i], gate_DF, up_DF, down_FD, _rows_mask(mask_b, j, seq_NB, i))
            if collect_stats:
                a_BF = jnp.abs(h_BF)
                abs_F, wabs_F = abs_F + (a_BF * w_NB[i][:, :1]).sum(0), wabs_F + (a_BF * w_NB[i][:, 1:]).sum(0)
            return out_NBD.at[i].set(out_BD), abs_F, wabs_F

        out_NBD, abs_F, wabs_F = jax.lax.fori_loop(spans_E2[j, 0], spans_E2[j, 1], block,
                                                   (out_NBD, zero_F, zero_F))
        return out_NBD, abs_EF.at[j].set(abs_F), wabs_EF.at[j].set(wabs_F)

    zero_EF = jnp.zeros(gate.shape[::2], _F32)
    out_NBD, abs_EF, wabs_EF = jax.lax.fori_loop(0, n_busy, expert, (out_NBD, zero_EF, zero_EF))
    return out_NBD, ((abs_EF, wabs_EF) if collect_stats else ())


def _bucket_backward(gate, up, down, mask_b, plan, x_NBD, seq_NB, dout_NBD, dx_NBD):
    """Adds the bucket's blocks' input gradients to dx_NBD; returns it, (dgate, dup, ddown), dmask."""
    spans_E2, busy_E, n_busy = plan
    dt = gate.dtype
    zeros = lambda a: jnp.zeros(a.shape, _F32)

    def expert(v, carry):
        dx_NBD, dgate, dup, ddown, dmask = carry
        j = busy_E[v]
        gate_DF, up_DF, down_FD = gate[j], up[j], down[j]

        def block(i, carry):
            dx_NBD, dgate_DF, dup_DF, ddown_FD, dmask = carry
            x_BD, dy_BD = x_NBD[i].astype(dt), dout_NBD[i].astype(dt)
            g_BF = jnp.dot(x_BD, gate_DF, preferred_element_type=_F32)
            u_BF = jnp.dot(x_BD, up_DF, preferred_element_type=_F32)
            sig_BF = jax.nn.sigmoid(g_BF)
            h_BF = g_BF * sig_BF * u_BF
            dh_BF = _dot_nt(dy_BD, down_FD)
            m = _rows_mask(mask_b, j, seq_NB, i)
            if m is not None:
                part_BF = dh_BF * h_BF  # d out / d mask, per row
                dmask = dmask + part_BF.sum(0) if mask_b.ndim == 2 else dmask.at[seq_NB[i], j].add(part_BF)
                dh_BF, h_BF = dh_BF * m, h_BF * m
            du_BF = (dh_BF * g_BF * sig_BF).astype(dt)
            dg_BF = (dh_BF * u_BF * sig_BF * (1 + g_BF * (1 - sig_BF))).astype(dt)
            dx_NBD = dx_NBD.at[i].set(_dot_nt(dg_BF, gate_DF) + _dot_nt(du_BF, up_DF))
            return (dx_NBD, dgate_DF + _dot_tn(x_BD, dg_BF), dup_DF + _dot_tn(x_BD, du_BF),
                    ddown_FD + _dot_tn(h_BF.astype(dt), dy_BD), dmask)

        per_expert_mask = mask_b is not None and mask_b.ndim == 2  # accumulate its row locally
        local = (dx_NBD, zeros(gate_DF), zeros(up_DF), zeros(down_FD),
                 zeros(mask_b[0]) if per_expert_mask else dmask)
        dx_NBD, dg, du, dd, dm = jax.lax.fori_loop(spans_E2[j, 0], spans_E2[j, 1], block, local)
        dmask = dmask.at[j].set(dm) if per_expert_mask else dm
        return dx_NBD, dgate.at[j].set(dg), dup.at[j].set(du), ddown.at[j].set(dd), dmask

    carry = (dx_NBD, zeros(gate), zeros(up), zeros(down), () if mask_b is None else zeros(mask_b))
    dx_NBD, *grads, dmask = jax.lax.fori_loop(0, n_busy, expert, carry)
    grads = tuple(g.astype(w.dtype) for g, w in zip(grads, (gate, up, down)))
    return dx_NBD, grads, None if mask_b is None else dmask.astype(mask_b.dtype)


def _dot_tn(a_NK, b_NM):
    """a.T @ b with float32 accumulation (contracts the leading axes)."""
    return jax.lax.dot_general(a_NK, b_NM, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot_nt(a_NK, b_MK):
    """a @ b.T with float32 accumulation (contracts the trailing axes)."""
    return jax.lax.dot_general(a_NK, b_MK, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
