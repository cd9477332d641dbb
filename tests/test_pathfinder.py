"""Expert pruning: the k-best-path DP and the path posterior against enumeration, trajectory
statistics against direct loops, NAEE against a brute-force numpy search, removal against
masking, export against transformers."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from moe_jax import hf, pruning, scoring
from moe_jax.model import forward
from moe_jax.model.layout import expert_weight
from moe_jax.pruning import PathfinderSettings, PlanError, k_best_paths
from moe_jax.pruning import pathfinder as pf
from moe_jax.pruning.experts import naee_layer
from moe_jax.scoring import trajectory
from tests.conftest import random_hf_checkpoint, scaled_params, tiny_config, transformers_logits


def _batches(cfg, n=2, B=3, T=10, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seg = np.ones((B, T), np.int32)
        seg[1, 7:] = 0
        out.append({"tokens": rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32), "segment_ids": seg})
    return out


@pytest.mark.parametrize("shape,k", [((3, 4, 2, 5), 7), ((5,), 3), ((2, 2, 2), 8), ((4, 3, 4, 3, 4), 20)])
def test_k_best_paths_equal_enumeration(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    node = [rng.normal(size=e) for e in shape]
    edge = [rng.normal(size=(a, b)) for a, b in zip(shape[:-1], shape[1:])]
    every = []
    for path in itertools.product(*[range(e) for e in shape]):
        score = sum(node[i][e] for i, e in enumerate(path)) + sum(edge[i][path[i], path[i + 1]]
                                                                  for i in range(len(path) - 1))
        every.append((score, path))
    every.sort(key=lambda x: -x[0])
    paths, scores = k_best_paths(node, edge, k)
    assert len(paths) == min(k, len(every))
    np.testing.assert_allclose(scores, [s for s, _ in every[:len(paths)]], rtol=1e-12)
    assert [tuple(p) for p in paths] == [p for _, p in every[:len(paths)]]


@pytest.mark.parametrize("shape", [(3, 4, 2, 5), (5,), (2, 3)])
def test_path_posterior_equals_enumeration(shape):
    """Expected visits of a path drawn with probability proportional to exp(score), two graphs batched."""
    rng = np.random.default_rng(len(shape))
    node = [rng.normal(scale=3.0, size=(2, e)) for e in shape]
    edge = [rng.normal(scale=3.0, size=(a, b)) for a, b in zip(shape[:-1], shape[1:])]
    got = pf.path_posterior(node, edge)
    for s in range(2):
        want = [np.zeros(e) for e in shape]
        scores, paths = [], list(itertools.product(*[range(e) for e in shape]))
        for path in paths:
            scores.append(sum(node[i][s, e] for i, e in enumerate(path))
                          + sum(edge[i][path[i], path[i + 1]] for i in range(len(path) - 1)))
        p = np.exp(np.array(scores) - max(scores))
        p /= p.sum()
        for w, path in zip(p, paths):
            for i, e in enumerate(path):
                want[i][e] += w
        for i in range(len(shape)):
            np.testing.assert_allclose(got[i][s], want[i], rtol=1e-9, atol=1e-12)


def test_k_best_paths_at_deepseek_v3_scale_runs():
    rng = np.random.default_rng(0)
    node = [rng.normal(size=256) for _ in range(58)]
    edge = [rng.normal(size=(256, 256)) for _ in range(57)]
    paths, scores = k_best_paths(node, edge, 10)
    assert paths.shape == (10, 58) and np.all(np.diff(scores) <= 0)


def _trajectory_oracle(cfg, params, batches):
    """Direct loops: per-token removal of each chosen expert with renormalised gates."""
    layers = list(cfg.moe_layers)
    recon = {cfg.layer_name(i): np.zeros(cfg.experts_per_layer[i]) for i in layers}
    count = {cfg.layer_name(i): np.zeros(cfg.experts_per_layer[i]) for i in layers}
    dense = {cfg.layer_name(i): np.zeros(cfg.experts_per_layer[i]) for i in layers}
    trans = {cfg.layer_name(i): np.zeros((cfg.experts_per_layer[i], cfg.experts_per_layer[j]))
             for i, j in zip(layers[:-1], layers[1:])}
    tokens = 0
    for batch in batches:
        rows = scoring.calibration_rows(batch)
        _, aux = forward(cfg, params, rows["inputs"], segment_ids=rows["segment_ids"],
                         capture=("moe_inputs", "routing"), impl="dense")
        for b, t in zip(*np.nonzero(rows["segment_ids"] > 0)):
            tokens += 1
            for n, i in enumerate(layers):
                name = cfg.layer_name(i)
                a = aux[name]
                x = np.asarray(a["x"][b, t], np.float64)
                idx, w = np.asarray(a["idx_TK"][b, t]), np.asarray(a["weights_TK"][b, t], np.float64)
                f = {}
                for e in range(cfg.experts_per_layer[i]):
                    we = {k: np.asarray(v, np.float64) for k, v in expert_weight(cfg, params, i, e).items()}
                    g = x @ we["gate"]
                    f[e] = (g / (1 + np.exp(-g)) * (x @ we["up"])) @ we["down"]
                y = sum(w[k] * f[idx[k]] for k in range(len(idx)))
                for k, e in enumerate(idx):
                    rest = [j for j in range(len(idx)) if j != k]
                    y_without = sum(w[j] * f[idx[j]] for j in rest) * w.sum() / w[rest].sum()
                    recon[name][e] += np.linalg.norm(y - y_without)
                    count[name][e] += 1
                for e in f:
                    dense[name][e] += np.linalg.norm(y - f[e])
                if n + 1 < len(layers):
                    nxt = np.asarray(aux[cfg.layer_name(layers[n + 1])]["idx_TK"][b, t])
                    for e in idx:
                        for e2 in nxt:
                            trans[name][e, e2] += 1
    return ({k: recon[k] / np.maximum(count[k], 1) for k in recon}, count,
            {k: v / tokens for k, v in dense.items()}, trans)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_trajectory_statistics_match_direct_loops(family):
    cfg = tiny_config(family, num_layers=3, dense_layers=())
    params = scaled_params(cfg)
    batches = _batches(cfg)
    got = scoring.collect(cfg, params, batches, ["trajectory", "recon_dense", "routing"], micro_batch_size=2,
                          progress=False, sample_tokens=7)
    recon, count, dense, trans = _trajectory_oracle(cfg, params, batches)
    for name in recon:
        np.testing.assert_allclose(got["expert_recon_routed"][name], recon[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["expert_recon_dense"][name], dense[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["seq_count"][name].sum(0), count[name])
        np.testing.assert_allclose(got["expert_count"][name], count[name])
        assert got["seq_count"][name].shape == (got.num_sequences, cfg.experts_per_layer[0])
        assert got["moe_input_sample"][name].shape == (7, cfg.hidden_size)
    for name in trans:
        np.testing.assert_allclose(got["transitions"][name], trans[name])


def test_trajectory_recomputes_expert_outputs_when_not_captured():
    """Expert parallelism captures no expert outputs: the trajectory then runs the routed
    experts itself, with the same statistics (routed and dense reconstruction error included)."""
    cfg = tiny_config("qwen2_moe", num_layers=2, dense_layers=())
    params = scaled_params(cfg)
    rows = scoring.calibration_rows(_batches(cfg, 1)[0])
    _, aux = forward(cfg, params, rows["inputs"], segment_ids=rows["segment_ids"],
                     capture=trajectory.captures("auto"))
    valid_BT = rows["segment_ids"] > 0
    for i in cfg.moe_layers:
        a = aux[cfg.layer_name(i)]
        assert a["expert_outputs"].shape == (*a["idx_TK"].shape, cfg.hidden_size)
        without = {k: v for k, v in a.items() if k != "expert_outputs"}
        got = trajectory.layer_trajectory(cfg, params, i, a, valid_BT, dense=True)
        want = trajectory.layer_trajectory(cfg, params, i, without, valid_BT, dense=True)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    assert "expert_outputs" not in trajectory.captures("expert_parallel")


def _numpy_subset_error(cfg, params, layer, x, subset):
    """Mixtral routing by hand: softmax over the subset's logits, top-k, renormalise."""
    wr = np.asarray(params[cfg.layer_name(layer)]["moe"]["router"]["kernel"], np.float64)
    ws = [{k: np.asarray(v, np.float64) for k, v in expert_weight(cfg, params, layer, e).items()}
          for e in range(cfg.experts_per_layer[layer])]

    def out(xt, allowed):
        logits = xt @ wr
        logits = np.where(np.isin(np.arange(len(logits)), allowed), logits, -np.inf)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:cfg.num_experts_per_tok]
        w = p[top] / p[top].sum()
        f = lambda e: (lambda g: (g / (1 + np.exp(-g)) * (xt @ ws[e]["up"])) @ ws[e]["down"])(xt @ ws[e]["gate"])
        return sum(wi * f(e) for wi, e in zip(w, top))

    allx = list(range(cfg.experts_per_layer[layer]))
    return np.mean([np.sum((out(xt, allx) - out(xt, subset)) ** 2) for xt in x.astype(np.float64)])


def test_naee_exhaustive_matches_brute_force():
    cfg = tiny_config("mixtral", num_experts=6, num_layers=1)
    params = scaled_params(cfg)
    x = np.random.default_rng(1).normal(size=(12, cfg.hidden_size)).astype(np.float32)
    kept, err = naee_layer(cfg, params, 0, x, 3)
    brute = {s: _numpy_subset_error(cfg, params, 0, x, list(s)) for s in itertools.combinations(range(6), 3)}
    best = min(brute, key=brute.get)
    assert kept == best
    np.testing.assert_allclose(err, brute[best], rtol=1e-4)


@pytest.mark.parametrize("method,allocation", [("pathfinder", "global"), ("pathfinder", "uniform"),
                                               ("frequency", "global"), ("reap", "uniform"), ("naee", "uniform"),
                                               ("soft_count", "global"), ("random_experts", "uniform")])
def test_expert_removal_equals_masking(method, allocation):
    cfg = tiny_config("qwen2_moe", num_layers=3, dense_layers=())
    params = scaled_params(cfg)
    scores = scoring.collect(cfg, params, _batches(cfg, 3), ["trajectory", "routing"], progress=False)
    plan = pruning.select(cfg, scores, method, allocation, 0.5, params=params)
    total = sum(cfg.experts_per_layer)
    assert sum(len(v) for v in plan.experts.values()) == total - total // 2
    assert all(len(v) >= cfg.num_experts_per_tok for v in plan.experts.values())
    if allocation == "uniform":
        assert {len(v) for v in plan.experts.values()} == {4}
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    masked = np.asarray(forward(cfg, params, tokens, pruning.masks(cfg, plan)))
    cfg2, params2 = pruning.apply(cfg, params, plan)
    np.testing.assert_allclose(np.asarray(forward(cfg2, params2, tokens)), masked, atol=1e-5)
    assert pruning.routed_bytes(cfg2) == pruning.routed_bytes(cfg) // 2
    assert pruning.PruningPlan.from_dict(plan.to_dict()) == plan


def test_pathfinder_keeps_experts_on_paths_and_layers_differ():
    cfg = tiny_config("mixtral", num_layers=4, dense_layers=())
    params = scaled_params(cfg)
    scores = scoring.collect(cfg, params, _batches(cfg, 4, B=4), ["trajectory", "routing"], progress=False)
    reference = PathfinderSettings(path_topk=3, counting="k_best", layer_scale="none", w_strength=1.0)
    plan = pruning.select(cfg, scores, "pathfinder", "global", 0.5, pathfinder=reference)
    freq = plan.meta["path_frequency"]
    for i, lyr in enumerate(cfg.moe_layers):  # every expert on a path outranks every expert on none
        on = [e for e in range(8) if freq[i][e] > 0]
        if len(on) <= len(plan.experts[lyr]):
            assert set(on) <= set(plan.experts[lyr])
    with pytest.raises(PlanError, match="fewer than top_k"):
        pruning.select(cfg, scores, "frequency", "uniform", 0.9)
    with pytest.raises(PlanError, match="cannot give each"):
        pruning.select(cfg, scores, "pathfinder", "global", 0.9)
    with pytest.raises(PlanError, match="needs the statistics"):
        pruning.select(cfg, scoring.collect(cfg, params, _batches(cfg, 1), ["routing"], progress=False),
                       "pathfinder", "global", 0.5)
    with pytest.raises(PlanError, match="use allocation 'uniform'"):
        pruning.select(cfg, scores, "naee", "global", 0.5, params=params)
    empty = scoring.Scores({k: {n: v[:0] for n, v in per.items()} if k.startswith("seq_") else per
                            for k, per in scores.values.items()}, scores.widths, 0, 0)
    with pytest.raises(PlanError, match="empty trajectory set"):
        pruning.select(cfg, empty, "pathfinder", "global", 0.5)


def test_uniform_expert_removal_exports_to_transformers(tmp_path):
    random_hf_checkpoint(tmp_path / "orig")
    cfg, params = hf.load_pretrained(tmp_path / "orig", dtype="float32")
    scores = scoring.collect(cfg, params, _batches(cfg, 2), ["routing"], progress=False)
    plan = pruning.select(cfg, scores, "frequency", "uniform", 0.25)
    cfg2, params2 = pruning.apply(cfg, params, plan)
    assert cfg2.is_uniform and cfg2.experts_per_layer[0] == 6
    hf.save_pretrained(cfg2, params2, tmp_path / "pruned")
    tokens = np.random.RandomState(3).randint(0, 96, (2, 10))
    theirs = transformers_logits(tmp_path / "pruned", tokens)
    np.testing.assert_allclose(theirs, np.asarray(forward(cfg2, params2, tokens)), atol=1e-4)


def test_expert_then_dim_pruning_compose():
    """Prune experts, score the survivors' dims on the smaller model, prune those: equal to masking it."""
    cfg = tiny_config("olmoe", num_layers=2, dense_layers=())
    params = scaled_params(cfg)
    scores = scoring.collect(cfg, params, _batches(cfg, 2), ["trajectory", "routing"], progress=False)
    cfg2, params2 = pruning.apply(cfg, params, pruning.select(cfg, scores, "pathfinder", "global", 0.25))
    fisher = scoring.collect(cfg2, params2, _batches(cfg2, 2), ["fisher"], progress=False)
    plan = pruning.select(cfg2, fisher, "fisher", "global", 0.5)
    cfg3, params3 = pruning.apply(cfg2, params2, plan)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(np.asarray(forward(cfg3, params3, tokens)),
                               np.asarray(forward(cfg2, params2, tokens, pruning.masks(cfg2, plan))), atol=1e-5)
    assert sum(map(sum, cfg3.expert_widths)) == sum(map(sum, cfg2.expert_widths)) // 2
    assert sum(cfg3.experts_per_layer) == sum(cfg.experts_per_layer) * 3 // 4


def test_group_limited_routing_refuses_regrouping_but_masks_work():
    cfg = tiny_config("deepseek_v3")  # 8 experts in n_group=4 groups of 2
    params = scaled_params(cfg)
    layer = cfg.moe_layers[0]
    widths = {i: tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
    uneven = {i: (0, 1, 2, 3, 4, 6) if i == layer else tuple(range(8)) for i in cfg.moe_layers}
    plan = pruning.PruningPlan("manual", "global", 0.125, widths, uneven,
                               {i: {e: tuple(range(widths[i][e])) for e in uneven[i]} for i in cfg.moe_layers})
    with pytest.raises(PlanError, match=r"keep \[2, 2, 1, 1\] experts in its 4 router groups"):
        pruning.apply(cfg, params, plan)
    forward(cfg, params, np.zeros((1, 4), np.int32), pruning.masks(cfg, plan))  # simulation still runs
    even = {i: (0, 2, 4, 6) if i == layer else tuple(range(8)) for i in cfg.moe_layers}
    plan = pruning.PruningPlan("manual", "global", 0.25, widths, even,
                               {i: {e: tuple(range(widths[i][e])) for e in even[i]} for i in cfg.moe_layers})
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 7))
    cfg2, params2 = pruning.apply(cfg, params, plan)
    np.testing.assert_allclose(np.asarray(forward(cfg2, params2, tokens)),
                               np.asarray(forward(cfg, params, tokens, pruning.masks(cfg, plan))), atol=1e-5)


def test_pathfinder_priority_prices_visits_by_reconstruction_error():
    """"expert": sum over sequences of e's expected visits x the sequence's mean routed
    reconstruction error per token routed to e; "recon": visits x the sequence's error summed
    over the layer. Either way a layer whose experts change the output 100x more keeps more."""
    cfg = tiny_config("mixtral", num_layers=4, dense_layers=())
    params = scaled_params(cfg)
    scores = scoring.collect(cfg, params, _batches(cfg, 4, B=4), ["trajectory", "routing"], progress=False)
    settings = PathfinderSettings()
    assert settings.layer_scale == "expert"
    visits = pf.path_visits(cfg, scores, settings)
    for v in visits:  # posterior counting: path_topk visits per sequence and layer, spread over the experts
        np.testing.assert_allclose(v.sum(-1), settings.path_topk)
    by_expert = pf.path_priority(cfg, scores, settings)
    by_layer = pf.path_priority(cfg, scores, dataclasses.replace(settings, layer_scale="recon"))
    for i, lyr in enumerate(cfg.moe_layers):
        recon = np.asarray(scores["seq_recon_routed"][cfg.layer_name(lyr)])
        count = np.asarray(scores["seq_count"][cfg.layer_name(lyr)])
        want_layer, want_expert = np.zeros(8), np.zeros(8)
        for s in range(len(recon)):
            want_layer += recon[s].sum() * visits[i][s]
            for e in range(8):
                if count[s, e]:
                    want_expert[e] += visits[i][s, e] * recon[s, e] / count[s, e]
        np.testing.assert_allclose(by_layer[i], want_layer, rtol=1e-12)
        np.testing.assert_allclose(by_expert[i], want_expert, rtol=1e-12)
    loud = cfg.moe_layers[1]
    values = {k: dict(v) for k, v in scores.values.items()}
    values["seq_recon_routed"][cfg.layer_name(loud)] = 100.0 * values["seq_recon_routed"][cfg.layer_name(loud)]
    values["expert_reap"][cfg.layer_name(loud)] = 100.0 * values["expert_reap"][cfg.layer_name(loud)]
    louder = scoring.Scores(values, scores.widths, scores.num_sequences, scores.num_tokens)
    for method, scale in (("pathfinder", "expert"), ("pathfinder", "recon"), ("reap", None)):
        priced = dataclasses.replace(settings, layer_scale=scale or "expert")  # global: signals compared as they are
        before = pruning.select(cfg, scores, method, "global", 0.5, pathfinder=priced)
        plan = pruning.select(cfg, louder, method, "global", 0.5, pathfinder=priced)
        kept = {lyr: len(v) for lyr, v in plan.experts.items()}
        assert kept[loud] > len(before.experts[loud]) and kept[loud] == max(kept.values()), (method, plan.experts)
        assert kept[loud] >= cfg.experts_per_layer[loud] - 1, (method, plan.experts)
        assert sum(len(v) for v in plan.experts.values()) == sum(cfg.experts_per_layer[i] for i in cfg.moe_layers) // 2
    with pytest.raises(PlanError, match="counting='top'"):
        pruning.select(cfg, scores, "pathfinder", "global", 0.5, pathfinder=PathfinderSettings(counting="top"))
    with pytest.raises(PlanError, match="layer_scale='norm'"):
        pruning.select(cfg, scores, "pathfinder", "global", 0.5, pathfinder=PathfinderSettings(layer_scale="norm"))
