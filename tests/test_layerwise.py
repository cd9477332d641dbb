"""scoring.collect_layerwise against the in-memory scoring.collect (the oracle), a spy on which
layers' weights are on the device at once, and bad input."""

from __future__ import annotations

import weakref

import jax
import numpy as np
import pytest

from moe_jax import scoring
from moe_jax.scoring import ScoringError, layerwise
from tests.conftest import scaled_params, scoring_batches, tiny_config

IMPL = "dense"  # every dispatch path gives the same numbers (tests/test_moe.py); this one compiles fastest


def _host(params):
    return jax.tree_util.tree_map(np.asarray, params)


def _assert_same_scores(got, want, rtol=1e-5):
    assert set(got.values) == set(want.values)
    assert (got.num_sequences, got.num_tokens, got.widths) == (want.num_sequences, want.num_tokens, want.widths)
    for stat, per_layer in want.values.items():
        assert set(got.values[stat]) == set(per_layer), stat
        for layer, ref in per_layer.items():
            real = np.isfinite(ref)
            assert np.array_equal(real, np.isfinite(got.values[stat][layer])), (stat, layer)
            scale = np.abs(ref[real]).max() if real.any() else 0.0
            np.testing.assert_allclose(got.values[stat][layer][real], ref[real], rtol=rtol, atol=rtol * scale,
                                       err_msg=f"{stat} {layer}")


class _ResidencySpy:
    """Wraps layerwise._to_device: at each load, counts earlier loads whose device buffers are
    still alive and not deleted, i.e. the weight trees resident on the device at once."""

    def __init__(self, real):
        self.real, self.loads, self.peak = real, [], 0

    def __call__(self, tree, device):
        out = self.real(tree, device)
        refs = [weakref.ref(leaf) for leaf in jax.tree_util.tree_leaves(out)]
        self.loads.append((sorted(tree), refs))
        resident = sum(any(r() is not None and not r().is_deleted() for r in leaf_refs) for _, leaf_refs in self.loads)
        self.peak = max(self.peak, resident)
        return out


@pytest.mark.parametrize("family,layers,statistics", [
    ("qwen2_moe", 2, ("fisher", "grad_abs", "activation", "routing")),  # dense last layer, shared expert
    ("deepseek_v3", 2, ("fisher",)),  # dense first layer, MLA, sigmoid group-limited router
])
def test_layerwise_equals_collect_with_one_layer_resident(family, layers, statistics, monkeypatch):
    cfg = tiny_config(family, num_layers=layers)
    params = scaled_params(cfg)
    batches = scoring_batches(cfg)
    want = scoring.collect(cfg, params, batches, statistics, micro_batch_size=2, progress=False, impl=IMPL)
    spy = _ResidencySpy(layerwise._to_device)
    monkeypatch.setattr(layerwise, "_to_device", spy)
    got = scoring.collect_layerwise(cfg, _host(params), batches, statistics, micro_batch_size=2, progress=False,
                                    impl=IMPL)
    for name in want["fisher"]:
        assert np.nanmax(want["fisher"][name]) > 1e-6  # the oracle is not trivially zero
    _assert_same_scores(got, want)
    # Forward: every layer; head; backward: from the last layer down to the first MoE layer.
    layer_loads = [keys for keys, _ in spy.loads if "attn" in keys]
    assert len(layer_loads) == cfg.num_layers + cfg.num_layers - min(cfg.moe_layers)
    assert len(spy.loads) == len(layer_loads) + 1  # and the head, once
    assert spy.peak == 1


def test_layerwise_trajectory_equals_collect_and_the_spy_sees_unfreed_weights(monkeypatch):
    cfg = tiny_config("mixtral", num_layers=2)
    params, batches = scaled_params(cfg), scoring_batches(cfg, n_batches=2)
    run = dict(micro_batch_size=3, progress=False, sample_tokens=20, impl=IMPL)
    want = scoring.collect(cfg, params, batches, ["trajectory"], **run)
    got = scoring.collect_layerwise(cfg, _host(params), batches, ["trajectory"], **run)
    assert want["transitions"]["layer_0"].sum() > 0
    _assert_same_scores(got, want)
    # The residency check can fail: a scorer that never frees a layer's weights peaks above 1.
    spy = _ResidencySpy(layerwise._to_device)
    monkeypatch.setattr(layerwise, "_to_device", spy)
    kept = []
    monkeypatch.setattr(layerwise, "_release", kept.append)
    scoring.collect_layerwise(cfg, _host(params), batches, ["trajectory"], **run)
    assert spy.peak == len(spy.loads) == cfg.num_layers  # forward only: no gradient statistic


def test_bad_input_errors():
    cfg = tiny_config("mixtral", num_layers=2)
    params = _host(scaled_params(cfg))
    batches = scoring_batches(cfg, n_batches=1)
    with pytest.raises(ScoringError, match="unknown.*'fishr'"):
        scoring.collect_layerwise(cfg, params, batches, ["fishr"])
    with pytest.raises(ScoringError, match="micro_batch_size must be >= 1, got 0"):
        scoring.collect_layerwise(cfg, params, batches, ["fisher"], micro_batch_size=0)
    with pytest.raises(ScoringError, match=r"params lack \['layer_1'\]"):
        scoring.collect_layerwise(cfg, {k: v for k, v in params.items() if k != "layer_1"}, batches, ["fisher"])
    empty = [{"tokens": np.ones((2, 6), np.int32), "segment_ids": np.zeros((2, 6), np.int32)}]
    with pytest.raises(ScoringError, match="no calibration tokens"):
        scoring.collect_layerwise(cfg, params, empty, ["fisher"], progress=False)
    with pytest.raises(ScoringError, match="'tokens' has shape"):
        scoring.collect_layerwise(cfg, params, [np.ones((4,), np.int32)], ["fisher"], progress=False)
