"""The expert kernels: SwiGLU, and the "blocked" path's per-block loops with their own backward.

`swiglu` is the expert maths every dispatch path runs. `block_ffn` runs the blocks that
`moe_jax.model.experts` lays out (rows sorted by expert into fixed-size blocks, one expert's
rows per block) as a custom-VJP function whose backward accumulates each expert's weight
gradient locally instead of adding a full-size cotangent per loop iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def swiglu(x_ND, gate_DF, up_DF, down_FD, mask_NF=None):
    """SwiGLU in the weights' dtype, float32 accumulation; returns (h_NF f32, out_ND f32)."""
    dt = gate_DF.dtype
    x = x_ND.astype(dt)
    h = jax.nn.silu(jnp.dot(x, gate_DF, preferred_element_type=_F32)) * jnp.dot(
        x, up_DF, preferred_element_type=_F32)
    if mask_NF is not None:
        h = h * mask_NF.astype(_F32)
    return h, jnp.dot(h.astype(dt), down_FD, preferred_element_type=_F32)


def _rows_mask(mask_b, j, seq_MC, i):
    """Dims-mask rows for block i of the bucket's expert j: (1, F_b), (C, F_b), or None."""
    if mask_b is None:
        return None
    return mask_b[j][None] if mask_b.ndim == 2 else mask_b[seq_MC[i], j]


def block_ffn(collect_stats: bool):
    """The block loops as a custom-VJP function (made per call: `collect_stats` is static).

    Per bucket, an outer loop over the experts that have rows slices each one's weights once
    and an inner loop runs that expert's blocks; `plans[b]` = (spans_E2: [first, end) block
    of each expert, busy_E: expert indices with rows first, n_busy). Plain autodiff of a loop
    over stacked weights would add a full-size weight cotangent every iteration; the
    backward here accumulates each expert's gradient locally and recomputes gate/up
    instead of storing them.
    """

    @jax.custom_vjp
    def ffn(weights, masks, x_MCD, plans, seq_MC, w_MC):
        out_MCD, sums = jnp.zeros(x_MCD.shape, _F32), []
        for b, (gate, up, down) in enumerate(weights):
            mask_b = None if masks is None else masks[b]
            out_MCD, bucket_sums = _bucket_forward(gate, up, down, mask_b, plans[b], x_MCD, seq_MC, w_MC,
                                                   out_MCD, collect_stats)
            sums.append(bucket_sums)
        return out_MCD, tuple(sums)

    def fwd(weights, masks, x_MCD, plans, seq_MC, w_MC):
        return ffn(weights, masks, x_MCD, plans, seq_MC, w_MC), (weights, masks, x_MCD, plans, seq_MC)

    def bwd(res, cts):
        weights, masks, x_MCD, plans, seq_MC = res
        dout_MCD = cts[0]  # stats carry no gradient
        dx_MCD, dweights, dmasks = jnp.zeros(x_MCD.shape, _F32), [], []
        for b, (gate, up, down) in enumerate(weights):
            mask_b = None if masks is None else masks[b]
            dx_MCD, grads, dmask = _bucket_backward(gate, up, down, mask_b, plans[b], x_MCD, seq_MC, dout_MCD,
                                                    dx_MCD)
            dweights.append(grads)
            dmasks.append(dmask)
        dmasks = None if masks is None else tuple(dmasks)
        return tuple(dweights), dmasks, dx_MCD.astype(x_MCD.dtype), None, None, None

    ffn.defvjp(fwd, bwd)
    return ffn


def _bucket_forward(gate, up, down, mask_b, plan, x_MCD, seq_MC, w_MC, out_MCD, collect_stats):
    """Writes the bucket's blocks into out_MCD; returns it and (abs_EF, wabs_EF) or ()."""
    spans_E2, busy_E, n_busy = plan
    zero_F = jnp.zeros(gate.shape[2], _F32)

    def expert(v, carry):
        out_MCD, abs_EF, wabs_EF = carry
        j = busy_E[v]
        gate_DF, up_DF, down_FD = gate[j], up[j], down[j]

        def block(i, carry):
            out_MCD, abs_F, wabs_F = carry
            h_CF, out_CD = swiglu(x_MCD[i], gate_DF, up_DF, down_FD, _rows_mask(mask_b, j, seq_MC, i))
            if collect_stats:
                a_CF = jnp.abs(h_CF)
                abs_F, wabs_F = abs_F + (a_CF * w_MC[i][:, :1]).sum(0), wabs_F + (a_CF * w_MC[i][:, 1:]).sum(0)
            return out_MCD.at[i].set(out_CD), abs_F, wabs_F

        out_MCD, abs_F, wabs_F = jax.lax.fori_loop(spans_E2[j, 0], spans_E2[j, 1], block,
                                                   (out_MCD, zero_F, zero_F))
        return out_MCD, abs_EF.at[j].set(abs_F), wabs_EF.at[j].set(wabs_F)

    zero_EF = jnp.zeros(gate.shape[::2], _F32)
    out_MCD, abs_EF, wabs_EF = jax.lax.fori_loop(0, n_busy, expert, (out_MCD, zero_EF, zero_EF))
    return out_MCD, ((abs_EF, wabs_EF) if collect_stats else ())


def _bucket_backward(gate, up, down, mask_b, plan, x_MCD, seq_MC, dout_MCD, dx_MCD):
    """Adds the bucket's blocks' input gradients to dx_MCD; returns it, (dgate, dup, ddown), dmask."""
    spans_E2, busy_E, n_busy = plan
    dt = gate.dtype
    zeros = lambda a: jnp.zeros(a.shape, _F32)

    def expert(v, carry):
        dx_MCD, dgate, dup, ddown, dmask = carry
        j = busy_E[v]
        gate_DF, up_DF, down_FD = gate[j], up[j], down[j]

        def block(i, carry):
            dx_MCD, dgate_DF, dup_DF, ddown_FD, dmask = carry
            x_CD, dy_CD = x_MCD[i].astype(dt), dout_MCD[i].astype(dt)
            g_CF = jnp.dot(x_CD, gate_DF, preferred_element_type=_F32)
            u_CF = jnp.dot(x_CD, up_DF, preferred_element_type=_F32)
            sig_CF = jax.nn.sigmoid(g_CF)
            h_CF = g_CF * sig_CF * u_CF
            dh_CF = _dot_nt(dy_CD, down_FD)
            m = _rows_mask(mask_b, j, seq_MC, i)
            if m is not None:
                part_CF = dh_CF * h_CF  # d out / d mask, per row
                dmask = dmask + part_CF.sum(0) if mask_b.ndim == 2 else dmask.at[seq_MC[i], j].add(part_CF)
                dh_CF, h_CF = dh_CF * m, h_CF * m
            du_CF = (dh_CF * g_CF * sig_CF).astype(dt)
            dg_CF = (dh_CF * u_CF * sig_CF * (1 + g_CF * (1 - sig_CF))).astype(dt)
            dx_MCD = dx_MCD.at[i].set(_dot_nt(dg_CF, gate_DF) + _dot_nt(du_CF, up_DF))
            return (dx_MCD, dgate_DF + _dot_tn(x_CD, dg_CF), dup_DF + _dot_tn(x_CD, du_CF),
                    ddown_FD + _dot_tn(h_CF.astype(dt), dy_CD), dmask)

        per_expert_mask = mask_b is not None and mask_b.ndim == 2  # accumulate its row locally
        local = (dx_MCD, zeros(gate_DF), zeros(up_DF), zeros(down_FD),
                 zeros(mask_b[0]) if per_expert_mask else dmask)
        dx_MCD, dg, du, dd, dm = jax.lax.fori_loop(spans_E2[j, 0], spans_E2[j, 1], block, local)
        dmask = dmask.at[j].set(dm) if per_expert_mask else dm
        return dx_MCD, dgate.at[j].set(dg), dup.at[j].set(du), ddown.at[j].set(dd), dmask

    carry = (dx_MCD, zeros(gate), zeros(up), zeros(down), () if mask_b is None else zeros(mask_b))
    dx_MCD, *grads, dmask = jax.lax.fori_loop(0, n_busy, expert, carry)
    grads = tuple(g.astype(w.dtype) for g, w in zip(grads, (gate, up, down)))
    return dx_MCD, grads, None if mask_b is None else dmask.astype(mask_b.dtype)


def _dot_tn(a, b):
    """a.T @ b with float32 accumulation (contracts the leading axes)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot_nt(a, b):
    """a @ b.T with float32 accumulation (contracts the trailing axes)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
