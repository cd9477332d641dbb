"""Scale-out: meshes, partition rules and sharded entry points.

    mesh = sharding.make_mesh("data=2,expert=4")           # axes data, fsdp, expert, tensor
    params = sharding.shard_params(params, mesh)            # DEFAULT_RULES, every family
    logits = sharding.sharded_forward(cfg, mesh, impl="expert_parallel")(params, tokens)

Modules: `mesh` (building and checking meshes), `rules` (partition rules, placement, padding
report), `entry` (input/output shardings and jit-compiled sharded forward, generate and scoring).
The sharded train step is `moe_jax.training_step.sharded_train_step`; the expert-parallel dispatch
behind impl="expert_parallel" is the model's own (`moe_jax.model.expert_parallel`).
"""

from moe_jax.model.expert_parallel import BATCH_AXES
from moe_jax.sharding.entry import (
    batch_sharding,
    batch_spec,
    cache_axes,
    replicated,
    sharded_collect,
    sharded_forward,
    sharded_generate,
    train_state_shardings,
)
from moe_jax.sharding.mesh import MESH_AXES, MeshError, check_mesh_fits, make_mesh, parse_mesh_spec
from moe_jax.sharding.rules import (
    DEFAULT_RULES,
    RuleError,
    expert_padding_report,
    place_report,
    placements,
    shard_params,
    tree_shardings,
)

__all__ = [
    "BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "MeshError", "RuleError", "batch_sharding", "batch_spec",
    "cache_axes", "check_mesh_fits", "expert_padding_report", "make_mesh", "parse_mesh_spec", "place_report",
    "placements", "replicated", "shard_params", "sharded_collect", "sharded_forward", "sharded_generate",
    "train_state_shardings", "tree_shardings",
]
