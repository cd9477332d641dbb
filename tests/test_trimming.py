"""Dynamic trimming: the per-token rule, real work skipped, policies, calibration, telemetry."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import telemetry, trimming
from moe_jax.model import decode, forward, moe
from moe_jax.trimming import LayerTrim, RouterDriftError, TrimmingError, TrimmingPolicy
from tests.conftest import expert_case, experts_oracle, scaled_params, tiny_config

BUILT_IN = Path(__file__).resolve().parents[1] / "checkpoints" / "skills_tiny"


def trim_oracle(w, tau=0.0, top_p=1.0, max_active=None):
    """The documented rule, one token at a time in float64: (kept flags, new weights)."""
    w = np.asarray(w, np.float64)
    out_keep, out_w = np.zeros(w.shape, bool), np.zeros(w.shape)
    for t, row in enumerate(w):
        g = row / row.sum()
        order = sorted(range(len(row)), key=lambda k: (-g[k], k))
        mass = 0.0
        for rank, k in enumerate(order):
            ok = g[k] >= tau and (mass < top_p or top_p >= 1) and rank < (max_active or len(row))
            out_keep[t, k] = ok or rank == 0
            mass += g[k]
        kept = row[out_keep[t]].sum()
        out_w[t] = np.where(out_keep[t], row * row.sum() / kept, 0.0)
    return out_keep, out_w


def _routing(w):
    w = jnp.asarray(w, jnp.float32)
    T, K = w.shape
    return moe.Routing(jnp.zeros((T, 8)), jnp.zeros((T, 8)), jnp.tile(jnp.arange(K, dtype=jnp.int32), (T, 1)), w)


HAND = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.34, 0.33, 0.33], [1.2, 0.5, 0.3]])  # last: unnormalised


@pytest.mark.parametrize("kwargs, survivors", [
    (dict(tau=0.15), [[0, 1], [1, 2], [0, 1, 2], [0, 1, 2]]),
    (dict(tau=0.31), [[0], [1], [0, 1, 2], [0]]),
    (dict(top_p=0.8), [[0, 1], [1, 2], [0, 1, 2], [0, 1]]),
    (dict(max_active=1), [[0], [1], [0], [0]]),
    (dict(tau=0.2, max_active=2), [[0, 1], [1, 2], [0, 1], [0, 1]]),
])
def test_hand_built_router_gives_expected_survivors(kwargs, survivors):
    r = jax.jit(lambda r: moe.trim(r, **kwargs))(_routing(HAND))
    got = [np.flatnonzero(a).tolist() for a in np.asarray(r.active_TK)]
    assert got == survivors
    keep, w = trim_oracle(HAND, **kwargs)
    np.testing.assert_array_equal(np.asarray(r.active_TK), keep)
    np.testing.assert_allclose(np.asarray(r.weights_TK), w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.weights_TK).sum(-1), HAND.sum(-1), rtol=1e-6)  # output scale kept


def test_trim_matches_oracle_on_random_gates():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(4) * 0.7, size=200) * rng.uniform(0.5, 2.0, size=(200, 1))
    for kwargs in (dict(tau=0.1), dict(top_p=0.6), dict(max_active=2), dict(tau=0.05, top_p=0.9, max_active=3)):
        r = moe.trim(_routing(w), **kwargs)
        keep, new_w = trim_oracle(w, **kwargs)
        np.testing.assert_array_equal(np.asarray(r.active_TK), keep)
        np.testing.assert_allclose(np.asarray(r.weights_TK), new_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])  # softmax unnormalised; sigmoid + groups
def test_identity_policy_reproduces_untrimmed_logits_exactly(family):
    cfg = tiny_config(family)
    params = scaled_params(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 12))
    policy = TrimmingPolicy.for_model(cfg, params, LayerTrim(tau=0.0, top_p=1.0, max_active=cfg.num_experts_per_tok))
    masks = policy.masks(cfg, params)
    np.testing.assert_array_equal(np.asarray(forward(cfg, params, tokens)),
                                  np.asarray(forward(cfg, params, tokens, masks)))
    if family == "qwen2_moe":  # the KV-cached path too (one family: each generate compiles twice)
        np.testing.assert_array_equal(decode.generate(cfg, params, tokens, 4),
                                      decode.generate(cfg, params, tokens, 4, masks=masks))
    trimmed = TrimmingPolicy.for_model(cfg, params, LayerTrim(max_active=1)).masks(cfg, params)
    assert not np.allclose(np.asarray(forward(cfg, params, tokens)), np.asarray(forward(cfg, params, tokens, trimmed)))


def _trimmed_case(seed=0):
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case("mask_ef", seed=seed)
    r = moe.trim(moe.Routing(jnp.zeros((len(x), 8)), jnp.zeros((len(x), 8)), jnp.asarray(idx), jnp.asarray(w)),
                 tau=0.45)
    return cfg, per_expert, params, x, idx, r, mask


@pytest.mark.parametrize("impl", ["blocked", "dense", "ragged", "gather"])
def test_trimmed_dispatch_matches_oracle_over_survivors(impl):
    cfg, per_expert, params, x, idx, r, mask = _trimmed_case()
    active = np.asarray(r.active_TK)
    assert 0 < (~active).sum() < active.size  # some rows dropped, not all
    y, stats = jax.jit(functools.partial(moe.experts_forward, cfg, 0, impl=impl, collect_stats=True))(
        params, x, r, dims_mask=mask)
    # Oracle: each token over its surviving experts only.
    ys, counts = [], np.zeros(8)
    for t in range(len(x)):
        keep = active[t]
        yt, st = experts_oracle(cfg, per_expert, x[t:t + 1], idx[t:t + 1, keep],
                                np.asarray(r.weights_TK)[t:t + 1, keep], mask)
        ys.append(yt[0])
        counts += st["count"]
    np.testing.assert_allclose(np.asarray(y), np.stack(ys), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["count"]), counts)


def test_blocked_never_runs_an_expert_reached_only_by_dropped_rows():
    """Real work is skipped: poison the weights of an expert that only dropped rows chose; the
    blocked path never touches it, so every output and statistic stays finite."""
    cfg, per_expert, params, x, idx, r, mask = _trimmed_case()
    T = len(x)
    idx = np.asarray(idx).copy()
    idx[:, 1] = 5  # expert 5 is every token's second choice ...
    w = np.tile(np.array([[0.9, 0.1]], np.float32), (T, 1))
    idx[:, 0] = np.where(np.arange(T) % 2, 1, 3)  # ... and nobody's first
    r = moe.trim(moe.Routing(jnp.zeros((T, 8)), jnp.zeros((T, 8)), jnp.asarray(idx), jnp.asarray(w)), tau=0.2)
    assert not np.asarray(r.active_TK)[:, 1].any()
    bucket, local = next((b, list(bk.expert_ids).index(5)) for b, bk in enumerate(cfg.expert_buckets(0))
                         if 5 in bk.expert_ids)
    poisoned = jax.tree.map(lambda a: a, params)
    poisoned[f"bucket_{bucket}"] = {k: v.at[local].set(jnp.nan) for k, v in params[f"bucket_{bucket}"].items()}
    y, stats = moe.experts_forward(cfg, 0, poisoned, x, r, impl="blocked", collect_stats=True)
    assert np.isfinite(np.asarray(y)).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in stats.values())
    assert float(stats["count"][5]) == 0.0 and float(np.abs(stats["act_abs_sum"][5]).sum()) == 0.0
    # The dense reference runs every expert, so it does see the poison:
    y_dense, _ = moe.experts_forward(cfg, 0, poisoned, x, r, impl="dense", collect_stats=False)
    assert not np.isfinite(np.asarray(y_dense)).all()


# ------------------------------------------------------------------------------------- policies
def test_policy_refuses_changed_router_weights():
    cfg = tiny_config("qwen2_moe")
    params = scaled_params(cfg)
    policy = TrimmingPolicy.for_model(cfg, params, LayerTrim(tau=0.2))
    policy.masks(cfg, params)  # the calibrated routers: fine
    name = cfg.layer_name(cfg.moe_layers[0])
    drifted = jax.tree.map(lambda a: a, params)
    drifted[name]["moe"]["router"]["kernel"] = params[name]["moe"]["router"]["kernel"].at[0, 0].add(1e-3)
    with pytest.raises(RouterDriftError, match="router weights changed"):
        policy.masks(cfg, drifted)


def test_bad_thresholds_and_foreign_policies_are_refused(tmp_path):
    cfg = tiny_config("qwen2_moe")  # top_k 2
    params = scaled_params(cfg)
    for bad, match in ((LayerTrim(tau=1.0), "tau=1.0"), (LayerTrim(tau=-0.1), "tau=-0.1"),
                       (LayerTrim(top_p=0.0), "top_p=0.0"), (LayerTrim(max_active=0), "max_active=0"),
                       (LayerTrim(max_active=3), r"max_active=3.*top_k=2")):
        with pytest.raises(TrimmingError, match=match):
            TrimmingPolicy.for_model(cfg, params, bad)
    with pytest.raises(TrimmingError, match="not MoE layers"):
        TrimmingPolicy.for_model(cfg, params, layers={"layer_1": LayerTrim(0.1)})  # layer 1 is dense here
    other = tiny_config("qwen2_moe", num_experts=4)
    policy = TrimmingPolicy.for_model(other, scaled_params(other), LayerTrim(tau=0.1))
    with pytest.raises(TrimmingError, match="calibrated for a qwen2_moe model"):
        policy.masks(cfg, params)
    bad_file = tmp_path / "p.json"
    bad_file.write_text(json.dumps({**policy.to_json(), "default": {"tau": 2.0}}))
    with pytest.raises(TrimmingError, match=r"p\.json: default"):
        TrimmingPolicy.load(bad_file)
    bad_file.write_text("{not json")
    with pytest.raises(TrimmingError, match="not valid JSON"):
        TrimmingPolicy.load(bad_file)


def test_policy_json_roundtrip_and_merge_with_pruning_masks(tmp_path):
    cfg = tiny_config("qwen2_moe")
    params = scaled_params(cfg)
    name = cfg.layer_name(cfg.moe_layers[0])
    policy = TrimmingPolicy.for_model(cfg, params, LayerTrim(tau=0.1), {name: LayerTrim(top_p=0.7, max_active=1)},
                                      {"target": 0.7})
    path = policy.save(tmp_path)
    assert path.name == trimming.FILENAME and not list(tmp_path.glob(".*tmp"))
    assert TrimmingPolicy.load(tmp_path) == policy
    dims = {name: {"dims": jnp.ones((8, 24))}}
    merged = policy.masks(cfg, params, dims)
    assert set(merged[name]) == {"dims", "trim"} and int(merged[name]["trim"]["max_active"]) == 1
    assert "trim" not in dims[name]  # the caller's masks are not modified


# ------------------------------------------------------------------------------------ telemetry
def test_telemetry_counts_equal_a_direct_count(tmp_path):
    cfg = tiny_config("mixtral", num_layers=2, num_experts=8)
    params = scaled_params(cfg, seed=2)
    masks = TrimmingPolicy.for_model(cfg, params, LayerTrim(tau=0.3)).masks(cfg, params)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(0, cfg.vocab_size, (2, 9))
        mask = np.ones((2, 9), bool)
        mask[1, :3] = False  # left padding does not count
        batches.append({"tokens": tokens, "attention_mask": mask})
    tel = telemetry.observe(cfg, params, batches, masks, log_dir=tmp_path)
    load = {cfg.layer_name(i): np.zeros(8, int) for i in cfg.moe_layers}
    hist = {n: np.zeros(3, int) for n in load}
    prev, jaccards, weighted, prev_load = None, [], [], None
    for b in batches:
        before = {n: v.copy() for n, v in load.items()}
        _, aux = forward(cfg, params, b["tokens"], masks, attention_mask=b["attention_mask"], capture=("routing",))
        sets = {}
        for n in load:
            idx, act = np.asarray(aux[n]["idx_TK"]), np.asarray(aux[n]["active_TK"])
            used = set()
            for bi in range(2):
                for t in range(9):
                    if b["attention_mask"][bi, t]:
                        hist[n][act[bi, t].sum()] += 1
                        for e, a in zip(idx[bi, t], act[bi, t]):
                            if a:
                                load[n][e] += 1
                                used.add(int(e))
            sets[n] = used
        batch_load = {n: (load[n] - before[n]) / (load[n] - before[n]).sum() for n in load}
        if prev is not None:
            jaccards.append({n: len(sets[n] & prev[n]) / len(sets[n] | prev[n]) for n in load})
            weighted.append({n: sum(min(a, b) for a, b in zip(batch_load[n], prev_load[n]))
                             / sum(max(a, b) for a, b in zip(batch_load[n], prev_load[n])) for n in load})
        prev, prev_load = sets, batch_load
    s = tel.summary()
    assert s["load"] == {n: v.tolist() for n, v in load.items()}
    assert s["active_experts_hist"] == {n: v.tolist() for n, v in hist.items()}
    assert s["dormant"] == {n: np.flatnonzero(v == 0).tolist() for n, v in load.items()}
    assert s["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    # One approx per batch: pytest >= 9.2 refuses approx over a list of dicts.
    for got, want in zip([r["rotation_jaccard"] for r in tel.batches[1:]], jaccards, strict=True):
        assert got == pytest.approx(want)
    for got, want in zip([r["load_rotation"] for r in tel.batches[1:]], weighted, strict=True):
        assert got == pytest.approx({n: float(v) for n, v in want.items()})
    lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["batch"] == 2
    assert "| layer |" in tel.table()
    assert set(tel.plots(tmp_path)) == {"load", "rotation"} and (tmp_path / "load.png").stat().st_size > 1000


def test_measure_counts_active_parameters_with_real_widths():
    cfg = tiny_config("qwen3_moe", num_experts=4)
    cfg = cfg.with_layer_experts(0, (8, 16, 24, 24))
    params = scaled_params(cfg, seed=3)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7))
    masks = TrimmingPolicy.for_model(cfg, params, LayerTrim(max_active=1)).masks(cfg, params)
    stats = trimming.measure(cfg, params, [{"tokens": tokens}], masks)
    _, aux = forward(cfg, params, tokens, masks, capture=("routing",))
    active = full = 0
    for i in cfg.moe_layers:
        a = aux[cfg.layer_name(i)]
        sizes = 3 * cfg.hidden_size * np.asarray(cfg.expert_widths[i])[np.asarray(a["idx_TK"])]
        active += (sizes * np.asarray(a["active_TK"])).sum()
        full += sizes.sum()
    assert stats.active_fraction == pytest.approx(active / full)
    assert stats.mean_active_experts == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def built_in():
    from moe_jax import evaluation

    cfg, params = evaluation.load_model(BUILT_IN)
    return cfg, params, evaluation.load_eval_tokenizer("auto", BUILT_IN, cfg)


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_calibration_hits_its_target_on_held_out_data(built_in, mode):
    from moe_jax import evaluation, scoring
    from moe_jax.data import skills

    cfg, params, tok = built_in
    calib = scoring.calibration_batches("skills:train", tok, n_per_domain=16, seq_len=64, batch_size=40)
    policy = trimming.calibrate(cfg, params, calib, 0.75, mode=mode, grid=3, bisect_steps=9)
    assert policy.calibration["active_fraction"] <= 0.75 + 1e-9
    assert policy.calibration["active_fraction"] > 0.73
    held_out = evaluation.skills_batches({d: skills.eval_set(d, 20) for d in skills.DOMAINS}, tok, 50)
    stats = trimming.measure(cfg, params, [b for bs in held_out.values() for b in bs], policy.masks(cfg, params))
    assert abs(stats.active_fraction - 0.75) <= 0.02
    with pytest.raises(TrimmingError, match="below the smallest active fraction"):
        trimming.calibrate(cfg, params, calib, 0.3)
