"""The single-device dispatch paths of `moe.experts_forward`: dense, ragged, blocked, gather, and the
grouped-GEMM kernels of `moe_jax.model.grouped_gemm` (pallas, megablox).

Each runs every width bucket at its own width and gives the same result (see `moe_jax.model.moe`).
`forward` checks its arguments and runs one path; `check_inputs` and `run` are its two halves, so
`moe.experts_forward` can check once and hand the rows to the expert-parallel path instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ExpertBucket, ModelConfig
from moe_jax.model import grouped_gemm, kernels, tiles
from moe_jax.model.kernels import swiglu

LOCAL_IMPLS = ("auto", "dense", "ragged", "blocked", "gather", *grouped_gemm.BACKENDS)
MAX_BLOCK_ROWS = 256  # the default block size of "blocked" never exceeds this
_F32 = jnp.float32
_EXACT = jax.lax.Precision.HIGHEST


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


class Inputs(NamedTuple):
    """`experts_forward`'s arguments, checked and normalised by `check_inputs`."""

    info: _Layer
    x_TD: jax.Array
    idx_TK: jax.Array
    weights_TK: jax.Array  # 0 where active_TK is False
    active_TK: jax.Array | None
    mask: jax.Array | None
    seq_id_T: jax.Array | None
    valid_T: jax.Array


def check_inputs(cfg: ModelConfig, layer: int, experts_params: Mapping[str, Any], x_TD, idx_TK, weights_TK,
                 active_TK=None, dims_mask=None, seq_id_T=None, token_valid_T=None) -> Inputs:
    """Shapes checked against the layer (ValueError naming the argument), arrays normalised."""
    info = _layer_info(cfg, layer, experts_params)
    x_TD, idx_TK, weights_TK = jnp.asarray(x_TD), jnp.asarray(idx_TK, jnp.int32), jnp.asarray(weights_TK)
    if x_TD.ndim != 2 or x_TD.shape[1] != cfg.hidden_size:
        raise ValueError(f"experts_forward: x_TD has shape {x_TD.shape}, expected (T, {cfg.hidden_size})")
    T, D = x_TD.shape
    if idx_TK.ndim != 2 or idx_TK.shape[0] != T or weights_TK.shape != idx_TK.shape:
        raise ValueError(f"experts_forward: idx_TK {idx_TK.shape} and weights_TK {weights_TK.shape} "
                         f"must both be (T={T}, K)")
    mask, seq_id_T = _check_mask(info, dims_mask, seq_id_T, T)
    valid_T = jnp.ones(T, _F32) if token_valid_T is None else jnp.asarray(token_valid_T).astype(_F32)
    if valid_T.shape != (T,):
        raise ValueError(f"experts_forward: token_valid_T has shape {valid_T.shape}, expected ({T},)")
    if active_TK is not None:
        active_TK = jnp.asarray(active_TK, bool)
        if active_TK.shape != idx_TK.shape:
            raise ValueError(f"experts_forward: active_TK has shape {active_TK.shape}, expected {idx_TK.shape}")
        weights_TK = jnp.where(active_TK, weights_TK, 0)
    return Inputs(info, x_TD, idx_TK, weights_TK, active_TK, mask, seq_id_T, valid_T)


def forward(cfg: ModelConfig, layer: int, experts_params: Mapping[str, Any], x_TD, idx_TK, weights_TK,
            active_TK=None, *, dims_mask=None, seq_id_T=None, impl: str = "auto", collect_stats: bool = False,
            token_valid_T=None, block_rows: int | None = None, per_choice: bool = False):
    """`moe.experts_forward` on one device (impl one of `LOCAL_IMPLS`); returns (y_TD float32, stats)."""
    if impl not in LOCAL_IMPLS:
        raise ValueError(f"experts_forward: impl={impl!r}; expected one of {LOCAL_IMPLS}")
    inputs = check_inputs(cfg, layer, experts_params, x_TD, idx_TK, weights_TK, active_TK, dims_mask, seq_id_T,
                          token_valid_T)
    return run(inputs, experts_params, impl=impl, collect_stats=collect_stats, block_rows=block_rows,
               per_choice=per_choice)


def run(inputs: Inputs, experts_params: Mapping[str, Any], *, impl: str, collect_stats: bool,
        block_rows: int | None, per_choice: bool):
    """Run checked `inputs` through one single-device path; returns (y_TD float32, stats)."""
    info, x_TD, idx_TK, weights_TK, active_TK, mask, seq_id_T, valid_T = inputs
    T, D = x_TD.shape
    if impl == "auto":
        impl = "blocked"
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
        C = block_rows_for(T, K, info.E) if block_rows is None else int(block_rows)
        if C < 1:
            raise ValueError(f"experts_forward: block_rows={block_rows} must be positive")
        out_RD, sums = _blocked(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, C)
    elif impl in grouped_gemm.BACKENDS:
        C = grouped_gemm.tile_rows_for(T, K, info.E) if block_rows is None else int(block_rows)
        out_RD, sums = grouped_gemm.dispatch(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats,
                                             grouped_gemm.make_spec(C, impl))
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
        raise ValueError(f"dims_mask has shape {dims_mask.shape}, expected (E, F_max) or (B, E, F_max) "
                         f"with E={info.E}, F_max={info.F_max}")
    if dims_mask.ndim == 3:
        if seq_id_T is None or tuple(seq_id_T.shape) != (T,):
            got = None if seq_id_T is None else tuple(seq_id_T.shape)
            raise ValueError(f"a per-sequence dims_mask {dims_mask.shape} needs seq_id_T of shape ({T},), "
                             f"got {got}")
        seq_id_T = jnp.asarray(seq_id_T, jnp.int32)
    return dims_mask, seq_id_T


def _bucket_mask(mask, bucket: ExpertBucket):
    """The bucket's rows and columns of a dims mask: (E_b, F_b) or (B, E_b, F_b)."""
    return None if mask is None else mask[..., np.asarray(bucket.expert_ids), : bucket.width]


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
    """Each row's dims-mask row (N, F_b) from a bucket mask (E_b, F_b) or (B, E_b, F_b)."""
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
    x_ND = x_TD[rows.tok_R[perm]].astype(dt)
    gated = jax.nn.silu(jax.lax.ragged_dot(x_ND, w["gate"], sizes, preferred_element_type=_F32))
    h_NF = gated * jax.lax.ragged_dot(x_ND, w["up"], sizes, preferred_element_type=_F32)
    m = _row_mask(mask_b, None if seq_id_T is None else seq_id_T[rows.tok_R[perm]], local_R[perm])
    if m is not None:
        h_NF = h_NF * m.astype(_F32)
    out_ND = jax.lax.ragged_dot(h_NF.astype(dt), w["down"], sizes, preferred_element_type=_F32)
    out_ND = out_ND * in_b_R[perm][:, None]
    out_RD = jnp.zeros_like(out_ND).at[perm].set(out_ND, unique_indices=True)
    return out_RD, _act_sums(h_NF, rows.w_R[perm], rows.v_R[perm], local_R[perm], in_b_R[perm], n,
                             collect_stats)


# ------------------------------------------------------------------------------------- blocked
def _blocked(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats, C):
    """Rows sorted by expert into blocks of C rows that each hold one expert's rows.

    Experts are ordered bucket by bucket and each expert's rows start a fresh block (padded
    with zero rows), so a block is one (C, D) @ (D, F_b) matmul chain against one expert.
    The static block count bounds the worst case, sum_e ceil(n_e / C); loops with dynamic
    bounds visit only the used blocks.
    """
    T, D = x_TD.shape
    R, E = rows.exp_R.shape[0], info.E
    M = tiles.max_tiles(R, E, T, C)
    # Each expert's rows start a fresh block: its first block follows the blocks of the experts before it.
    order = tiles.sort_rows(info.order, rows.exp_R, rows.active_R)
    blocks_E = (order.sizes_E + C - 1) // C
    blk_end_E = jnp.cumsum(blocks_E)
    slot_R, src_N, filled_N = tiles.place(order, blk_end_E - blocks_E, C, M * C)

    x_MCD = jnp.where(filled_N[:, None], x_TD[rows.tok_R[src_N]], 0).reshape(M, C, D)
    seq_MC = None if mask is None or mask.ndim == 2 else seq_id_T[rows.tok_R[src_N]].reshape(M, C)
    # Stats weights of each slot: (validity, gate weight * validity); empty slots count nothing.
    w_MC = (jnp.where(filled_N[:, None], jnp.stack([rows.v_R, rows.w_R.astype(_F32) * rows.v_R], 1)[src_N], 0.0)
            .reshape(M, C, 2) if collect_stats else None)
    spans_E2 = jnp.stack([blk_end_E - blocks_E, blk_end_E], axis=1).astype(jnp.int32)  # [first, end) block
    plans, p0 = [], 0
    for bucket in info.buckets:  # per bucket: its experts' spans, the busy ones first, how many are busy
        busy = blocks_E[p0:p0 + len(bucket.expert_ids)] > 0
        plans.append((spans_E2[p0:p0 + len(bucket.expert_ids)], jnp.argsort(~busy, stable=True).astype(jnp.int32),
                      busy.sum().astype(jnp.int32)))
        p0 += len(bucket.expert_ids)
    weights = tuple((w["gate"], w["up"], w["down"]) for w in (experts_params[f"bucket_{b}"]
                                                              for b in range(len(info.buckets))))
    masks = None if mask is None else tuple(_bucket_mask(mask, bucket) for bucket in info.buckets)

    out_MCD, sums = kernels.block_ffn(collect_stats)(weights, masks, x_MCD, tuple(plans), seq_MC, w_MC)
    out_ND = out_MCD.reshape(M * C, D)
    if rows.active_R is not None:  # dropped rows read the zero row appended at slot M*C
        out_ND = jnp.concatenate([out_ND, jnp.zeros((1, D), _F32)])
    out_RD = out_ND[slot_R]
    if not collect_stats:
        return out_RD, None
    pad = lambda a, bucket: jnp.pad(a, ((0, 0), (0, info.F_max - bucket.width)))
    to_router = np.argsort(info.order)
    stacked = [jnp.concatenate([pad(s[k], bk) for s, bk in zip(sums, info.buckets)])[to_router] for k in (0, 1)]
    return out_RD, tuple(stacked)
