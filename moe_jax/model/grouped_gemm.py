"""Grouped-GEMM expert dispatch ("pallas", "megablox"): Pallas kernels with their own backward.

The routed rows are sorted by expert once for all width buckets into row tiles of C rows, each
tile one expert's rows (its last tile padded); bucket b's tiles fill a static window of M_b
tiles (the worst case, like "blocked"'s block count), so tiles past the used ones and experts
without rows cost no matmul. Per bucket, one kernel computes gate and up (each tile's rows
read once), SwiGLU x dims mask stays plain JAX (the dims-mask gradient Fisher needs is ordinary
autodiff, exact), and a second kernel the down projection.

`grouped_matmul` is a custom VJP: out_i = lhs @ w_i[expert of the row's tile]. Its backward
runs the same kernel on the transposed weights for the input gradient and a transposed grouped
GEMM for the weight gradient, the latter only for weights being differentiated (symbolic zeros:
Fisher scores and attacks differentiate masks and inputs, and then no weight-gradient kernel is
in the program). The first kernel gathers its rows from x_TD itself (no (rows, D) copy); its
input gradient is summed back to tokens in plain JAX.

Kernels: "pallas" is Triton-style (grid over (tile, column block), the tile's expert's weights
read from the whole array, `jnp.dot` with float32 accumulation), compiled on GPU and run with
`interpret=True` elsewhere, so the CPU tests run the kernel code itself. "megablox" runs jax's
TPU grouped matmul (`gmm` / `tgmm`) on the same layout, interpreted off TPU. Widths and D are
zero-padded to multiples of 16 (Triton's smallest dot), which copies a bucket's weights per
call only where a width is not already such a multiple. tokamax's ragged_dot (Python >= 3.12,
jax >= 0.11.1) is not tried. Shape letters as in `moe_jax.model.layout` (N: the rows of a tile
frame, M tiles x C rows; I, O: a grouped matmul's input and output columns).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as megablox_tgmm

from moe_jax.model import tiles

BACKENDS = ("pallas", "megablox")
MIN_TILE = 16  # the smallest side of a Triton dot; dims are padded to a multiple of it
MAX_TILE_ROWS = 128
COL_TILE, DEPTH_TILE = 128, 64  # at most this many output columns / contracted columns per step
TRITON = dict(num_warps=4, num_stages=3)  # unmeasured defaults, to tune on a GPU
INTERPRET: bool | None = None  # None: interpret unless on the backend's own chip; tests set False to lower for GPU
_F32 = jnp.float32


class Spec(NamedTuple):
    """Static settings of one grouped matmul."""

    rows: int  # C, rows per tile
    backend: str  # one of BACKENDS
    interpret: bool


def make_spec(rows: int, backend: str = "pallas", interpret: bool | None = None) -> Spec:
    """Interpret mode (`interpret`, else `INTERPRET`) by default unless on the chip the kernel is
    compiled for (GPU for pallas, TPU for megablox)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped GEMM backend={backend!r}; expected one of {BACKENDS}")
    interpret = INTERPRET if interpret is None else interpret
    native = "gpu" if backend == "pallas" else "tpu"
    interpret = jax.default_backend() != native if interpret is None else bool(interpret)
    if rows < 1 or (not interpret and (rows < MIN_TILE or rows & (rows - 1))):
        raise ValueError(f"experts_forward: block_rows={rows} for impl={backend!r} must be a power of two >= "
                         f"{MIN_TILE} (any positive number in interpret mode)")
    return Spec(int(rows), backend, interpret)


def tile_rows_for(T: int, K: int, E: int) -> int:
    """Default rows per tile: half the mean rows per expert as a power of two in [16, 128]."""
    half_mean = max(1.0, T * min(K, E) / E / 2)
    return int(min(MAX_TILE_ROWS, max(MIN_TILE, 2 ** math.ceil(math.log2(half_mean)))))


def _tile(n: int, cap: int) -> int:
    """The largest power of two <= cap (itself a power of two) dividing n."""
    return math.gcd(n, cap)


def _pad_to(a, axis: int, size: int):
    return a if a.shape[axis] == size else jnp.pad(a, [(0, size - a.shape[axis]) if i == axis else (0, 0)
                                                      for i in range(a.ndim)])


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None  # not tf32 on GPU


# ------------------------------------------------------------------------------ Pallas (Triton) kernels
def _lhs_tile(lhs_ref, rows_ref, first, n, cols):
    """n rows of the lhs from row `first` on, or gathered through rows_ref (-1: a zero row)."""
    if rows_ref is None:
        return lhs_ref[pl.ds(first, n), cols]
    idx = rows_ref[pl.ds(first, n)]
    a = lhs_ref[jnp.maximum(idx, 0), cols]
    return jnp.where(idx[:, None] >= 0, a, jnp.zeros((), a.dtype))


def _mm_kernel(*refs, n_lhs, n_w, gather, transpose, depth, precision):
    """Tile m, column block j: out[o] = sum over pairs i of lhs[i] @ w_i[e] (w_i[e].T if transpose),
    e the tile's expert; one lhs shared by all weights with one out each, or one out summing them."""
    expert_ref, rows_ref = refs[0], refs[1] if gather else None
    refs = refs[2 if gather else 1:]
    lhs, ws, outs = refs[:n_lhs], refs[n_lhs:n_lhs + n_w], refs[n_lhs + n_w:]
    m, j = pl.program_id(0), pl.program_id(1)
    C, width = outs[0].shape
    e = expert_ref[m]
    steps = jnp.where(e >= 0, ws[0].shape[2 if transpose else 1] // depth, 0)  # unused tile: no work
    e = jnp.maximum(e, 0)
    out_cols = pl.ds(j * width, width)

    def body(k, accs):
        cols = pl.ds(k * depth, depth)
        tiles = [_lhs_tile(a, rows_ref, m * C, C, cols) for a in lhs]
        accs = list(accs)
        for i, w in enumerate(ws):
            b = w[e, out_cols, cols].T if transpose else w[e, cols, out_cols]
            o = min(i, len(accs) - 1)
            accs[o] = accs[o] + jnp.dot(tiles[min(i, n_lhs - 1)], b, preferred_element_type=_F32,
                                        precision=precision)
        return tuple(accs)

    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((C, width), _F32) for _ in outs))
    for out, acc in zip(outs, accs):
        out[...] = acc.astype(out.dtype)


def _dw_kernel(*refs, n_w, gather, C, precision):
    """Expert e, block (i, o) of each weight gradient: sum over the expert's tiles of lhs_tile.T @ dy_tile."""
    span_ref, rows_ref = refs[0], refs[1] if gather else None
    refs = refs[2 if gather else 1:]
    lhs, dys, dws = refs[0], refs[1:1 + n_w], refs[1 + n_w:]
    e, i, o = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, bo = dws[0].shape

    def body(t, accs):
        a = _lhs_tile(lhs, rows_ref, t * C, C, pl.ds(i * bi, bi))
        return tuple(acc + jnp.dot(a.T, dy[pl.ds(t * C, C), pl.ds(o * bo, bo)], preferred_element_type=_F32,
                                   precision=precision) for acc, dy in zip(accs, dys))

    accs = jax.lax.fori_loop(span_ref[e, 0], span_ref[e, 1], body, tuple(jnp.zeros((bi, bo), _F32) for _ in dws))
    for dw, acc in zip(dws, accs):
        dw[...] = acc.astype(dw.dtype)


def _call(spec: Spec, kernel, grid, out_specs, out_shape, name, args):
    params = None if spec.interpret else plgpu.CompilerParams(**TRITON)
    return pl.pallas_call(kernel, grid=grid, in_specs=[pl.no_block_spec] * len(args), out_specs=out_specs,
                          out_shape=out_shape, interpret=spec.interpret, compiler_params=params, name=name)(*args)


def _pallas_mm(spec, lhs, ws, expert_M, rows_N, transpose, n_out, name):
    """The tile kernel over grid (tiles, output column blocks); outputs (N, width) float32."""
    N = expert_M.shape[0] * spec.rows
    width = ws[0].shape[1 if transpose else 2]
    depth = _tile(ws[0].shape[2 if transpose else 1], DEPTH_TILE)
    cols = _tile(width, COL_TILE)
    kernel = functools.partial(_mm_kernel, n_lhs=len(lhs), n_w=len(ws), gather=rows_N is not None,
                               transpose=transpose, depth=depth, precision=_precision(ws[0].dtype))
    spec_out = pl.BlockSpec((spec.rows, cols), lambda m, j: (m, j))
    args = (expert_M, *(() if rows_N is None else (rows_N,)), *lhs, *ws)
    return _call(spec, kernel, (expert_M.shape[0], width // cols), [spec_out] * n_out,
                 [jax.ShapeDtypeStruct((N, width), _F32)] * n_out, name, args)


def _pallas_dw(spec, lhs, dys, spans_E2, rows_N):
    E, n_in, n_out = spans_E2.shape[0], lhs.shape[1], dys[0].shape[1]
    bi, bo = _tile(n_in, COL_TILE), _tile(n_out, COL_TILE)
    kernel = functools.partial(_dw_kernel, n_w=len(dys), gather=rows_N is not None, C=spec.rows,
                               precision=_precision(lhs.dtype))
    args = (spans_E2, *(() if rows_N is None else (rows_N,)), lhs, *dys)
    spec_out = pl.BlockSpec((None, bi, bo), lambda e, i, o: (e, i, o))
    return _call(spec, kernel, (E, n_in // bi, n_out // bo), [spec_out] * len(dys),
                 [jax.ShapeDtypeStruct((E, n_in, n_out), _F32)] * len(dys), "gmm_dw", args)


# ----------------------------------------------------------------------------- megablox (TPU) kernels
def _rows_of(lhs, rows_N):
    return lhs if rows_N is None else jnp.where(rows_N[:, None] >= 0, lhs[jnp.maximum(rows_N, 0)], 0)


def _megablox_mm(spec, lhs, ws, expert_M, spans_E2, rows_N, transpose, n_out):
    """megablox.gmm per weight; rows past the groups are left unwritten by it, so they are zeroed here."""
    sizes_E = (spans_E2[:, 1] - spans_E2[:, 0]) * spec.rows
    used_N = jnp.repeat(expert_M >= 0, spec.rows)[:, None]
    x = _rows_of(lhs[0], rows_N) if len(lhs) == 1 else None
    outs = []
    for i, w in enumerate(ws):
        a = x if x is not None else lhs[i]
        tiling = (spec.rows, _tile(a.shape[1], DEPTH_TILE), _tile(w.shape[1 if transpose else 2], COL_TILE))
        outs.append(jnp.where(used_N, megablox_gmm(a, w, sizes_E, _F32, tiling, transpose_rhs=transpose,
                                                   interpret=spec.interpret), 0.0))
    return outs if n_out == len(ws) else [sum(outs)]


def _megablox_dw(spec, lhs, dys, spans_E2, rows_N):
    sizes_E = (spans_E2[:, 1] - spans_E2[:, 0]) * spec.rows
    x_T = _rows_of(lhs, rows_N).T
    tiling = lambda dy: (spec.rows, _tile(x_T.shape[0], COL_TILE), _tile(dy.shape[1], COL_TILE))
    return [megablox_tgmm(x_T, dy, sizes_E, _F32, tiling(dy), num_actual_groups=spans_E2.shape[0],
                          interpret=spec.interpret) for dy in dys]


# ------------------------------------------------------------------------ the custom VJP
def _mm(spec, lhs, ws, expert_M, spans_E2, rows_N, transpose, n_out, name):
    if spec.backend == "megablox":
        return _megablox_mm(spec, lhs, ws, expert_M, spans_E2, rows_N, transpose, n_out)
    return _pallas_mm(spec, lhs, ws, expert_M, rows_N, transpose, n_out, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def grouped_matmul(spec: Spec, lhs, ws, expert_M, spans_E2, rows_N):
    """(lhs[rows] @ w_i[expert of the row's tile] for w_i in ws), each (N, O) float32.

    lhs: (N, I) tile-frame rows, or with rows_N (N,) int32 the source rows of each slot (-1:
    an empty slot, zero). ws: same-shaped (E, I, O) weights (a bucket's E experts) in lhs's dtype.
    expert_M (M,): each tile's expert, -1 for unused tiles (output 0); spans_E2 (E, 2): each
    expert's [first, end) tile.
    """
    return tuple(_mm(spec, (lhs,), ws, expert_M, spans_E2, rows_N, False, len(ws), "gmm_fwd"))


def _gmm_fwd(spec, lhs, ws, expert_M, spans_E2, rows_N):
    value = lambda p: None if p is None else p.value
    outs = grouped_matmul(spec, lhs.value, tuple(w.value for w in ws), expert_M.value, spans_E2.value,
                          value(rows_N))
    # Which inputs are differentiated, carried in the residuals' tree structure (() yes, None no).
    need = (() if lhs.perturbed else None, tuple(() if w.perturbed else None for w in ws))
    return outs, (lhs.value, tuple(w.value for w in ws), expert_M.value, spans_E2.value, value(rows_N), need)


def _gmm_bwd(spec, res, cts):
    lhs, ws, expert_M, spans_E2, rows_N, (need_lhs, need_ws) = res
    dt = ws[0].dtype
    dys = tuple(jnp.zeros(ct.shape, dt) if isinstance(ct, SymbolicZero) else ct.astype(dt) for ct in cts)
    dlhs = None
    if need_lhs is not None:
        (d_N,) = _mm(spec, dys, ws, expert_M, spans_E2, None, True, 1, "gmm_dx")
        if rows_N is not None:  # slot rows back to their source rows
            d_N = jnp.zeros(lhs.shape, _F32).at[jnp.where(rows_N >= 0, rows_N, lhs.shape[0])].add(d_N, mode="drop")
        dlhs = d_N.astype(lhs.dtype)
    wanted = [i for i, n in enumerate(need_ws) if n is not None]
    dws = [None] * len(ws)
    if wanted:  # the transposed grouped GEMM, only for weights being differentiated
        dw_kernel = _megablox_dw if spec.backend == "megablox" else _pallas_dw
        for i, dw in zip(wanted, dw_kernel(spec, lhs, [dys[i] for i in wanted], spans_E2, rows_N)):
            dws[i] = dw.astype(ws[i].dtype)
    return dlhs, tuple(dws), None, None, None


grouped_matmul.defvjp(_gmm_fwd, _gmm_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------- dispatch
def _round_up(n: int) -> int:
    return -(-n // MIN_TILE) * MIN_TILE


class _Layout(NamedTuple):
    """Where each routed row sits: bucket b's tiles are [off[b], off[b + 1]) of the frame."""

    off: np.ndarray  # (buckets + 1,) static tile offsets
    slot_R: jax.Array  # each row's slot; the frame's size (a zero row) for trimmed rows
    src_N: jax.Array  # each slot's row (clamped), with filled_N
    filled_N: jax.Array
    tok_N: jax.Array  # each slot's token, -1 when empty
    tiles_E: jax.Array  # tiles of each expert, bucket order
    end_E: jax.Array  # end tile of each expert within its bucket's window


def _layout(info, rows, T: int, C: int) -> _Layout:
    """One stable sort for all buckets by the expert's position in bucket order (trimmed rows last)."""
    R = rows.exp_R.shape[0]
    n_b = [len(b.expert_ids) for b in info.buckets]
    M_b = [tiles.max_tiles(R, n, T, C) for n in n_b]
    off = np.concatenate([[0], np.cumsum(M_b)]).astype(np.int32)
    n_slots = int(off[-1]) * C
    bucket_E = np.repeat(np.arange(len(n_b)), n_b)
    first_E = np.concatenate([[0], np.cumsum(n_b)])[bucket_E]  # the first position of each expert's bucket

    order = tiles.sort_rows(info.order, rows.exp_R, rows.active_R)
    tiles_E = (order.sizes_E + C - 1) // C
    cum_E = jnp.cumsum(tiles_E)
    end_E = cum_E - jnp.concatenate([jnp.zeros(1, cum_E.dtype), cum_E])[first_E]
    tile0_E = jnp.asarray(off[bucket_E]) + end_E - tiles_E  # each expert's first tile in the whole frame
    slot_R, src_N, filled_N = tiles.place(order, tile0_E, C, n_slots)
    tok_N = jnp.where(filled_N, rows.tok_R[src_N], -1)
    return _Layout(off, slot_R, src_N, filled_N, tok_N, tiles_E, end_E)


def dispatch(info, experts_params, x_TD, rows, mask, seq_id_T, collect_stats: bool, spec: Spec):
    """Routed rows through every bucket; returns (out_RD float32, (act_abs_EF, act_wabs_EF) or None).

    `info` and `rows` are `moe_jax.model.experts`' layer facts and routed rows (the "blocked"
    path's contract): rows dropped by trimming (`rows.active_R` False) are never run (output 0).
    """
    T, D = x_TD.shape
    C = spec.rows
    lay = _layout(info, rows, T, C)
    Dp, p0 = _round_up(D), 0
    outs, sums = [], []
    for b, bucket in enumerate(info.buckets):
        w, n = experts_params[f"bucket_{b}"], len(bucket.expert_ids)
        dt, F, Fp = w["gate"].dtype, bucket.width, _round_up(bucket.width)
        gate, up = (_pad_to(_pad_to(w[k], 2, Fp), 1, Dp) for k in ("gate", "up"))
        down = _pad_to(_pad_to(w["down"], 1, Fp), 2, Dp)
        M = int(lay.off[b + 1] - lay.off[b])
        ends_E, tiles_E = lay.end_E[p0:p0 + n], lay.tiles_E[p0:p0 + n]
        p0 += n
        expert_M = jnp.searchsorted(ends_E, jnp.arange(M), side="right").astype(jnp.int32)
        expert_M = jnp.where(jnp.arange(M) < ends_E[-1], expert_M, -1)
        spans_E2 = jnp.stack([ends_E - tiles_E, ends_E], axis=1).astype(jnp.int32)
        window = slice(int(lay.off[b]) * C, int(lay.off[b + 1]) * C)
        tok_N = lay.tok_N[window]
        g_NF, u_NF = grouped_matmul(spec, _pad_to(x_TD.astype(dt), 1, Dp), (gate, up), expert_M, spans_E2, tok_N)
        h_NF = jax.nn.silu(g_NF) * u_NF
        local_N = jnp.repeat(jnp.maximum(expert_M, 0), C)
        if mask is not None:  # each slot's dims-mask row; padding columns 0
            m_b = _pad_to(mask[..., np.asarray(bucket.expert_ids), :F], mask.ndim - 1, Fp)
            h_NF = h_NF * (m_b[local_N] if m_b.ndim == 2 else m_b[seq_id_T[jnp.maximum(tok_N, 0)], local_N])
        (out_ND,) = grouped_matmul(spec, h_NF.astype(dt), (down,), expert_M, spans_E2, None)
        outs.append(out_ND[:, :D])
        if collect_stats:
            seg_N = jnp.where(jnp.repeat(expert_M >= 0, C), local_N, n)
            src, filled = lay.src_N[window], lay.filled_N[window]
            sums.append(_act_sums(h_NF[:, :F], jnp.where(filled, rows.v_R[src], 0.0), rows.w_R[src], seg_N, n,
                                  info.F_max))
    out_ND = jnp.concatenate(outs + [jnp.zeros((1, D), _F32)])  # the zero row trimmed rows read
    out_RD = out_ND[lay.slot_R]
    if not collect_stats:
        return out_RD, None
    to_router = np.argsort(info.order)
    return out_RD, tuple(jnp.concatenate([s[k] for s in sums])[to_router] for k in (0, 1))


def _act_sums(h_NF, v_N, w_N, seg_N, n: int, F_max: int):
    """(sum v*|h|, sum v*w*|h|) per expert of the bucket (segment n: empty slots), padded to F_max."""
    a_NF = jnp.abs(h_NF) * v_N[:, None]
    pad = ((0, 0), (0, F_max - h_NF.shape[1]))
    total = lambda a: jnp.pad(jax.ops.segment_sum(a, seg_N, num_segments=n + 1)[:-1], pad)
    return total(a_NF), total(a_NF * w_N.astype(_F32)[:, None])
