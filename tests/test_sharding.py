"""moe_jax.sharding against the single-device model: mesh, rule and flag errors in-process, and the
scale-out matrix in an 8-device worker.

The matrix, one test per cell: sharded forward logits, greedy generation with the KV cache,
Fisher scores (`sharded_collect`) and one training step (`training_step.sharded_train_step`: params, loss)
on each of the meshes data=8 (8x1), data=2 x expert=4 (2x4) and expert=8 (1x8), data x expert;
impl="expert_parallel" where the expert axis is > 1, "dense" (GSPMD) on data=8. Each is
compared with the single-device result (float32, 1e-5 relative to the largest value; greedy
tokens exactly). The checks run in ONE subprocess with 8 forced host devices
(tests/sharding_worker.py, group "matrix"), so the rest of the suite keeps one device and JAX
starts once; the fsdp / tensor axes, the launchers' path and other models are the "models"
group (tests/test_sharding_models.py), which compiles on another core. The layer-by-layer
scorer against the in-memory one is tests/test_layerwise.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.conftest import SHARDING_CHECK_GROUPS, assert_sharding_check, run_sharding_worker


def test_mesh_errors_name_the_value():
    from moe_jax import sharding

    with pytest.raises(sharding.MeshError, match=r"multiply to 2, but there are 1 devices"):
        sharding.make_mesh("data=2")
    with pytest.raises(sharding.MeshError, match=r"fixed axes' product 3 does not divide the 8 devices"):
        sharding.mesh.resolve_axis_sizes(sharding.parse_mesh_spec("expert=3,data=-1"), 8)
    with pytest.raises(sharding.MeshError, match=r"unknown axis \['model'\]"):
        sharding.parse_mesh_spec("data=2,model=4")
    with pytest.raises(sharding.MeshError, match="only one axis may be -1"):
        sharding.parse_mesh_spec("data=-1,expert=-1")
    with pytest.raises(sharding.MeshError, match=r"size 'x' of axis 'data'"):
        sharding.parse_mesh_spec("data=x")
    assert sharding.mesh.resolve_axis_sizes(sharding.parse_mesh_spec("expert=4,data=-1"), 8) == {
        "data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    from tests.conftest import tiny_config

    cfg = tiny_config("mixtral", num_experts=4)
    with pytest.raises(sharding.MeshError, match=r"expert=8 is larger than layer 0's 4 experts"):
        sharding.check_mesh_fits(cfg, jax.sharding.AbstractMesh((1, 1, 8, 1), sharding.MESH_AXES))


def test_distributed_flag_errors_name_the_flag():
    from moe_jax.launch import LaunchError, check_distributed

    assert check_distributed(None, None, None) is False
    assert check_distributed(None, 1, 0) is False
    assert check_distributed("host:1234", 2, 1) is True
    with pytest.raises(LaunchError, match="--num_processes=2 needs --coordinator_address"):
        check_distributed(None, 2, 0)
    with pytest.raises(LaunchError, match=r"--process_id=2 must lie in \[0, num_processes=2\)"):
        check_distributed("host:1234", 2, 2)
    with pytest.raises(LaunchError, match="--num_processes=None"):
        check_distributed("host:1234", None, 0)
    with pytest.raises(LaunchError, match="expected host:port"):
        check_distributed("host", 2, 0)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_rules_place_every_parameter_of_every_family(family):
    from jax.sharding import PartitionSpec as P

    from moe_jax import sharding
    from moe_jax.model import param_shapes
    from moe_jax.sharding.rules import Placement
    from tests.conftest import tiny_config

    cfg = tiny_config(family)
    mesh = jax.sharding.AbstractMesh((1, 2, 4, 2), sharding.MESH_AXES)
    placed = jax.tree_util.tree_leaves(sharding.placements(param_shapes(cfg), mesh),
                                       is_leaf=lambda x: isinstance(x, Placement))  # strict: raises if unmatched
    by_path = {p.path: p for p in placed}
    for i in cfg.moe_layers:
        assert by_path[f"layer_{i}/moe/experts/bucket_0/gate"].spec == P("expert", "fsdp", "tensor")
        assert by_path[f"layer_{i}/moe/experts/bucket_0/down"].spec == P("expert", "tensor", "fsdp")
        assert by_path[f"layer_{i}/moe/router/kernel"].spec == P()
    sharded = [p for p in placed if p.spec != P()]
    assert len(sharded) > len(placed) / 3, [p.path for p in placed if p.spec == P()]
    with pytest.raises(sharding.RuleError, match="no partition rule matches parameter 'foo/kernel'"):
        sharding.placements({"foo": {"kernel": np.zeros((2, 2))}}, mesh)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    return run_sharding_worker("matrix", tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("name", SHARDING_CHECK_GROUPS["matrix"])
def test_sharded_matches_single_device(worker_results, name):
    assert_sharding_check(worker_results, name)
