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
  pallas   rows sorted by expert into row tiles, grouped-GEMM Pallas kernels (Triton on GPU,
           interpret mode elsewhere) with their own backward (`moe_jax.model.grouped_gemm`).
  megablox the same layout on jax's TPU grouped matmul (interpret mode off TPU; unmeasured).
  expert_parallel  rows sent to the devices owning their experts with an all-to-all, run there
           by "blocked", and sent back (`moe_jax.model.expert_parallel`; needs a mesh with an
           `expert` axis set by `jax.set_mesh`).

The single-device paths live in `moe_jax.model.experts`, the expert-parallel one in
`moe_jax.model.expert_parallel`; this module routes and picks the path.

"auto" is "blocked": on CPU it beat "gather" even at decode (T=1..8) and the rest at all T,
since it reads each used expert's weights once and skips unused experts. "pallas" stays an
explicit choice until a GPU run measures it faster than the rest there (docs/dispatch.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import expert_parallel, experts
from moe_jax.model.experts import MAX_BLOCK_ROWS, block_rows_for
from moe_jax.model.kernels import swiglu

IMPLS = ("auto", "dense", "ragged", "blocked", "gather", "pallas", "megablox", "expert_parallel")
STAT_KEYS = ("act_abs_sum", "act_weighted_abs_sum", "count", "out_norm_sum", "weighted_out_norm_sum")
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
    U = cfg.n_group
    grouped_TUg = choice_TE.reshape(T, U, E // U)
    if cfg.topk_method == "group_limited_greedy":
        group_TU = jnp.max(grouped_TUg, axis=-1)
    elif cfg.topk_method == "noaux_tc":
        top2_TU2 = jax.lax.top_k(grouped_TUg, min(2, E // U))[0]
        finite_sum = jnp.where(jnp.isneginf(top2_TU2), 0.0, top2_TU2).sum(-1)
        group_TU = jnp.where(jnp.isneginf(top2_TU2[..., 0]), -jnp.inf, finite_sum)
    else:
        raise ValueError(f"topk_method={cfg.topk_method!r} has no group rule")
    kept_TU = jax.lax.top_k(group_TU, cfg.topk_group)[1]
    keep_TU = jnp.zeros((T, U), bool).at[jnp.arange(T)[:, None], kept_TU].set(True)
    return jnp.where(keep_TU[..., None], grouped_TUg, -jnp.inf).reshape(T, E)


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


# ================================================================= entry: pick a dispatch path
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
      dims_mask: None, (E, F_max), or (B, E, F_max) with `seq_id_T` (T,) naming each token's
        sequence. It scales the intermediate activations; its gradient is the Fisher signal.
      impl: one of `IMPLS`; "auto" is "blocked".
      collect_stats: also return per-expert sums over the routed (token, expert) pairs:
        act_abs_sum, act_weighted_abs_sum (E, F_max) of |h| and w*|h| (h after the dims mask),
        count (E,), out_norm_sum, weighted_out_norm_sum (E,) of ||f_e(x)|| and w*||f_e(x)||.
        Otherwise stats is {}. Stats carry no gradient.
      token_valid_T: (T,) which tokens the stats count (padding excluded); default all.
      block_rows: rows per block of "blocked" (default: `block_rows_for`), or per tile of
        "pallas" / "megablox" (default: `grouped_gemm.tile_rows_for`; on GPU a power of two >= 16).
      per_choice: also return stats["out_TKD"] (T, K, D): each routed choice's output f_e(x)
        before the combine (0 for trimmed choices), so calibration can reuse the forward's
        expert work instead of running the routed experts again. Not with "expert_parallel".

    "blocked", "pallas" and "megablox" have hand-written backward passes, so they support reverse
    mode (grad, vjp) but not forward mode (jvp); use "ragged" or "dense" there.
    """
    if isinstance(routing, Routing):
        idx_TK, weights_TK, active_TK = routing.idx_TK, routing.weights_TK, routing.active_TK
    else:
        (idx_TK, weights_TK), active_TK = routing, None
    if impl not in IMPLS:
        raise ValueError(f"experts_forward: impl={impl!r}; expected one of {IMPLS}")
    if impl != "expert_parallel":
        return experts.forward(cfg, layer, experts_params, x_TD, idx_TK, weights_TK, active_TK, dims_mask=dims_mask,
                               seq_id_T=seq_id_T, impl=impl, collect_stats=collect_stats, token_valid_T=token_valid_T,
                               block_rows=block_rows, per_choice=per_choice)
    if per_choice:
        raise ValueError("experts_forward: per_choice=True is not supported with impl='expert_parallel'; "
                         "use 'blocked' to capture per-choice outputs")
    inp = experts.check_inputs(cfg, layer, experts_params, x_TD, idx_TK, weights_TK, active_TK, dims_mask, seq_id_T,
                               token_valid_T)
    return expert_parallel.experts_forward(cfg, layer, experts_params, inp.x_TD, inp.idx_TK, inp.weights_TK,
                                           inp.active_TK, inp.mask, inp.seq_id_T, inp.valid_T, collect_stats)


__all__ = ["IMPLS", "MAX_BLOCK_ROWS", "STAT_KEYS", "Routing", "block_rows_for", "experts_forward", "route", "swiglu",
           "trim"]
