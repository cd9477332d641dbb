"""moe_jax.sharding beyond the data x expert matrix, in an 8-device worker (tests/sharding_worker.py,
group "models"), each check against the single-device result (float32, 1e-5 relative to the
largest value; greedy tokens exactly):

  forward on fsdp=2 x expert=2 x tensor=2 and generate on data=2 x expert=2 x tensor=2 (the KV
    cache split over batch x KV heads), with where the params land (`params_sharded`);
  the expert-parallel dispatch alone on expert=8 against the single-device MoE layer and a
    per-token loop, each device running "blocked", then "pallas" with gradients (`ep_layer`),
    a pruned non-uniform model (`pruned`), DeepSeek-V3 (MLA, dense first layer, group-limited
    router, `mla`); and what a launcher runs after `launch.place` (exact match, Fisher scores,
    pruning.apply) as plain jax.jit code on params sharded under the default mesh (`launch_place`).

A file of its own so that pytest-xdist (one file per worker) compiles it on another core than
the matrix (tests/test_sharding.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import SHARDING_CHECK_GROUPS, assert_sharding_check, run_sharding_worker


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    return run_sharding_worker("models", tmp_path_factory.mktemp("sharding_models"))


@pytest.mark.parametrize("name", SHARDING_CHECK_GROUPS["models"])
def test_sharded_matches_single_device(worker_results, name):
    assert_sharding_check(worker_results, name)
