"""Routing and dropless expert dispatch against a float64 loop oracle, and the paths against each other."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.model import moe
from moe_jax.model.layout import expert_weight
from tests.conftest import MOE_D as D
from tests.conftest import NONUNIFORM_WIDTHS, expert_case, experts_oracle, moe_layer_config, moe_layer_experts

IMPLS = ("dense", "ragged", "blocked", "gather")
# These programs are tiny; skipping LLVM's heavy passes cuts compile time (most of this file's) ~3x.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


# ------------------------------------------------------------------------------------ oracles
def route_oracle(cfg, kernel, bias, x, mask):
    """Loop over tokens, float64, reading the reference routers' rules literally."""
    E, K = kernel.shape[1], cfg.num_experts_per_tok
    idx_out, w_out = [], []
    for t in range(x.shape[0]):
        logits = x[t].astype(np.float64) @ kernel.astype(np.float64)
        keep = np.ones(E, bool) if mask is None else mask[t] != 0
        logits = np.where(keep, logits, -np.inf)
        if cfg.router_score == "softmax":
            e = np.exp(logits - logits[keep].max())
            scores = e / e.sum()
        else:
            scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + (bias if cfg.router_bias else 0.0)
        choice = np.where(keep, choice, -np.inf)
        if cfg.topk_method != "greedy":
            G = cfg.n_group
            groups = choice.reshape(G, E // G)
            if cfg.topk_method == "group_limited_greedy":
                gscore = groups.max(-1)
            else:
                gscore = []
                for g in groups:
                    fin = sorted(v for v in g if np.isfinite(v))[::-1][:2]
                    gscore.append(sum(fin) if fin else -np.inf)
                gscore = np.array(gscore)
            kept = sorted(range(G), key=lambda g: -gscore[g])[: cfg.topk_group]
            choice = np.array([choice[e] if e // (E // G) in kept else -np.inf for e in range(E)])
        chosen = sorted(range(E), key=lambda e: -choice[e])[:K]
        w = np.array([scores[e] if np.isfinite(choice[e]) else 0.0 for e in chosen])
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        idx_out.append(chosen)
        w_out.append(w * cfg.routed_scaling_factor)
    return np.array(idx_out), np.array(w_out)


# ------------------------------------------------------------------------------------ routing
ROUTERS = {
    "softmax_norm": dict(model_type="mixtral", num_experts=8, k=2),
    "softmax_nonorm": dict(norm_topk_prob=False, num_experts=8, k=3),
    "group_limited": dict(model_type="deepseek_v2", num_experts=16, k=3, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5),
    "noaux_tc": dict(model_type="deepseek_v3", num_experts=16, k=4, router_score="sigmoid",
                     topk_method="noaux_tc", n_group=4, topk_group=2, router_bias=True,
                     norm_topk_prob=True, routed_scaling_factor=2.5),
}


def _router_case(name, T=40, seed=0):
    kw = dict(ROUTERS[name])
    cfg = moe_layer_config(**kw)
    E = cfg.experts_per_layer[0]
    rng = np.random.default_rng(seed)
    params = {"router": {"kernel": rng.normal(size=(D, E)).astype(np.float32)}}
    if cfg.router_bias:
        params["score_bias"] = (rng.normal(size=E) * 0.3).astype(np.float32)
    x = rng.normal(size=(T, D)).astype(np.float32)
    return cfg, params, x


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_matches_loop_oracle(name, masked):
    cfg, params, x = _router_case(name)
    E = cfg.experts_per_layer[0]
    mask = None
    if masked:
        mask = np.ones((x.shape[0], E), np.float32)
        mask[:, 1] = 0  # one expert removed everywhere
        mask[::3, 5] = 0  # and another for some tokens
        if cfg.topk_method == "noaux_tc":
            mask[::2, 8:11] = 0  # a group with a single expert left
    r = jit(lambda p, x, m: moe.route(cfg, 0, p, x, m))(params, x, mask)
    idx, w = route_oracle(cfg, params["router"]["kernel"], params.get("score_bias"), x, mask)
    assert r.idx_TK.dtype == jnp.int32 and r.weights_TK.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(r.idx_TK), idx)
    np.testing.assert_allclose(np.asarray(r.weights_TK), w, rtol=1e-5, atol=1e-6)
    if masked:
        assert not np.isin(np.asarray(r.idx_TK), [1]).any()
        np.testing.assert_array_equal(np.asarray(r.scores_TE)[:, 1], 0.0)
        assert np.isneginf(np.asarray(r.logits_TE)[:, 1]).all()


def _hf_router(name, cfg, params):
    """The transformers 5 router module of the family `name` stands for, with our weights."""
    torch = pytest.importorskip("torch")
    import transformers.models as tm

    E, K = cfg.experts_per_layer[0], cfg.num_experts_per_tok
    common = dict(hidden_size=D, num_attention_heads=2, num_experts_per_tok=K)
    deepseek = dict(n_routed_experts=E, n_group=cfg.n_group, topk_group=cfg.topk_group,
                    routed_scaling_factor=cfg.routed_scaling_factor)
    if name == "softmax_norm":
        m = tm.mixtral.modeling_mixtral
        router = m.MixtralTopKRouter(m.MixtralConfig(num_local_experts=E, **common))
    elif name == "softmax_nonorm":
        m = tm.qwen2_moe.modeling_qwen2_moe
        router = m.Qwen2MoeTopKRouter(m.Qwen2MoeConfig(num_experts=E, norm_topk_prob=False, **common))
    elif name == "group_limited":
        m = tm.deepseek_v2.modeling_deepseek_v2
        router = m.DeepseekV2TopkRouter(m.DeepseekV2Config(topk_method="group_limited_greedy", **deepseek,
                                                           **common))
    else:
        m = tm.deepseek_v3.modeling_deepseek_v3
        router = m.DeepseekV3TopkRouter(m.DeepseekV3Config(norm_topk_prob=True, **deepseek, **common))
        router.e_score_correction_bias.copy_(torch.tensor(params["score_bias"]))
    with torch.no_grad():
        router.weight.copy_(torch.tensor(np.asarray(params["router"]["kernel"]).T.copy()))
    return router


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_matches_transformers(name):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg, params, x = _router_case(name, seed=1)
    router = _hf_router(name, cfg, params)
    with torch.no_grad():
        out = router(torch.tensor(x))
    hf_w, hf_idx = out[1].numpy(), out[2].numpy()
    r = moe.route(cfg, 0, params, jnp.asarray(x))
    order = np.argsort(hf_idx, axis=-1)  # HF may return top-k unsorted
    ours = np.argsort(np.asarray(r.idx_TK), axis=-1)
    take = lambda a, o: np.take_along_axis(a, o, -1)
    np.testing.assert_array_equal(take(np.asarray(r.idx_TK), ours), take(hf_idx, order))
    np.testing.assert_allclose(take(np.asarray(r.weights_TK), ours), take(hf_w, order), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ experts
def _run(cfg, impl, params, x, idx, w, mask, seq, block_rows=None, stats=True):
    fn = functools.partial(moe.experts_forward, cfg, 0, impl=impl, collect_stats=stats, block_rows=block_rows)
    return jit(lambda p, x, i, w, m, s: fn(p, x, (i, w), dims_mask=m, seq_id_T=s))(
        params, x, idx, w, mask, seq)


@pytest.mark.parametrize("scenario", ["uniform", "mask_ef", "mask_bef", "skewed"])
def test_impls_match_loop_oracle(scenario):
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case(scenario)
    assert (len(cfg.expert_buckets(0)) > 1) == (scenario != "uniform")
    y_ref, st_ref = experts_oracle(cfg, per_expert, x, idx, w, mask, seq)
    runs = [(impl, None) for impl in IMPLS]
    if scenario in ("mask_bef", "skewed"):
        runs.append(("blocked", 4))  # several blocks per expert
    for impl, block_rows in runs:
        y, st = _run(cfg, impl, params, x, idx, w, mask, seq, block_rows)
        assert y.dtype == jnp.float32 and y.shape == x.shape
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {block_rows}")
        assert set(st) == set(moe.STAT_KEYS)
        for k in moe.STAT_KEYS:
            np.testing.assert_allclose(np.asarray(st[k]), st_ref[k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{impl} {block_rows} {k}")


@pytest.mark.parametrize("scenario", ["uniform", "mask_bef", "skewed"])
def test_per_choice_outputs_match_loop_oracle(scenario):
    """stats["out_TKD"] (what calibration reuses for the routed reconstruction error) is each
    choice's own f_e(x): the oracle run on that one choice with weight 1; trimmed choices are 0."""
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case(scenario)
    T, K = idx.shape
    want = np.stack([experts_oracle(cfg, per_expert, x, idx[:, k:k + 1], np.ones((T, 1), np.float32), mask, seq)[0]
                     for k in range(K)], axis=1)
    active = np.ones((T, K), bool)
    active[::3, 1] = False
    want[~active] = 0.0
    routing = moe.Routing(jnp.zeros((T, 8)), jnp.zeros((T, 8)), jnp.asarray(idx), jnp.asarray(w), jnp.asarray(active))
    for impl in IMPLS:
        fn = jit(functools.partial(moe.experts_forward, cfg, 0, impl=impl, per_choice=True))
        y, st = fn(params, x, routing, dims_mask=mask, seq_id_T=seq)
        np.testing.assert_allclose(np.asarray(st["out_TKD"]), want, rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(np.asarray(y), np.einsum("tk,tkd->td", w * active, want), rtol=1e-5, atol=1e-5,
                                   err_msg=impl)


@pytest.mark.parametrize("T", [1, 24])
def test_auto_is_blocked_at_decode_and_prefill_sizes(T):
    cfg, per_expert, params, x, idx, w, _, _ = expert_case("mask_ef", T=T)
    fwd = lambda impl: lambda x, i, w: moe.experts_forward(cfg, 0, params, x, (i, w), impl=impl)
    assert str(jax.make_jaxpr(fwd("auto"))(x, idx, w)) == str(jax.make_jaxpr(fwd("blocked"))(x, idx, w))
    y, stats = jit(fwd("auto"))(x, idx, w)
    assert stats == {}
    np.testing.assert_allclose(np.asarray(y), experts_oracle(cfg, per_expert, x, idx, w)[0], rtol=1e-5, atol=1e-5)


def test_block_rows_default_is_half_the_mean_load_in_bounds():
    assert moe.block_rows_for(4096, 2, 8) == moe.MAX_BLOCK_ROWS  # mean 1024 rows per expert
    assert moe.block_rows_for(2048, 4, 60) == 72  # mean 136.5
    assert moe.block_rows_for(3, 2, 8) == 8


def test_accepts_routing_tuple_and_namedtuple():
    cfg, _, params, x, idx, w, _, _ = expert_case("uniform")
    r = moe.Routing(jnp.zeros((24, 8)), jnp.zeros((24, 8)), jnp.asarray(idx), jnp.asarray(w))
    fwd = jit(lambda r: moe.experts_forward(cfg, 0, params, x, r, impl="blocked")[0])
    np.testing.assert_array_equal(np.asarray(fwd(r)), np.asarray(fwd((r.idx_TK, r.weights_TK))))


@pytest.mark.parametrize("scenario", ["mask_ef", "mask_bef"])
def test_gradients_agree_across_impls(scenario):
    """d/d(params, x, routing weights, dims mask) of every path equals the dense reference's."""
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case(scenario, seed=3)
    cot = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

    def loss(impl, block_rows, params, x, w, mask):
        y, _ = moe.experts_forward(cfg, 0, params, x, (idx, w), dims_mask=mask, seq_id_T=seq, impl=impl,
                                   block_rows=block_rows)
        return jnp.sum(y * cot)

    runs = [(i, None) for i in IMPLS] if scenario == "mask_bef" else [("dense", None), ("blocked", 4)]
    grads = {}
    for impl, block_rows in runs:
        f = jit(jax.grad(functools.partial(loss, impl, block_rows), argnums=(0, 1, 2, 3)))
        grads[(impl, block_rows)] = jax.tree.map(np.asarray, f(params, x, w, mask))
    if scenario == "mask_ef":  # collecting stats in the same pass leaves the gradient alone

        def loss_and_stats(params, x, w, mask):
            y, stats = moe.experts_forward(cfg, 0, params, x, (idx, w), dims_mask=mask, impl="blocked",
                                           collect_stats=True)
            return jnp.sum(y * cot), stats

        f = jit(jax.grad(loss_and_stats, argnums=(0, 1, 2, 3), has_aux=True))
        grads[("blocked", "stats")] = jax.tree.map(np.asarray, f(params, x, w, mask)[0])
    ref = grads.pop(("dense", None))
    flat_ref = jax.tree_util.tree_leaves_with_path(ref)
    for key, g in grads.items():
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g), flat_ref):
            scale = np.abs(b).max()
            np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=f"{key} {path}")
    # The reference itself against central differences of the float64 loop oracle.
    loss64 = lambda mask: np.sum(experts_oracle(cfg, per_expert, x, idx, w, mask, seq)[0] * cot)
    for entry in [(3, 5), (7, 31), (6, 20), (0, 2)]:
        entry = (1, *entry) if mask.ndim == 3 else entry
        up, down = mask.astype(np.float64), mask.astype(np.float64)
        up[entry] += 1e-6
        down[entry] -= 1e-6
        fd = (loss64(up) - loss64(down)) / 2e-6
        np.testing.assert_allclose(ref[3][entry], fd, rtol=1e-4, atol=1e-6, err_msg=str(entry))
    assert np.abs(ref[3]).max() > 0


def test_bucketing_stores_less_than_padding_to_widest():
    cfg = moe_layer_config(num_experts=8, width=16, max_width_buckets=3).with_layer_experts(0, NONUNIFORM_WIDTHS)
    assert len(cfg.expert_buckets(0)) > 1
    stored, useful = cfg.padded_expert_params(0)
    assert useful <= stored < len(NONUNIFORM_WIDTHS) * max(NONUNIFORM_WIDTHS)


def test_bf16_close_to_float32():
    cfg, _, params, x, idx, w, mask, _ = expert_case("mask_ef", seed=7, T=64)
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    y32 = np.asarray(_run(cfg, "dense", params, x, idx, w, mask, None, stats=False)[0])
    for impl in IMPLS:
        y16 = _run(cfg, impl, params16, x, idx, w, mask, None, stats=False)[0]
        assert y16.dtype == jnp.float32
        err = np.linalg.norm(np.asarray(y16) - y32) / np.linalg.norm(y32)
        assert err < 2e-2, (impl, err)


def test_route_then_experts_never_uses_a_masked_expert():
    cfg = moe_layer_config(num_experts=8, width=16)
    rng = np.random.default_rng(8)
    _, params = moe_layer_experts(cfg, rng)
    x = rng.normal(size=(32, D)).astype(np.float32)
    router = {"router": {"kernel": rng.normal(size=(D, 8)).astype(np.float32)}}
    mask = np.ones((32, 8), np.float32)
    mask[:, 2] = 0

    @jit
    def layer(params):
        r = moe.route(cfg, 0, router, x, mask)
        return moe.experts_forward(cfg, 0, params, x, r, collect_stats=True)

    y1, st = layer(params)
    assert float(st["count"][2]) == 0 and float(st["count"].sum()) == 32 * 2
    y2, _ = layer(jax.tree.map(lambda a: a.at[2].set(0), params))  # zeroing it changes nothing
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_errors_name_the_bad_value():
    cfg, _, params, x, idx, w, _, _ = expert_case("skewed")
    with pytest.raises(ValueError, match="impl='fast'"):
        moe.experts_forward(cfg, 0, params, x, (idx, w), impl="fast")
    with pytest.raises(ValueError, match=r"dims_mask has shape \(8, 7\)"):
        moe.experts_forward(cfg, 0, params, x, (idx, w), dims_mask=np.ones((8, 7)))
    with pytest.raises(ValueError, match="needs seq_id_T"):
        moe.experts_forward(cfg, 0, params, x, (idx, w), dims_mask=np.ones((2, 8, 32)))
    bad = {**params, "bucket_0": {**params["bucket_0"], "up": params["bucket_0"]["up"][:, :, :-1]}}
    with pytest.raises(ValueError, match="bucket_0/up"):
        moe.experts_forward(cfg, 0, bad, x, (idx, w))
    with pytest.raises(ValueError, match="expert_mask has shape"):
        moe.route(cfg, 0, {"router": {"kernel": np.ones((D, 8), np.float32)}}, x, np.ones(8))


def test_expert_weight_roundtrip_in_oracle_inputs():
    """The oracle reads the same experts the packed params hold (guards the test itself)."""
    cfg, per_expert, params, *_ = expert_case("skewed")
    full = {cfg.layer_name(0): {"moe": {"experts": params}}}
    for e in range(8):
        got = expert_weight(cfg, full, 0, e)
        np.testing.assert_allclose(np.asarray(got["down"]), per_expert[e]["down"], rtol=1e-6)


def test_stats_count_only_valid_tokens():
    """token_valid_T drops padding from the statistics: equal to the oracle on the valid tokens alone."""
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case("mask_ef")
    valid = np.random.default_rng(3).uniform(size=len(x)) > 0.4
    _, st_ref = experts_oracle(cfg, per_expert, x[valid], idx[valid], w[valid], mask, None)
    for impl in IMPLS:
        fn = functools.partial(moe.experts_forward, cfg, 0, impl=impl, collect_stats=True)
        y, st = jit(lambda p, x, i, w, m, v, fn=fn: fn(p, x, (i, w), dims_mask=m, token_valid_T=v))(
            params, x, idx, w, mask, valid)
        y_all, _ = _run(cfg, impl, params, x, idx, w, mask, None)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_all), atol=1e-6)  # outputs untouched
        for k in moe.STAT_KEYS:
            np.testing.assert_allclose(np.asarray(st[k]), st_ref[k], rtol=1e-5, atol=1e-5, err_msg=f"{impl} {k}")
