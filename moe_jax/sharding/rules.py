"""Partition rules: which mesh axes split each dimension of every parameter, and placing a tree.

A rule is (regex on the "/"-joined key path, one entry per dimension: a mesh axis, a tuple of
axes, or None). The first rule whose regex `re.search`es the path wins, so the same rules
place params and anything that nests them (optimizer moments: ".../mu/layer_0/attn/...").

What the defaults do, for every family (GQA and MLA attention, dense first layers, shared
experts, gated shared experts, score-bias routers):
  embeddings, attention, dense MLPs, shared experts, lm_head: model width D over `fsdp`,
    heads / MLP width / vocab over `tensor`;
  routed experts (E_b, D, F_b) / (E_b, F_b, D): the stacked expert dim over `expert`, D over
    `fsdp`, F_b over `tensor`;
  router kernel and score bias: replicated. Routing is discrete: a reduction split over
    devices could flip a near-tie, and the router is (D, E) floats, too small to matter.
  norm scales and biases of D: replicated.

Pruned models have per-layer expert counts and width buckets of any size. A dimension whose
size the axes do not divide is *not* split on those axes (it is replicated there) and
`place_report` says so; nothing is padded in the stored params, so checkpoints, pruning and
export see the same tree as on one device. The cost of that choice is memory, reported in
bytes by `expert_padding_report` (the expert-parallel dispatch handles a non-dividing bucket
by padding its expert slots in flight: padded slots have no router column, so no token can
reach them, and they run no rows).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import ModelConfig
from moe_jax.sharding.mesh import axis_size

AxisEntry = str | tuple[str, ...] | None
Rule = tuple[str, tuple[AxisEntry, ...]]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|/)embed/embedding$", ("tensor", "fsdp")),
    (r"attn/(q_proj|k_proj|v_proj|q_b_proj|kv_b_proj)/kernel$", ("fsdp", "tensor")),
    (r"attn/(q_a_proj|kv_a_proj)/kernel$", ("fsdp", None)),
    (r"attn/o_proj/kernel$", ("tensor", "fsdp")),
    (r"attn/(q_proj|k_proj|v_proj)/bias$", ("tensor",)),
    (r"attn/(o_proj|q_a_proj|kv_a_proj)/bias$", (None,)),
    (r"(mlp|shared)/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"(mlp|shared)/down_proj/kernel$", ("tensor", "fsdp")),
    (r"moe/shared_gate/kernel$", ("fsdp", None)),
    (r"moe/router/kernel$", (None, None)),
    (r"moe/score_bias$", (None,)),
    (r"moe/experts/bucket_\d+/(gate|up)$", ("expert", "fsdp", "tensor")),
    (r"moe/experts/bucket_\d+/down$", ("expert", "tensor", "fsdp")),
    (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),
    (r"/scale$", (None,)),
)


class RuleError(ValueError):
    """A parameter no rule covers, or a rule whose rank does not match the parameter's."""


def path_str(path) -> str:
    """A jax key path as "a/b/0/c"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one leaf is placed: its spec, and the axes a rule asked for that its size did not allow."""

    path: str
    shape: tuple[int, ...]
    spec: P
    dropped: tuple[tuple[int, tuple[str, ...]], ...]  # (dim, axes) left replicated because they don't divide


def _axes(entry: AxisEntry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def leaf_placement(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES,
                   strict: bool = True) -> Placement:
    """The placement of one leaf. Unmatched leaves: an error when `strict`, else replicated."""
    shape = tuple(int(s) for s in shape)
    match = next(((pattern, entries) for pattern, entries in rules if re.search(pattern, path)), None)
    if match is None:
        if strict:
            raise RuleError(f"no partition rule matches parameter {path!r} {shape}; add one to the rules")
        return Placement(path, shape, P(), ())
    pattern, entries = match
    if len(entries) != len(shape):
        raise RuleError(f"rule {pattern!r} gives {len(entries)} axes for {path!r}, which has shape {shape}")
    spec, dropped = [], []
    for dim, (size, entry) in enumerate(zip(shape, entries)):
        axes = tuple(a for a in _axes(entry) if axis_size(mesh, a) > 1)
        if axes and size % math.prod(axis_size(mesh, a) for a in axes):
            dropped.append((dim, axes))
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return Placement(path, shape, P(*spec), tuple(dropped))


def placements(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, strict: bool = True) -> Any:
    """A tree of `Placement`s matching `tree` (arrays or ShapeDtypeStructs). Scalars are replicated."""
    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        if not shape:
            return Placement(path_str(path), shape, P(), ())
        return leaf_placement(path_str(path), shape, mesh, rules, strict)

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, strict: bool = True) -> Any:
    """NamedShardings for every leaf of `tree` (params: strict; optimizer states: strict=False)."""
    return jax.tree_util.tree_map(lambda pl: NamedSharding(mesh, pl.spec),
                                  placements(tree, mesh, rules, strict),
                                  is_leaf=lambda x: isinstance(x, Placement))


def shard_params(params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
    """`params` placed on `mesh` by `rules` (every leaf must match a rule)."""
    return jax.device_put(params, tree_shardings(params, mesh, rules))


def place_report(params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> list[str]:
    """One line per parameter a rule wanted split on an axis its size does not divide."""
    lines = []
    for pl in jax.tree_util.tree_leaves(placements(params, mesh, rules), is_leaf=lambda x: isinstance(x, Placement)):
        for dim, axes in pl.dropped:
            n = math.prod(axis_size(mesh, a) for a in axes)
            lines.append(f"{pl.path} {pl.shape}: dim {dim} ({pl.shape[dim]}) is not divisible by {'x'.join(axes)}"
                         f"={n}; replicated on that axis")
    return lines


@dataclasses.dataclass(frozen=True)
class BucketPadding:
    """One width bucket of one MoE layer under an expert axis of size n."""

    layer: int
    bucket: int
    experts: int  # E_b
    slots: int  # E_b rounded up to a multiple of n: what the dispatch runs over
    width: int
    bytes_per_expert: int  # gate + up + down of one expert

    @property
    def sharded(self) -> bool:
        return self.slots == self.experts

    @property
    def padded_bytes(self) -> int:
        """Bytes the padded slots would take if they were stored (zeros)."""
        return (self.slots - self.experts) * self.bytes_per_expert


def expert_padding_report(cfg: ModelConfig, mesh: Mesh, itemsize: int = 4) -> dict[str, Any]:
    """What an expert axis costs a (pruned, non-uniform) model, in bytes.

    Per bucket: expert slots (E_b padded to a multiple of the expert axis n). Totals:
      padded_bytes: zero experts a padded *store* would hold (what we avoid storing);
      replicated_bytes_per_device: bytes each device holds beyond an ideal 1/n share, because
        buckets whose E_b is not a multiple of n are replicated over the expert axis;
      ideal_bytes_per_device: all routed-expert bytes / n.
    """
    n, D = axis_size(mesh, "expert"), cfg.hidden_size
    buckets, extra = [], 0
    for layer in cfg.moe_layers:
        for b, bucket in enumerate(cfg.expert_buckets(layer)):
            E_b = len(bucket.expert_ids)
            bp = BucketPadding(layer, b, E_b, -(-E_b // n) * n, bucket.width, 3 * D * bucket.width * itemsize)
            buckets.append(bp)
            if not bp.sharded:
                extra += E_b * bp.bytes_per_expert * (n - 1) // n
    total = sum(bp.experts * bp.bytes_per_expert for bp in buckets)
    return {"expert_axis": n, "buckets": buckets, "padded_bytes": sum(bp.padded_bytes for bp in buckets),
            "replicated_bytes_per_device": extra, "ideal_bytes_per_device": total // n,
            "unsharded_buckets": [(bp.layer, bp.bucket, bp.experts) for bp in buckets if not bp.sharded]}
