"""scoring.collect against brute force: a per-sample jax.grad loop for Fisher, numpy loops over
routed tokens for activations, and a killed-and-resumed run against an uninterrupted one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import scoring
from moe_jax.model import forward
from moe_jax.model.layout import expert_weight
from moe_jax.scoring import Scores, ScoringError
from tests.conftest import scaled_params, scoring_batches, tiny_config


def _brute_force_fisher(cfg, params, batches):
    """sum_s (dL_s/dm)^2 and mean_s |dL_s/dm| with one jax.grad per sequence (dense dispatch)."""
    fisher, grad_abs, n = {}, {}, 0
    for batch in batches:
        rows = scoring.calibration_rows(batch)
        for s in range(len(rows["inputs"])):
            if rows["weights"][s].sum() == 0:
                continue
            one = {k: v[s:s + 1] for k, v in rows.items()}

            def loss(masks, one=one):
                logits = forward(cfg, params, one["inputs"], masks, segment_ids=one["segment_ids"], impl="dense")
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, one["targets"])
                return (ce * one["weights"]).sum() / one["weights"].sum()

            masks = {cfg.layer_name(i): {"dims": jnp.ones((cfg.experts_per_layer[i], cfg.max_width(i)))}
                     for i in cfg.moe_layers}
            g = jax.grad(loss)(masks)
            for name in g:
                d = np.asarray(g[name]["dims"], np.float64)
                fisher[name] = fisher.get(name, 0) + d**2
                grad_abs[name] = grad_abs.get(name, 0) + np.abs(d)
            n += 1
    return fisher, {k: v / n for k, v in grad_abs.items()}, n


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_fisher_equals_per_sample_grad_loop(family):
    cfg = tiny_config(family)
    params = scaled_params(cfg)
    batches = scoring_batches(cfg)
    got = scoring.collect(cfg, params, batches, ["fisher", "grad_abs"], micro_batch_size=2, progress=False)
    fisher, grad_abs, n = _brute_force_fisher(cfg, params, batches)
    assert got.num_sequences == n == 9
    for name in fisher:
        assert fisher[name].max() > 1e-6  # the oracle is not trivially zero
        np.testing.assert_allclose(got["fisher"][name], fisher[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["grad_abs"][name], grad_abs[name], rtol=1e-5, atol=1e-6)


def test_fisher_of_a_non_uniform_model_is_nan_beyond_each_width():
    cfg = tiny_config("mixtral", num_layers=1)
    cfg = cfg.with_layer_experts(0, (24, 8, 16, 24, 4, 24, 12, 20))
    params = scaled_params(cfg)
    got = scoring.collect(cfg, params, scoring_batches(cfg, 1), ["fisher"], progress=False)
    fisher, _, _ = _brute_force_fisher(cfg, params, scoring_batches(cfg, 1))
    arr = got["fisher"]["layer_0"]
    for e, w in enumerate(cfg.expert_widths[0]):
        assert np.isnan(arr[e, w:]).all() and np.isfinite(arr[e, :w]).all()
        np.testing.assert_allclose(arr[e, :w], fisher["layer_0"][e, :w], rtol=1e-4, atol=1e-5)


def test_activation_routing_and_magnitude_by_hand_on_one_layer():
    cfg = tiny_config("mixtral", num_layers=1)
    params = scaled_params(cfg)
    batches = scoring_batches(cfg, 2)
    got = scoring.collect(cfg, params, batches, ["activation", "router_weighted", "magnitude", "routing"],
                          micro_batch_size=2, progress=False)
    E, F = cfg.experts_per_layer[0], cfg.max_width(0)
    act, wact, count, mass, reap = np.zeros((E, F)), np.zeros((E, F)), np.zeros(E), np.zeros(E), np.zeros(E)
    w = [{k: np.asarray(v, np.float64) for k, v in expert_weight(cfg, params, 0, e).items()} for e in range(E)]
    for batch in batches:
        rows = scoring.calibration_rows(batch)
        _, aux = forward(cfg, params, rows["inputs"], segment_ids=rows["segment_ids"],
                         capture=("moe_inputs", "routing"), impl="dense")
        a = aux["layer_0"]
        x = np.asarray(a["x"], np.float64)
        for b, t in zip(*np.nonzero(rows["segment_ids"] > 0)):
            mass += np.asarray(a["scores_TE"][b, t])
            for e, g in zip(np.asarray(a["idx_TK"][b, t]), np.asarray(a["weights_TK"][b, t])):
                gate = x[b, t] @ w[e]["gate"]
                h = gate / (1 + np.exp(-gate)) * (x[b, t] @ w[e]["up"])
                act[e] += np.abs(h)
                wact[e] += g * np.abs(h)
                count[e] += 1
                reap[e] += g * np.linalg.norm(h @ w[e]["down"])
    assert count.sum() == got.num_tokens * cfg.num_experts_per_tok
    np.testing.assert_allclose(got["activation"]["layer_0"], act / count[:, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["router_weighted"]["layer_0"], wact / count[:, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["expert_count"]["layer_0"], count)
    np.testing.assert_allclose(got["expert_prob_mass"]["layer_0"], mass, rtol=1e-5)
    np.testing.assert_allclose(got["expert_reap"]["layer_0"], reap / count, rtol=1e-4)
    mag = np.stack([np.linalg.norm(we["gate"], axis=0) * np.linalg.norm(we["up"], axis=0)
                    * np.linalg.norm(we["down"], axis=1) for we in w])
    np.testing.assert_allclose(got["magnitude"]["layer_0"], mag, rtol=1e-5)


def test_micro_batching_and_random_are_deterministic():
    cfg = tiny_config("olmoe")
    params = scaled_params(cfg)
    a = scoring.collect(cfg, params, scoring_batches(cfg), ["fisher", "activation", "random"], micro_batch_size=1,
                        progress=False, seed=3)
    b = scoring.collect(cfg, params, scoring_batches(cfg), ["fisher", "activation", "random"], micro_batch_size=3,
                        progress=False, seed=3)
    for stat in ("fisher", "activation", "random"):
        for layer in a[stat]:
            np.testing.assert_allclose(a[stat][layer], b[stat][layer], rtol=1e-5, atol=1e-7)
    c = scoring.collect(cfg, params, [], ["random"], seed=4, progress=False)  # data-free: no batches needed
    assert not np.allclose(c["random"]["layer_0"], a["random"]["layer_0"])


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_scores(tmp_path):
    cfg = tiny_config("qwen2_moe")
    params = scaled_params(cfg)
    batches = scoring_batches(cfg, n_batches=5)
    stats = ["fisher", "grad_abs", "activation", "routing"]
    full = scoring.collect(cfg, params, batches, stats, progress=False)

    def dies_after(n):
        for i, b in enumerate(batches):
            if i == n:
                raise _Killed
            yield b

    ckpt = tmp_path / "scoring_state.npz"
    with pytest.raises(_Killed):
        scoring.collect(cfg, params, dies_after(3), stats, checkpoint_path=ckpt, checkpoint_every=1, progress=False)
    assert ckpt.exists() and not list(tmp_path.glob(".*"))  # no half-written temporaries
    seen = []

    def recording():
        for b in batches:
            seen.append(1)
            yield b

    resumed = scoring.collect(cfg, params, recording(), stats, checkpoint_path=ckpt, progress=False)
    assert resumed.meta["batches"] == 5 and resumed.num_tokens == full.num_tokens
    for stat in full.names:
        for layer in full[stat]:
            np.testing.assert_allclose(resumed[stat][layer], full[stat][layer], rtol=1e-6)
    # Another model's state is refused, naming the file.
    with pytest.raises(ScoringError, match="scoring_state.npz.*another run"):
        scoring.collect(cfg, scaled_params(cfg, seed=1), batches, stats, checkpoint_path=ckpt, progress=False)


def test_model_digest_changes_with_any_weight_and_only_then():
    """Cached scores must not outlive a weight change the routers do not see: trimming's
    frozen-router rule retrains experts and leaves every router kernel as it was."""
    cfg = tiny_config("qwen2_moe", num_experts=8)
    params = scaled_params(cfg)
    digest = scoring.model_digest(cfg, params)
    assert scoring.model_digest(cfg, jax.tree.map(np.array, params)) == digest  # same bytes, other arrays

    def changed(path, e=None, delta=1e-3):
        """params with one tensor (or one expert of it) nudged as a training step would."""
        out = jax.tree.map(np.array, params)
        node = out
        for key in path[:-1]:
            node = node[key]
        arr = node[path[-1]]
        if e is None:
            arr += delta
        else:
            arr[e] += delta
        return out

    bucket = ("layer_0", "moe", "experts", "bucket_0")
    for e in range(cfg.experts_per_layer[0]):  # every expert of the bucket, routers untouched
        for name in ("gate", "up", "down"):
            assert scoring.model_digest(cfg, changed((*bucket, name), e)) != digest, (e, name)
    for path in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in path[0])
        assert scoring.model_digest(cfg, changed(keys)) != digest, keys
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert scoring.model_digest(cfg, bf16) != digest


def test_scores_save_load_round_trip(tmp_path):
    cfg = tiny_config("mixtral")
    params = scaled_params(cfg)
    s = scoring.collect(cfg, params, scoring_batches(cfg, 1), ["fisher", "routing"], progress=False)
    path = s.save(tmp_path / "scores.npz")
    back = Scores.load(path)
    assert back.widths == s.widths and back.num_sequences == s.num_sequences
    for stat in s.names:
        for layer in s[stat]:
            np.testing.assert_array_equal(back[stat][layer], s[stat][layer])
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ScoringError, match="bad.npz"):
        Scores.load(tmp_path / "bad.npz")


def test_bad_input_errors():
    cfg = tiny_config("mixtral")
    params = scaled_params(cfg)
    with pytest.raises(ScoringError, match="unknown.*'fishr'"):
        scoring.collect(cfg, params, scoring_batches(cfg), ["fishr"])
    empty = [{"tokens": np.ones((2, 6), np.int32), "segment_ids": np.zeros((2, 6), np.int32)}]
    with pytest.raises(ScoringError, match="no calibration tokens"):
        scoring.collect(cfg, params, empty, ["fisher"], progress=False)
    with pytest.raises(ScoringError, match="no calibration tokens"):
        scoring.collect(cfg, params, [], ["activation"], progress=False)
    with pytest.raises(ScoringError, match="'tokens' has shape"):
        scoring.collect(cfg, params, [np.ones((4,), np.int32)], ["fisher"], progress=False)
    s = scoring.collect(cfg, params, scoring_batches(cfg, 1), ["fisher"], progress=False)
    s.values["fisher"]["layer_1"][3, 5] = np.nan
    with pytest.raises(ScoringError, match="'fisher', layer_1 expert 3.*dim 5"):
        s.check_finite()
