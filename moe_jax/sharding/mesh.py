"""Device meshes for moe_jax: four named axes, sizes from a launcher string, checked up front.

Axes (every mesh has all four, size 1 when unused, so partition rules never ask whether an
axis exists):

  data     pure data parallelism: params replicated, batch split.
  fsdp     batch split *and* params sharded (gathered per use by XLA).
  expert   batch split, routed experts' stacked expert dim sharded (expert parallelism).
  tensor   attention heads, MLP widths and vocab split; batch not split.

A spec is "data=2,expert=4"; one axis may be -1 ("the rest of the devices"). Every check runs
before any device work, and each error names the value that is wrong and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moe_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")


class MeshError(ValueError):
    """A mesh that cannot be built or does not fit the model, with the offending value named."""


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """"data=2,expert=4" (or a dict) -> {axis: size} over all MESH_AXES (missing axes 1).

    At most one axis may be -1; `resolve_axis_sizes` fills it in once the device count is known.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {a: 1 for a in MESH_AXES}
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or not name:
                raise MeshError(f"mesh spec {spec!r}: item {part!r} is not 'axis=size' (e.g. 'data=2,expert=4')")
            if name in items:
                raise MeshError(f"mesh spec {spec!r}: axis {name!r} is given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh spec {spec!r}: size {value.strip()!r} of axis {name!r} is not an "
                                "integer") from None
    else:
        items = {str(k): int(v) for k, v in spec.items()}
    unknown = sorted(set(items) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh spec {spec!r}: unknown axis {unknown}; expected some of {MESH_AXES}")
    for name, size in items.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh spec {spec!r}: axis {name}={size}; sizes are positive, or -1 for the rest")
    if sum(size == -1 for size in items.values()) > 1:
        raise MeshError(f"mesh spec {spec!r}: only one axis may be -1 ('the rest of the devices')")
    return {a: items.get(a, 1) for a in MESH_AXES}


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill in a -1 axis and check the product equals `num_devices`."""
    sizes = dict(sizes)
    known = math.prod(s for s in sizes.values() if s != -1)
    rest = [a for a, s in sizes.items() if s == -1]
    shown = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1)
    if rest:
        if num_devices % known:
            raise MeshError(f"mesh {shown}: the fixed axes' product {known} does not divide the {num_devices} "
                            f"devices, so {rest[0]}=-1 has no integer size")
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise MeshError(f"mesh {shown or '(all axes 1)'}: axis sizes multiply to {known}, but there are "
                        f"{num_devices} devices; make the product {num_devices} or give one axis -1")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES in that order, GSPMD (Auto) axis types.

    `spec=None` puts every device on `data`, so a plain call is pure data parallelism.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec if spec is not None else {"data": -1})
    sizes = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, name: str) -> int:
    """Size of `name` in `mesh` (1 when the mesh lacks the axis)."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if hasattr(mesh, "axis_sizes") else \
        dict(mesh.shape).get(name, 1)


def check_mesh_fits(cfg: ModelConfig, mesh) -> None:
    """Refuse an expert axis wider than some MoE layer's expert count (devices would own nothing)."""
    n = axis_size(mesh, "expert")
    for layer in cfg.moe_layers:
        if n > cfg.experts_per_layer[layer]:
            raise MeshError(f"mesh axis expert={n} is larger than layer {layer}'s {cfg.experts_per_layer[layer]} "
                            f"experts; use expert <= {min(cfg.experts_per_layer[i] for i in cfg.moe_layers)}")
