"""impl="pallas" / "megablox" (moe_jax.model.grouped_gemm) on CPU, kernels in interpret mode.

Forward, stats, per-choice outputs and the gradients in params, x, routing weights and dims mask
against loop oracles (float64 numpy for outputs and stats, a differentiable Python loop over
experts for gradients), for uniform and non-uniform buckets, empty experts, trimmed rows and
per-sequence masks; stats against "blocked"; the weight-gradient kernel absent from the program
(jaxpr, and the Triton kernels of the program lowered for CUDA) unless weights are
differentiated; the whole model's logits and Fisher scores against "blocked". Expert-parallel
runs it in the sharding worker's "ep_layer" check (8 forced CPU devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import model, scoring, synthetic
from moe_jax.model import grouped_gemm, moe
from moe_jax.model.layout import expert_weight
from tests.conftest import expert_case, experts_oracle, scoring_batches

# Tiny programs: LLVM's heavy passes would be most of the compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})
CASES = {  # name: (expert_case scenario, trimmed, rows per tile, backend); buckets: 1 if uniform, else 3
    "uniform": ("uniform", False, None, "pallas"),
    "per_sequence_trimmed": ("mask_bef", True, 8, "pallas"),  # + padding tokens, + stats against "blocked"
    "empty_experts_trimmed": ("skewed", True, 8, "pallas"),  # experts 0, 1, 2, 6 idle: bucket 0 has no rows
    "megablox": ("uniform", True, 8, "megablox"),
}


def _case(name, seed=3):
    scenario, trimmed, rows, backend = CASES[name]
    if rows and not grouped_gemm.make_spec(16, backend).interpret:  # compiled (GPU): tiles of at least 16 rows
        rows = max(rows, grouped_gemm.MIN_TILE)
    cfg, per_expert, params, x, idx, w, mask, seq = expert_case(scenario, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if mask is None:  # every case has a dims mask, so every case checks its gradient
        mask = rng.uniform(0, 1, size=(8, cfg.max_width(0))).astype(np.float32)
    active = np.ones(idx.shape, bool)
    if trimmed:
        active[::3, 1] = False
        active[5, 0] = False  # a token with no expert left
    return cfg, per_expert, params, x, idx, w, mask, seq, active, rows, backend


def _routing(idx, w, active):
    T = idx.shape[0]
    return moe.Routing(jnp.zeros((T, 8)), jnp.zeros((T, 8)), jnp.asarray(idx), w, jnp.asarray(active))


def float64_oracle(cfg, per_expert, x, idx, w, mask, seq, active, valid):
    """y over the active (token, choice) pairs, stats over those of valid tokens: conftest's loop,
    one choice at a time."""
    y, stats = np.zeros(x.shape), None
    for k in range(idx.shape[1]):
        for rows, of_y in ((active[:, k], True), (active[:, k] & valid, False)):
            got = experts_oracle(cfg, per_expert, x[rows], idx[rows, k:k + 1], w[rows, k:k + 1], mask,
                                 None if seq is None else seq[rows])
            if of_y:
                y[rows] += got[0]
            else:
                stats = got[1] if stats is None else {n: stats[n] + got[1][n] for n in stats}
    return y, stats


def loop_oracle(cfg, params, x, idx, w, mask, seq, active):
    """y_TD by a Python loop over experts, each on its own rows (numpy indices): differentiable in
    params (the bucketed arrays), x, w and mask."""
    y = jnp.zeros(x.shape, jnp.float32)
    full = {cfg.layer_name(0): {"moe": {"experts": params}}}
    for e in range(cfg.experts_per_layer[0]):
        t, k = np.nonzero((idx == e) & active)
        if len(t) == 0:
            continue
        ew = expert_weight(cfg, full, 0, e)
        h = jax.nn.silu(x[t] @ ew["gate"]) * (x[t] @ ew["up"])
        h = h * (mask[e, :h.shape[1]] if mask.ndim == 2 else mask[seq[t], e, :h.shape[1]])
        y = y.at[t].add(w[t, k][:, None] * (h @ ew["down"]))
    return y


def _close(got, want, what, tol=1e-5):
    """Equal to `tol` relative to the largest magnitude (absolute where it is 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_stats_and_gradients_match_loop_oracles(name):
    cfg, per_expert, params, x, idx, w, mask, seq, active, rows, backend = _case(name)
    rng = np.random.default_rng(5)
    cot = rng.normal(size=x.shape).astype(np.float32)
    with_blocked = name == "per_sequence_trimmed"
    valid = rng.uniform(size=len(x)) > 0.3 if with_blocked else np.ones(len(x), bool)  # padding: no stats

    def loss(params, x, w, mask):
        run = lambda impl, rows: moe.experts_forward(
            cfg, 0, params, x, _routing(idx, w, active), dims_mask=mask, seq_id_T=seq, impl=impl,
            collect_stats=True, block_rows=rows, token_valid_T=valid, per_choice=impl != "blocked")
        y, stats = run(backend, rows)
        return jnp.sum(y * cot), (y, stats, run("blocked", 4)[1] if with_blocked else None)

    def loss_oracle(params, x, w, mask):
        return jnp.sum(loop_oracle(cfg, params, x, idx, w, mask, seq, active) * cot)

    args = (params, x, w, mask)
    (_, (y, stats, stats_blocked)), grads = jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    want_grads = jit(jax.grad(loss_oracle, argnums=(0, 1, 2, 3)))(*args)
    y_want, stats_want = float64_oracle(cfg, per_expert, x, idx, w, mask, seq, active, valid)
    _close(y, y_want, f"{name} y")
    for k in moe.STAT_KEYS:
        _close(stats[k], stats_want[k], f"{name} stats {k}")
        if with_blocked:
            _close(stats[k], stats_blocked[k], f"{name} stats {k} vs blocked")
    labels = ("params", "x", "routing weights", "dims mask")
    for label, got, want in zip(labels, grads, want_grads):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
            _close(a, b, f"{name} d/d {label}{jax.tree_util.keystr(path)}")
    ones = np.ones((len(x), 1), np.float32)  # each choice's own output, 0 where trimmed (what calibration reuses)
    per_choice = [experts_oracle(cfg, per_expert, x, idx[:, k:k + 1], ones, mask, seq)[0] for k in range(idx.shape[1])]
    _close(stats["out_TKD"], np.stack(per_choice, axis=1) * active[..., None], f"{name} out_TKD")
    assert np.abs(np.asarray(grads[3])).max() > 0
    if name.endswith("trimmed"):  # trimmed choices get no gradient in their weight
        assert not np.asarray(grads[2])[~active].any()


def test_weight_gradient_kernel_only_when_weights_are_differentiated():
    """Fisher differentiates masks (and inputs), not weights: then no weight-gradient kernel is in the
    program, neither in the jaxpr nor among the Triton kernels of the program lowered for a GPU."""
    cfg, _, params, x, idx, w, mask, seq, active, rows, _ = _case("per_sequence_trimmed")
    loss = lambda p, x, m: jnp.sum(moe.experts_forward(
        cfg, 0, p, x, _routing(idx, w, active), dims_mask=m, seq_id_T=seq, impl="pallas", block_rows=16)[0])
    kernels = lambda text: {n: text.count(n) for n in ("gmm_fwd", "gmm_dx", "gmm_dw")}
    jaxpr = lambda argnums: kernels(str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(params, x, mask)))
    mask_only, x_and_mask, weights = jaxpr(2), jaxpr((1, 2)), jaxpr(0)
    assert mask_only["gmm_dw"] == 0 and mask_only["gmm_dx"] > 0, mask_only
    assert x_and_mask["gmm_dw"] == 0 and x_and_mask["gmm_dx"] > mask_only["gmm_dx"], (x_and_mask, mask_only)
    assert weights["gmm_dw"] > 0, weights
    # The program a GPU would compile: pallas_call lowered to Triton (no GPU needed to lower it).
    triton = {}
    for label, argnums in (("mask", 2), ("weights", (0, 2))):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grouped_gemm, "INTERPRET", False)
            lowered = jax.jit(jax.grad(loss, argnums=argnums)).trace(params, x, mask)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        triton[label] = {n: text.count(f'name = "{n}"') for n in ("gmm_fwd", "gmm_dx", "gmm_dw")}
    assert triton["mask"]["gmm_dw"] == 0 and triton["mask"]["gmm_dx"] > 0, triton
    assert triton["weights"]["gmm_dw"] > 0, triton


def test_tile_rows_and_spec():
    assert grouped_gemm.tile_rows_for(4096, 2, 8) == grouped_gemm.MAX_TILE_ROWS
    assert grouped_gemm.tile_rows_for(2048, 4, 60) == 128  # mean 136.5 rows per expert
    assert grouped_gemm.tile_rows_for(1, 4, 60) == grouped_gemm.MIN_TILE
    assert grouped_gemm.make_spec(16, "pallas").interpret == (jax.default_backend() != "gpu")
    with pytest.raises(ValueError, match="power of two >= 16"):
        grouped_gemm.make_spec(24, "pallas", interpret=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        grouped_gemm.make_spec(16, "triton")


def test_model_logits_and_fisher_scores_equal_blocked():
    cfg = synthetic.qwen15_moe_config(num_layers=1, hidden_size=32, num_heads=4, num_experts=8, top_k=2,
                                      expert_width=24, shared_width=32, vocab_size=64, max_position_embeddings=64)
    cfg = cfg.with_layer_experts(0, (16, 16, 16, 24, 24, 24, 24, 24))  # two width buckets
    params = synthetic.scaled_params(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 9)).astype(np.int32)
    _close(model.forward(cfg, params, tokens, impl="pallas"), model.forward(cfg, params, tokens, impl="blocked"),
           "logits")
    batches = scoring_batches(cfg, n_batches=1)
    fisher = {impl: scoring.collect(cfg, params, batches, ("fisher",), micro_batch_size=3, impl=impl,
                                    progress=False)["fisher"] for impl in ("pallas", "blocked")}
    for layer, want in fisher["blocked"].items():
        assert np.nanmax(want) > 0
        _close(np.nan_to_num(fisher["pallas"][layer]), np.nan_to_num(want), f"fisher {layer}")
