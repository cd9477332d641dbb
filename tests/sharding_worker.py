"""The multi-device checks of moe_jax.sharding, run as a script in a process with 8 forced host devices.

    python -m tests.sharding_worker GROUP OUT.json   (XLA_FLAGS=--xla_force_host_platform_device_count=8)

tests/test_sharding.py (group "matrix") and tests/test_sharding_models.py (group "models") each
launch it once and assert its results one test per check, so the suite's other processes keep
one device, and the two groups compile on different cores. What each check compares is in
those files' docstrings. Not a test module: pytest never collects or imports it.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np

from tests.conftest import SHARDING_CHECK_GROUPS, SHARDING_MESHES, scaled_params, tiny_config

TOL = 1e-5
MESHES = SHARDING_MESHES


def _close(name, got, want, tol=TOL):
    """max |got - want| <= tol * max(1, max |want|): float32 sums over different device splits."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
    err, scale = float(np.nanmax(np.abs(got - want))), max(1.0, float(np.nanmax(np.abs(want))))
    if not err <= tol * scale or not np.array_equal(np.isnan(got), np.isnan(want)):
        raise AssertionError(f"{name}: max error {err:.3g} > {tol} x {scale:.3g}")
    return err


def run_checks(names: tuple[str, ...]) -> dict:  # noqa: C901  (one list of checks, so JAX starts once per group)
    import jax.numpy as jnp
    import ml_collections  # noqa: F401

    from moe_jax import model, scoring, sharding, train, training_step
    from moe_jax.model import expert_parallel, moe

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    results: dict[str, dict] = {}

    def check(name):
        def run(fn):
            if name not in names:  # another group's check: the other worker process runs it
                return
            start = time.perf_counter()
            try:
                detail = fn()
                results[name] = {"ok": True, "detail": detail, "s": round(time.perf_counter() - start, 1)}
            except Exception:  # reported to pytest, which fails the named test with this traceback
                results[name] = {"ok": False, "detail": traceback.format_exc(), "s": 0}
        return run

    rng = np.random.default_rng(0)
    cfg = tiny_config("qwen2_moe", num_layers=1, dense_layers=(), num_experts=8)  # gated shared expert
    params = scaled_params(cfg)
    B, T = 8, 10  # B = 8: every mesh splits the batch over all its devices
    tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
    prompts = tokens[:, :5].copy()
    prompt_mask = np.ones_like(prompts, bool)
    prompt_mask[0, :2] = False  # left padding in one row
    prompts[0, :2] = 0
    calib = [{"tokens": rng.integers(1, cfg.vocab_size, (8, 9)).astype(np.int32),
              "segment_ids": np.repeat(np.array([[1] * 5 + [2] * 4]), 8, 0).astype(np.int32)}]
    calib[0]["segment_ids"][3, 6:] = 0  # padding
    train_batch = {"tokens": rng.integers(1, cfg.vocab_size, (B, 9)).astype(np.int32),
                   "loss_mask": np.ones((B, 9), np.float32), "segment_ids": np.ones((B, 9), np.int32)}
    # Compile time is the cost here: references and GSPMD paths run "dense", and so do the devices'
    # local experts, except in "ep_layer" and "fisher_2x4", which run "blocked" (its custom VJP)
    # inside the shard_map, and "ep_layer" also "pallas" (issue 22's kernels, forward and gradients).
    # The paths agree with each other (tests/test_moe.py).
    expert_parallel.INNER_IMPL = "dense"

    # Single-device references, each computed once (on first use, so a failure fails its checks only).
    @functools.cache
    def want_forward():
        return np.asarray(model.forward(cfg, params, tokens, impl="dense"))

    @functools.cache
    def want_generate():
        return np.asarray(model.generate(cfg, params, prompts, 4, attention_mask=prompt_mask, impl="dense"))

    @functools.cache
    def want_fisher():
        want = scoring.collect(cfg, params, calib, ("fisher",), micro_batch_size=8, progress=False, impl="dense")
        assert float(np.nanmax(want["fisher"]["layer_0"])) > 0
        return want

    config = train.default_config()
    config.optim.update(lr=1e-2, warmup_steps=0, eps=1e-3)  # eps >> |noise|: the update is smooth in g
    state = training_step.init_state(cfg, config)
    state = state.replace(params=params, opt_state=training_step.make_optimizer(config).init(params))

    @functools.cache
    def want_train():
        config.impl = "dense"
        want_state, want_metrics = training_step.make_train_step(cfg, config)(state, train_batch)
        moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree_util.tree_leaves(want_state.params), jax.tree_util.tree_leaves(params)))
        assert moved > 1e-3, moved  # the step really changes the params
        return jax.tree_util.tree_map(np.asarray, want_state.params), float(want_metrics["loss"])

    def expert_sharded(tree):
        spec = tree["layer_0"]["moe"]["experts"]["bucket_0"]["up"].sharding.spec
        return len(spec) > 0 and spec[0] == "expert"

    # ---------------------------------------------------------------- the matrix: 4 entry points x 3 meshes
    def matrix(label, spec):
        mesh = sharding.make_mesh(spec)
        n_expert = dict(zip(mesh.axis_names, mesh.axis_sizes))["expert"]
        impl = "expert_parallel" if n_expert > 1 else "dense"
        placed = functools.cache(lambda: sharding.shard_params(params, mesh))  # shared by forward and generate

        @check(f"forward_{label}")
        def _():
            assert expert_sharded(placed()) == (n_expert > 1)
            got = sharding.sharded_forward(cfg, mesh, placed(), B, impl=impl)(placed(), tokens)
            return _close(f"forward {spec}", got, want_forward())

        @check(f"generate_{label}")
        def _():  # greedy decode with the KV cache split over the batch
            axes = sharding.cache_axes(cfg, mesh, B)
            split = (axes[0],) if isinstance(axes[0], str) else axes[0]
            assert axes[1] is None and math.prod(mesh.shape[a] for a in split) == 8, axes  # 8 rows, 8 devices
            got = sharding.sharded_generate(cfg, mesh, placed(), B, 4, impl=impl)(placed(), prompts, prompt_mask)
            want = want_generate()
            assert np.array_equal(np.asarray(got), want), (np.asarray(got), want)
            return {"tokens": want[:2].tolist(), "cache_axes": str(axes)}

        @check(f"fisher_{label}")
        def _():
            want = want_fisher()
            expert_parallel.INNER_IMPL = "auto" if label == "2x4" else "dense"  # "blocked"'s custom VJP once
            try:
                got = sharding.sharded_collect(cfg, params, calib, ("fisher",), mesh, micro_batch_size=8,
                                               impl=impl, progress=False)
            finally:
                expert_parallel.INNER_IMPL = "dense"
            return {layer: _close(f"fisher {layer}", got["fisher"][layer], arr)
                    for layer, arr in want["fisher"].items()}

        @check(f"train_step_{label}")
        def _():
            want_params, want_loss = want_train()
            config.impl = impl
            placed_state, step = training_step.sharded_train_step(cfg, config, mesh, state, B)
            got_state, got_metrics = step(placed_state, train_batch)
            assert expert_sharded(got_state.params) == (n_expert > 1)
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_state.params),
                                    jax.tree_util.tree_leaves(want_params)):
                _close(jax.tree_util.keystr(path), a, b)
            return _close("loss", got_metrics["loss"], want_loss)

    for label, spec in MESHES.items():
        matrix(label, spec)

    # ---------------------------------------------------------------- fsdp and tensor axes
    @check("forward_tensor")
    def _():
        mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
        placed = sharding.shard_params(params, mesh)
        got = sharding.sharded_forward(cfg, mesh, placed, B, impl="expert_parallel")(placed, tokens)
        return _close("fsdp=2,expert=2,tensor=2", got, want_forward())

    @check("params_sharded")
    def _():
        mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
        placed = sharding.shard_params(params, mesh)
        whole = sharding.entry.per_device_bytes(jax.device_put(params, sharding.replicated(mesh)))
        mine = sharding.entry.per_device_bytes(placed)
        gate = placed["layer_0"]["moe"]["experts"]["bucket_0"]["gate"]
        assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor"), gate.sharding.spec
        assert gate.addressable_shards[0].data.shape == (4, 16, 12), gate.addressable_shards[0].data.shape
        assert mine < whole / 3, (mine, whole)
        return {"bytes_per_device": mine, "replicated": whole}

    @check("generate_tensor")
    def _():  # expert-parallel decode with the KV cache split over batch x KV heads
        mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
        axes = sharding.cache_axes(cfg, mesh, B)
        assert axes == (("data", "expert"), "tensor"), axes  # 2 KV heads over tensor=2
        placed = sharding.shard_params(params, mesh)
        got = sharding.sharded_generate(cfg, mesh, placed, B, 4, impl="expert_parallel")(placed, prompts, prompt_mask)
        want = want_generate()
        assert np.array_equal(np.asarray(got), want), (got, want)
        return {"tokens": want[:2].tolist(), "cache_axes": str(axes)}

    @check("launch_place")
    def _():  # the launchers' path: `launch.place` under the default mesh, then the unchanged library code
        from moe_jax import evaluation, launch, pruning
        from moe_jax.data.skills import DOMAINS, Example
        from moe_jax.data.tokenizer import ByteTokenizer

        class SmallVocab(ByteTokenizer):  # byte ids; prompts use bytes < 61, specials sit inside the 64-token vocab
            vocab_size = cfg.vocab_size
            pad_id, bos_id, eos_id = 61, 62, 63

        tok = SmallVocab()
        examples = [Example(DOMAINS[0], f"{a}+{b}", str(a + b)) for a, b in ((1, 2), (13, 4), (7, 25), (40, 9), (3, 3))]
        widths = cfg.expert_widths[0]
        plan = pruning.PruningPlan("test", "layer", 0.75, {0: tuple(widths)}, {0: (2, 5)},  # 2 experts: few eager ops
                                   {0: {2: tuple(range(0, widths[2], 2)), 5: tuple(range(1, widths[5], 3))}})

        def run(params):
            return (evaluation.exact_match(cfg, params, tok, examples, batch_size=4, max_new_tokens=4),
                    scoring.collect(cfg, params, calib, ("fisher",), micro_batch_size=8, progress=False, impl="dense"),
                    pruning.apply(cfg, params, plan))

        want_em, want_fisher, (want_cfg, want_pruned) = run(params)
        mesh = sharding.make_mesh("data=2,expert=4")
        assert launch.place(cfg, params, None) is params
        with jax.set_mesh(mesh):  # what launch.initialize() leaves behind
            placed = launch.place(cfg, params, mesh)
            assert placed["layer_0"]["moe"]["experts"]["bucket_0"]["up"].sharding.spec[0] == "expert"
            got_em, got_fisher, (got_cfg, got_pruned) = run(placed)
            launch.place(got_cfg, got_pruned, mesh)  # prune.py re-places the compacted model
        assert got_em == want_em, (got_em["predictions"], want_em["predictions"])
        assert got_cfg == want_cfg, (got_cfg, want_cfg)
        want_leaves = jax.tree_util.tree_leaves(want_pruned)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_pruned), want_leaves):
            assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
        return {"predictions": [p["prediction"] for p in got_em["predictions"]],
                **{layer: _close(f"fisher {layer}", got_fisher["fisher"][layer], arr)
                   for layer, arr in want_fisher["fisher"].items()}}

    @check("ep_layer")
    def _():  # the dispatch alone, against the dense single-device layer and a per-token loop
        from moe_jax.model.layout import expert_weight

        moe_params = params["layer_0"]["moe"]
        x_TD = rng.normal(size=(13, cfg.hidden_size)).astype(np.float32)  # 13: not a multiple of 8
        routing = moe.trim(moe.route(cfg, 0, moe_params, jnp.asarray(x_TD)), tau=0.45)  # some rows dropped
        mask = jnp.asarray(rng.uniform(size=(8, cfg.max_width(0))), jnp.float32)
        want, want_stats = moe.experts_forward(cfg, 0, moe_params["experts"], x_TD, routing, dims_mask=mask,
                                               impl="dense", collect_stats=True)
        idx, w = np.asarray(routing.idx_TK), np.asarray(routing.weights_TK) * np.asarray(routing.active_TK)
        assert not np.asarray(routing.active_TK).all()
        loop = np.zeros(x_TD.shape)
        for t in range(len(x_TD)):
            for k in range(cfg.num_experts_per_tok):
                ew = {n: np.asarray(a, np.float64) for n, a in expert_weight(cfg, params, 0, idx[t, k]).items()}
                g, u = x_TD[t] @ ew["gate"], x_TD[t] @ ew["up"]
                h = g / (1 + np.exp(-g)) * u * np.asarray(mask[idx[t, k], :len(g)])
                loop[t] += w[t, k] * (h @ ew["down"])
        cot = rng.normal(size=x_TD.shape).astype(np.float32)
        loss = lambda impl: lambda e, x, m: jnp.sum(moe.experts_forward(cfg, 0, e, x, routing, dims_mask=m,
                                                                        impl=impl)[0] * cot)
        want_grads = jax.grad(loss("dense"), argnums=(0, 1, 2))(moe_params["experts"], x_TD, mask)
        errs = {}
        try:
            # the matrix runs the dispatch on expert=8 and data=2 x expert=4 too; "pallas": issue 22's kernels
            for spec, inner in (("expert=8", "auto"), ("expert=8", "pallas")):
                expert_parallel.INNER_IMPL = inner
                with jax.set_mesh(sharding.make_mesh(spec)):
                    got, stats = jax.jit(lambda e, x, r, m: moe.experts_forward(
                        cfg, 0, e, x, r, dims_mask=m, impl="expert_parallel", collect_stats=True))(
                        moe_params["experts"], x_TD, routing, mask)
                    grads = jax.jit(jax.grad(loss("expert_parallel"), argnums=(0, 1, 2)))(
                        moe_params["experts"], x_TD, mask) if inner == "pallas" else None
                label = f"{spec} {inner}"
                errs[label] = _close(label, got, want)
                _close(f"{label} vs loop", got, loop)
                for k in want_stats:
                    _close(f"{label} {k}", stats[k], want_stats[k])
                for i, (g, w) in enumerate(zip(jax.tree.leaves(grads or ()), jax.tree.leaves(want_grads))):
                    _close(f"{label} grad {i}", g, w)
        finally:
            expert_parallel.INNER_IMPL = "dense"
        return errs

    @check("pruned")
    def _():
        # Layer 0 keeps 6 experts in width buckets of 1 (w 8), 3 (w 16) and 2 (w 24) experts; layer 1 keeps
        # 5 of width 20. None of those counts is a multiple of expert=4.
        pcfg = tiny_config("mixtral", num_layers=2, num_experts=8).with_layer_experts(0, (24, 16, 8, 16, 24, 16))
        pcfg = pcfg.with_layer_experts(1, (20,) * 5)
        pparams = scaled_params(pcfg, seed=1)
        want = model.forward(pcfg, pparams, tokens, impl="dense")
        mesh = sharding.make_mesh("data=2,expert=4")
        report = sharding.expert_padding_report(pcfg, mesh)
        assert report["unsharded_buckets"] == [(0, 0, 1), (0, 1, 3), (0, 2, 2), (1, 0, 5)], report
        per_dim = 3 * pcfg.hidden_size * 4  # gate + up + down bytes per unit of width, float32
        assert report["padded_bytes"] == per_dim * (3 * 8 + 1 * 16 + 2 * 24 + 3 * 20), report["padded_bytes"]
        placed = sharding.shard_params(pparams, mesh)
        lines = sharding.place_report(pparams, mesh)
        assert any("layer_0/moe/experts/bucket_1/gate" in line and "expert=4" in line for line in lines), lines
        got = sharding.sharded_forward(pcfg, mesh, placed, B, impl="expert_parallel")(placed, tokens)
        return {"error": _close("pruned", got, want), "padded_bytes": report["padded_bytes"],
                "replicated_bytes_per_device": report["replicated_bytes_per_device"]}

    @check("mla")
    def _():  # DeepSeek-V3: MLA, sigmoid group-limited router with score bias, shared expert, dense layer 0
        dcfg = tiny_config("deepseek_v3", num_layers=2)
        dparams = scaled_params(dcfg, seed=2)
        want = model.forward(dcfg, dparams, tokens, impl="dense")
        mesh = sharding.make_mesh("fsdp=2,expert=4")
        placed = sharding.shard_params(dparams, mesh)
        return _close("deepseek_v3", sharding.sharded_forward(dcfg, mesh, placed, B, impl="expert_parallel")(
            placed, tokens), want)

    return results


if __name__ == "__main__":
    group, out = sys.argv[1], Path(sys.argv[2])
    if group not in SHARDING_CHECK_GROUPS:
        raise SystemExit(f"unknown group {group!r}; expected one of {sorted(SHARDING_CHECK_GROUPS)}")
    out.write_text(json.dumps(run_checks(SHARDING_CHECK_GROUPS[group]), default=str))
