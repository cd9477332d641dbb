"""Expert-parallel dispatch: each token's routed rows travel to the devices that own their experts.

Inside `jax.shard_map` over the active mesh (`jax.set_mesh`), tokens are split over the batch
axes (data, fsdp, expert) and the routed experts over `expert` (n devices). Per device:

  1. its T_loc*K routed rows (token, k) are written into a send buffer (n, R, D) with R =
     T_loc*K: row r sits at slot r of the buffer of the device that owns its expert, empty
     elsewhere. Capacity R per destination is the worst case (every row to one device), so the
     dispatch is dropless by construction, whatever the routing;
  2. `jax.lax.all_to_all` over `expert` delivers, to each device, the rows meant for it
     (with their local expert slot, combine weight, sequence id and validity);
  3. the device runs its local experts on them with the ordinary single-device code
     (`moe_jax.model.experts.forward`, "blocked" by default: empty slots are inactive rows and cost no
     expert work), weighted by the router's combine weights;
  4. a second all_to_all brings each row's output home, and rows are summed over k.

Why not `jax.lax.ragged_all_to_all`? It would send only the real rows, but XLA:CPU in jax 0.10
does not implement it ("HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so it could
not be tested here; the padded buffer costs n x the row traffic, never correctness.

Experts live in width buckets. Bucket b's E_b experts are dealt out in runs of
L_b = ceil(E_b / n) per device. When n divides E_b the bucket's params arrive sharded on
`expert` (as `moe_jax.sharding.rules.DEFAULT_RULES` store them); otherwise they arrive replicated and each device
gathers its own run, the last device's run padded with slots that no router index maps to, so no
row ever reaches them. Router maths stays outside (replicated, float32), so routing is
bit-identical to one device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax.config import ModelConfig
from moe_jax.model import experts as local_paths

_F32 = jnp.float32
BATCH_AXES = ("data", "fsdp", "expert")  # the axes a batch (and each MoE layer's tokens) is split over
# The path each device runs its local experts with (an `experts.LOCAL_IMPLS` name). "auto" ("blocked")
# skips empty buffer slots; "dense" computes every slot and compiles fastest, which suits tiny test models.
INNER_IMPL = "auto"


class _Layout:
    """Static tables of one layer under an expert axis of size n."""

    def __init__(self, cfg: ModelConfig, layer: int, n: int):
        buckets = cfg.expert_buckets(layer)
        E = cfg.experts_per_layer[layer]
        self.runs = [-(-len(b.expert_ids) // n) for b in buckets]  # L_b
        self.sharded = [len(b.expert_ids) % n == 0 for b in buckets]
        offsets = np.cumsum([0] + self.runs)
        self.slots = int(offsets[-1])  # local expert slots per device
        self.owner_E = np.zeros(E, np.int32)
        self.slot_E = np.zeros(E, np.int32)
        self.router_of_XL = np.full((n, self.slots), E, np.int32)  # E: a padding slot
        for b, bucket in enumerate(buckets):
            L = self.runs[b]
            for j, e in enumerate(bucket.expert_ids):
                d, s = divmod(j, L)
                self.owner_E[e], self.slot_E[e] = d, offsets[b] + s
                self.router_of_XL[d, offsets[b] + s] = e
        widths = [b.width for b, L in zip(buckets, self.runs) for _ in range(L)]
        # The device's experts as a layer of their own: same bucket widths, L_b slots each.
        # top-k / groups are irrelevant to expert maths; set so any slot count validates.
        self.local_cfg = cfg.replace(num_experts_per_tok=1, topk_method="greedy", n_group=1, topk_group=1
                                     ).with_layer_experts(layer, widths)
        local = self.local_cfg.expert_buckets(layer)
        if [b.width for b in local] != [b.width for b in buckets] or [len(b.expert_ids) for b in local] != self.runs:
            raise AssertionError(f"layer {layer}: local expert buckets {local} do not mirror {buckets}")


def token_axes(mesh) -> tuple[str, ...]:
    """The mesh's batch axes (those it has), over which tokens are split."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def experts_forward(cfg: ModelConfig, layer: int, experts_params, x_TD, idx_TK, weights_TK, active_TK,
                    dims_mask, seq_id_T, valid_T, collect_stats: bool, inner_impl: str | None = None):
    """`moe.experts_forward`'s contract (arguments already checked there), run expert-parallel
    on the mesh set with `jax.set_mesh`. Returns (y_TD float32, stats)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        raise ValueError("impl='expert_parallel' needs a mesh with an 'expert' axis: wrap the call in "
                         f"jax.set_mesh(moe_jax.sharding.make_mesh(...)); the active mesh is {mesh}")
    n = dict(zip(mesh.axis_names, mesh.axis_sizes))["expert"]
    E = cfg.experts_per_layer[layer]
    if n > E:
        raise ValueError(f"layer {layer}: mesh axis expert={n} is larger than its {E} experts")
    lay = _Layout(cfg, layer, n)
    tok = token_axes(mesh)
    n_tok = int(np.prod([dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in tok]))
    T, K = idx_TK.shape
    pad = -T % n_tok  # tokens split evenly; padded tokens send nothing
    send_TK = jnp.ones((T, K), bool) if active_TK is None else active_TK
    seq_T = jnp.zeros(T, jnp.int32) if seq_id_T is None else seq_id_T
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
              for a in (x_TD, idx_TK, weights_TK.astype(_F32), send_TK, seq_T, valid_T)]
    experts = [experts_params[f"bucket_{b}"] for b in range(len(lay.runs))]
    expert_specs = [{k: P("expert") if sh else P() for k in ("gate", "up", "down")} for sh in lay.sharded]
    tok_spec = P(tok)
    body = functools.partial(_local, cfg=cfg, layer=layer, lay=lay, n=n, collect_stats=collect_stats,
                             inner_impl=inner_impl or INNER_IMPL, sum_axes=tok)
    stats_spec = {k: P() for k in ("act_abs_sum", "act_weighted_abs_sum", "count", "out_norm_sum",
                                   "weighted_out_norm_sum")} if collect_stats else {}
    y_TD, stats = jax.shard_map(
        body, mesh=mesh,
        in_specs=(expert_specs, tok_spec, tok_spec, tok_spec, tok_spec, tok_spec, tok_spec,
                  None if dims_mask is None else P()),
        out_specs=(tok_spec, stats_spec), check_vma=False,
    )(experts, *padded, dims_mask)
    return y_TD[:T], stats


def _local(experts, x_TD, idx_TK, w_TK, send_TK, seq_T, valid_T, mask, *, cfg, layer, lay: _Layout, n: int,
           collect_stats: bool, inner_impl: str, sum_axes: tuple[str, ...]):
    """One device: send rows to their experts' owners, run the local experts, bring outputs back."""
    me = jax.lax.axis_index("expert")
    T, K = idx_TK.shape
    D = x_TD.shape[1]
    R = T * K
    exp_R = idx_TK.reshape(R)
    dest_R = jnp.asarray(lay.owner_E)[exp_R]
    to_XR = (dest_R[None, :] == jnp.arange(n)[:, None]) & send_TK.reshape(1, R)  # the one buffer row r fills
    tok_R = jnp.repeat(jnp.arange(T), K)

    def to_owners(a_R):  # (R, ...) -> (n, R, ...) buffers -> the rows others sent here
        buf = jnp.where(to_XR.reshape(to_XR.shape + (1,) * (a_R.ndim - 1)), a_R[None], jnp.zeros((), a_R.dtype))
        return jax.lax.all_to_all(buf, "expert", 0, 0, tiled=True).reshape((n * R,) + a_R.shape[1:])

    x_ND = to_owners(x_TD[tok_R])
    slot_N = to_owners(jnp.asarray(lay.slot_E)[exp_R])
    w_N = to_owners(w_TK.reshape(R))
    live_N = to_owners(jnp.ones(R, bool))  # False: an empty buffer slot
    seq_N = to_owners(seq_T[tok_R])
    valid_N = to_owners(valid_T[tok_R].astype(_F32))

    local_params = {}
    for b, (w, L, sharded) in enumerate(zip(experts, lay.runs, lay.sharded)):
        if sharded:
            local_params[f"bucket_{b}"] = w
        else:  # replicated: gather this device's run; slots past E_b repeat its last expert, and get no rows
            ids = jnp.minimum(me * L + jnp.arange(L), w["gate"].shape[0] - 1)
            local_params[f"bucket_{b}"] = {k: v[ids] for k, v in w.items()}
    local_mask = None
    if mask is not None:  # the device's slots' rows of the (E, F) or (B, E, F) dims mask
        router_L = jnp.asarray(lay.router_of_XL)[me]
        local_mask = jnp.take(mask, jnp.minimum(router_L, mask.shape[-2] - 1), axis=-2)
    y_ND, stats = local_paths.forward(
        lay.local_cfg, layer, local_params, x_ND, slot_N[:, None], w_N[:, None], live_N[:, None], dims_mask=local_mask,
        seq_id_T=seq_N if local_mask is not None and local_mask.ndim == 3 else None,
        impl=inner_impl, collect_stats=collect_stats, token_valid_T=valid_N)
    back_XRD = jax.lax.all_to_all(y_ND.reshape(n, R, D), "expert", 0, 0, tiled=True)
    y_RD = jnp.take_along_axis(back_XRD, dest_R[None, :, None], axis=0)[0]
    y_TD = y_RD.reshape(T, K, D).sum(1)
    if collect_stats:  # local slots -> router indices (padding slots dropped), summed over token shards
        router_L = jnp.asarray(lay.router_of_XL)[me]
        E = cfg.experts_per_layer[layer]
        stats = {k: jax.lax.psum(jnp.zeros((E,) + v.shape[1:], v.dtype).at[router_L].add(v, mode="drop"), sum_axes)
                 for k, v in stats.items()}
    return y_TD, stats


__all__ = ["BATCH_AXES", "experts_forward", "token_axes"]
