"""Routed rows sorted by expert into fixed-size tiles: the layout "blocked" and the grouped-GEMM paths share.

Experts are ordered bucket by bucket (`position`); each expert's rows start a fresh tile of C
rows (its last tile padded with empty slots), and rows that trimming dropped sort last and land
in no tile. A path chooses where each expert's first tile goes (one frame, or one window per
bucket); `place` turns that into slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def max_tiles(R: int, n_experts: int, T: int, C: int) -> int:
    """A static bound on sum_e ceil(n_e / C) for R rows over `n_experts` experts, each with <= T rows."""
    return max(1, min((R + min(n_experts, R) * (C - 1)) // C, n_experts * -(-T // C)))


class Sorted(NamedTuple):
    """The routed rows ordered by their expert's position; trimmed rows get position E (last)."""

    pos_R: jax.Array  # each row's expert position, E for a trimmed row
    perm: jax.Array  # the stable sort of pos_R
    sizes_E: jax.Array  # rows of each expert, position order


def sort_rows(order: np.ndarray, exp_R: jax.Array, active_R: jax.Array | None) -> Sorted:
    """`order`: router indices in position order; `exp_R` each row's router index; `active_R` False = trimmed."""
    E = len(order)
    pos_R = jnp.asarray(np.argsort(order).astype(np.int32))[exp_R]
    if active_R is not None:
        pos_R = jnp.where(active_R, pos_R, E)
    return Sorted(pos_R, jnp.argsort(pos_R, stable=True), jnp.bincount(pos_R, length=E + 1)[:E].astype(jnp.int32))


def place(rows: Sorted, tile0_E: jax.Array, C: int, n_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(slot_R, src_N, filled_N): each row's slot (n_slots for a trimmed row), each slot's row
    (clamped to a valid index) and whether it holds one; expert e's rows fill tiles from tile0_E[e]."""
    R, E = rows.pos_R.shape[0], rows.sizes_E.shape[0]
    pos_sorted = rows.pos_R[rows.perm]
    run_sorted, e_sorted = pos_sorted < E, jnp.minimum(pos_sorted, E - 1)
    rank_sorted = jnp.arange(R, dtype=jnp.int32) - (jnp.cumsum(rows.sizes_E) - rows.sizes_E)[e_sorted]
    slot_sorted = jnp.where(run_sorted, tile0_E[e_sorted] * C + rank_sorted, n_slots)
    slot_R = jnp.zeros(R, jnp.int32).at[rows.perm].set(slot_sorted, unique_indices=True)
    src_N = jnp.full(n_slots + 1, R, jnp.int32).at[slot_sorted].set(rows.perm)[:n_slots]  # slot n_slots: dropped
    filled_N = src_N < R  # empty slots hold zeros
    return slot_R, jnp.minimum(src_N, R - 1), filled_N
