"""pruning.select against a brute-force sort, compaction against masking, export against
transformers (expert scope) and against our own loader (non-uniform scopes)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_jax import hf, pruning
from moe_jax.model import forward
from moe_jax.pruning import PlanError, PruningPlan
from moe_jax.scoring import Scores
from tests.conftest import random_hf_checkpoint, scaled_params, tiny_config, transformers_logits


def _scores(cfg, seed=0, name="fisher", skew=None):
    """Random distinct scores (optionally one expert made worthless)."""
    rng = np.random.default_rng(seed)
    values = {}
    for i in cfg.moe_layers:
        arr = np.full((cfg.experts_per_layer[i], cfg.max_width(i)), np.nan)
        for e, w in enumerate(cfg.expert_widths[i]):
            arr[e, :w] = rng.uniform(size=w) * (1e-6 if skew and (i, e) in skew else 1.0) * (1 + 0.3 * i)
        values[cfg.layer_name(i)] = arr
    widths = {cfg.layer_name(i): tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
    return Scores({name: values}, widths, num_sequences=1, num_tokens=1)


def _kept_set(plan):
    return {(lyr, e, j) for lyr in plan.experts for e in plan.experts[lyr] for j in plan.dims[lyr][e]}


def _all_units(cfg, scores):
    return [(scores["fisher"][cfg.layer_name(lyr)][e, j], (lyr, e, j)) for lyr in cfg.moe_layers
            for e, w in enumerate(cfg.expert_widths[lyr]) for j in range(w)]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_scopes_keep_the_top_scores_of_their_pool(ratio):
    cfg = tiny_config("qwen2_moe", num_layers=3, dense_layers=(1,))
    s = _scores(cfg)
    units = _all_units(cfg, s)
    # global: the brute-force top of all units
    n_keep = len(units) - round(ratio * len(units))
    best = {u for _, u in sorted(units, reverse=True)[:n_keep]}
    plan = pruning.select(cfg, s, "fisher", "global", ratio, min_dims_per_expert=0, drop_empty_experts=True)
    assert plan.meta["experts_revived_for_top_k"] == 0
    assert _kept_set(plan) == best
    assert abs(plan.dims_removed_fraction() - ratio) < 1e-9
    # layer: each layer keeps its own top
    plan = pruning.select(cfg, s, "fisher", "layer", ratio, min_dims_per_expert=0, drop_empty_experts=True)
    for lyr in cfg.moe_layers:
        mine = [(v, u) for v, u in units if u[0] == lyr]
        top = {u for _, u in sorted(mine, reverse=True)[:len(mine) - round(ratio * len(mine))]}
        assert {u for u in _kept_set(plan) if u[0] == lyr} == top
    # expert: uniform widths stay uniform
    plan = pruning.select(cfg, s, "fisher", "expert", ratio)
    for lyr in cfg.moe_layers:
        assert set(plan.kept_widths(lyr)) == {24 - round(ratio * 24)}
        for e in plan.experts[lyr]:
            row = s["fisher"][cfg.layer_name(lyr)][e, :24]
            assert set(plan.dims[lyr][e]) == set(np.argsort(-row)[:len(plan.dims[lyr][e])])


def test_floor_and_dropping_empty_experts():
    cfg = tiny_config("mixtral", num_experts=4)
    worthless = {(0, 1), (0, 2), (0, 3), (1, 2)}
    s = _scores(cfg, skew=worthless)
    plan = pruning.select(cfg, s, "fisher", "global", 0.6, min_dims_per_expert=2)
    assert all(len(plan.dims[lyr][e]) >= 2 for lyr in plan.experts for e in plan.experts[lyr])
    assert plan.experts == {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}
    dropped = pruning.select(cfg, s, "fisher", "global", 0.6, drop_empty_experts=True)
    assert dropped.experts[1] == (0, 1, 3)
    assert len(dropped.experts[0]) == cfg.num_experts_per_tok  # never below top_k
    assert dropped.meta["experts_revived_for_top_k"] == 1
    with pytest.raises(PlanError, match="min_dims_per_expert=20"):
        pruning.select(cfg, s, "fisher", "global", 0.6, min_dims_per_expert=20)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_ratio_out_of_range(ratio):
    cfg = tiny_config("mixtral")
    with pytest.raises(PlanError, match="ratio"):
        pruning.select(cfg, _scores(cfg), "fisher", "global", ratio)


def test_unknown_method_scope_and_foreign_scores():
    cfg = tiny_config("mixtral")
    with pytest.raises(PlanError, match="method='activation'.*fisher"):
        pruning.select(cfg, _scores(cfg), "activation", "global", 0.5)
    with pytest.raises(PlanError, match="scope='model'"):
        pruning.select(cfg, _scores(cfg), "fisher", "model", 0.5)
    with pytest.raises(PlanError, match="another model"):
        pruning.select(cfg, _scores(tiny_config("mixtral", moe_intermediate_size=16)), "fisher", "global", 0.5)


@pytest.mark.parametrize("family,drop", [("qwen2_moe", False), ("olmoe", True), ("deepseek_v3", False),
                                         ("mixtral", True)])
def test_compaction_equals_masking(family, drop):
    cfg = tiny_config(family)
    params = scaled_params(cfg)
    skew = {(cfg.moe_layers[0], 5), (cfg.moe_layers[0], 6)} if drop else None
    plan = pruning.select(cfg, _scores(cfg, skew=skew), "fisher", "global", 0.5, drop_empty_experts=drop)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 11))
    masked = np.asarray(forward(cfg, params, tokens, pruning.masks(cfg, plan)))
    cfg2, params2 = pruning.apply(cfg, params, plan)
    compact = np.asarray(forward(cfg2, params2, tokens))
    np.testing.assert_allclose(compact, masked, atol=1e-5)
    assert np.abs(masked - np.asarray(forward(cfg, params, tokens))).max() > 1e-3
    assert pruning.routed_bytes(cfg2) < 0.6 * pruning.routed_bytes(cfg)
    if drop:
        assert sum(cfg2.experts_per_layer) < sum(cfg.experts_per_layer)


def test_plan_json_round_trip_and_foreign_model(tmp_path):
    cfg = tiny_config("qwen3_moe")
    plan = pruning.select(cfg, _scores(cfg), "fisher", "layer", 0.5)
    path = plan.save(tmp_path / "plan.json")
    back = PruningPlan.load(path)
    assert back == plan
    other = tiny_config("qwen3_moe", num_experts=6)
    with pytest.raises(PlanError, match="layer 0 has expert widths"):
        pruning.apply(other, scaled_params(other), back)
    (tmp_path / "broken.json").write_text('{"method": "fisher"}')
    with pytest.raises(PlanError, match="broken.json"):
        PruningPlan.load(tmp_path / "broken.json")


# ------------------------------------------------------------------------ export
def _hf_model(tmp_path):
    path = random_hf_checkpoint(tmp_path / "orig", num_hidden_layers=3, moe_intermediate_size=24, num_experts=6,
                               mlp_only_layers=[1])
    return hf.load_pretrained(path, dtype="float32")


def test_expert_scope_export_loads_in_transformers(tmp_path):
    cfg, params = _hf_model(tmp_path)
    plan = pruning.select(cfg, _scores(cfg), "fisher", "expert", 0.5)
    cfg2, params2 = pruning.apply(cfg, params, plan)
    assert cfg2.is_uniform
    hf.save_pretrained(cfg2, params2, tmp_path / "pruned")
    tokens = np.random.RandomState(1).randint(0, 96, (2, 12))
    ours = np.asarray(forward(cfg2, params2, tokens))
    theirs = transformers_logits(tmp_path / "pruned", tokens)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    import json
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["moe_intermediate_size"] == 12


def test_global_scope_export_round_trips_and_pads_for_stock_loaders(tmp_path):
    cfg, params = _hf_model(tmp_path)
    plan = pruning.select(cfg, _scores(cfg), "fisher", "global", 0.5)
    cfg2, params2 = pruning.apply(cfg, params, plan)
    assert not cfg2.is_uniform
    tokens = np.random.RandomState(2).randint(0, 96, (2, 12))
    ours = np.asarray(forward(cfg2, params2, tokens))
    hf.save_pretrained(cfg2, params2, tmp_path / "ragged")
    cfg3, params3 = hf.load_pretrained(tmp_path / "ragged", dtype="float32")
    assert cfg3.expert_widths == cfg2.expert_widths
    np.testing.assert_allclose(np.asarray(forward(cfg3, params3, tokens)), ours, atol=1e-6)
    cfg4, params4 = pruning.pad_to_uniform(cfg2, params2)
    hf.save_pretrained(cfg4, params4, tmp_path / "padded")
    np.testing.assert_allclose(transformers_logits(tmp_path / "padded", tokens), ours, atol=1e-4)
