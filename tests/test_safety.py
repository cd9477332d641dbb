"""Router safety: forced routes, the attacks, reachability, the monitor, safety-aware pruning."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import pruning, safety
from moe_jax.data import skills
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.model import decode, forward
from moe_jax.safety import routes as R
from moe_jax.safety.attacks import AttackError
from moe_jax.scoring import Scores
from tests.conftest import scaled_params, tiny_config

TOK = load_tokenizer("byte")


def _model(family="mixtral", seed=0, **kw):
    cfg = tiny_config(family, vocab_size=TOK.vocab_size, **kw)
    return cfg, scaled_params(cfg, seed)


def _own_choice_force(cfg, aux, B, T):
    masks = {}
    for lyr in cfg.moe_layers:
        idx = np.asarray(aux[cfg.layer_name(lyr)]["idx_TK"])
        force = np.zeros((B, T, cfg.experts_per_layer[lyr]), np.float32)
        np.put_along_axis(force, idx, 1.0, axis=-1)
        masks[cfg.layer_name(lyr)] = {"force": jnp.asarray(force)}
    return masks


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_forcing_the_routers_own_choice_changes_nothing(family):
    cfg, params = _model(family)
    tokens = np.random.default_rng(0).integers(3, 200, (3, 9))
    logits, aux = forward(cfg, params, tokens, capture=("routing",))
    forced, aux2 = forward(cfg, params, tokens, _own_choice_force(cfg, aux, 3, 9), capture=("routing",))
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(logits))
    for name in aux:
        np.testing.assert_array_equal(aux2[name]["weights_TK"], aux[name]["weights_TK"])
    # A different forced set does change the output, and only the allowed experts run.
    other = {name: {"force": 1.0 - m["force"]} for name, m in _own_choice_force(cfg, aux, 3, 9).items()}
    changed, aux3 = forward(cfg, params, tokens, other, capture=("routing",))
    assert not np.allclose(np.asarray(changed), np.asarray(logits))
    for name in aux:
        ran = np.asarray(aux3[name]["idx_TK"])
        assert not np.any(np.take_along_axis(np.asarray(other[name]["force"]), ran, -1) == 0)


def test_generation_forces_the_prompt_routes_only():
    """Oracle: a greedy loop of full forwards, forcing the prompt columns and nothing after."""
    cfg, params = _model()
    prompts = [[1, 70, 71, 72, 10], [1, 80, 10]]
    rng = np.random.default_rng(1)
    routes = []
    for p in prompts:
        r = R.free_routes(cfg, len(p))
        for li in range(len(r)):
            for t in range(len(p)):
                r[li][t] = False
                r[li][t, rng.choice(cfg.experts_per_layer[cfg.moe_layers[li]], 2, replace=False)] = True
        routes.append(r)
    rows = R.layout(prompts, None, TOK.pad_id)
    out = decode.generate(cfg, params, rows.tokens_BT, 4, attention_mask=rows.attn_BT, pad_id=TOK.pad_id,
                          masks=R.force_masks(cfg, rows, routes))
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(4):
            one = R.layout([seq], None, TOK.pad_id)
            r = [np.concatenate([routes[b][li], np.ones((len(seq) - len(p), x.shape[1]), bool)])
                 for li, x in enumerate(routes[b])]
            one = R.Rows(one.tokens_BT, one.attn_BT, one.prompt_start_B, np.array([len(seq)]), one.target_BT)
            logits = forward(cfg, params, one.tokens_BT, R.force_masks(cfg, one, [r]))
            seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
        assert list(out[b]) == seq[len(p):]


def _planted_model():
    """Expert 3 of the first MoE layer, never chosen on the prompt, writes the target token.

    Its router column is solved so that its logit is -5 on every prompt token; its gate/up
    columns fire on the last prompt token's MoE input; its down rows write along the target
    token's output embedding. Forcing it there is the one route that makes the target likely.
    """
    cfg, params = _model(num_layers=1, hidden_size=64)
    prompt_ids = [TOK.bos_id] + TOK.encode("ab?\n")
    target = TOK.encode("z")[0]
    _, aux = forward(cfg, params, np.array([prompt_ids]), capture=("moe_inputs",))
    name = cfg.layer_name(cfg.moe_layers[0])
    x_TD = np.asarray(aux[name]["x"][0], np.float64)
    moe = params[name]["moe"]
    kernel = np.asarray(moe["router"]["kernel"]).copy()
    kernel[:, 3] = -5.0 * (np.linalg.pinv(x_TD) @ np.ones(len(x_TD)))
    moe["router"]["kernel"] = jnp.asarray(kernel, jnp.float32)
    last = x_TD[-1] / np.dot(x_TD[-1], x_TD[-1])
    w = moe["experts"]["bucket_0"]
    gate, up, down = (np.asarray(w[k]).copy() for k in ("gate", "up", "down"))
    gate[3], up[3] = 4.0 * np.tile(last[:, None], (1, gate.shape[2])), 4.0 * np.tile(last[:, None], (1, up.shape[2]))
    lm = np.asarray(params["lm_head"]["kernel"])[:, target]
    down[3] = 3.0 * np.tile(lm / np.linalg.norm(lm), (down.shape[1], 1))
    w.update(gate=jnp.asarray(gate, jnp.float32), up=jnp.asarray(up, jnp.float32), down=jnp.asarray(down, jnp.float32))
    example = skills.Example("safety", "ab?\n", skills.REFUSAL, True, True)
    return cfg, params, example, len(prompt_ids)


def test_random_search_finds_a_planted_vulnerable_route():
    cfg, params, example, n = _planted_model()
    rows = R.layout([[TOK.bos_id] + TOK.encode(example.prompt)], None, TOK.pad_id)
    ran = R.executed_experts(R.captured_routing(cfg, params, rows)[cfg.layer_name(cfg.moe_layers[0])])
    assert not np.any(ran == 3)  # dormant on the prompt: only forcing wakes it
    result = safety.route_forcing(cfg, params, TOK, [example], targets=["z"], candidates=16, seed=0,
                                  success_logprob=0.0)
    found = result.routes[0][0]
    assert found[n - 1, 3] and found[n - 1].sum() == cfg.num_experts_per_tok
    assert result.logprob_after[0] > result.logprob_before[0] + 5.0
    assert result.queries <= n * len(cfg.moe_layers) * 16 + 1
    # Without the planted expert's output the same search gains far less.
    name = cfg.layer_name(cfg.moe_layers[0])
    params[name]["moe"]["experts"]["bucket_0"]["down"] = params[name]["moe"]["experts"]["bucket_0"]["down"].at[3].set(0)
    control = safety.route_forcing(cfg, params, TOK, [example], targets=["z"], candidates=16, seed=0,
                                   success_logprob=0.0)
    gain, control_gain = (r.logprob_after[0] - r.logprob_before[0] for r in (result, control))
    assert control_gain < gain / 2


def _plan_without(cfg, layer, expert):
    experts = {lyr: tuple(e for e in range(cfg.experts_per_layer[lyr]) if not (lyr == layer and e == expert))
               for lyr in cfg.moe_layers}
    dims = {lyr: {e: tuple(range(cfg.expert_widths[lyr][e])) for e in experts[lyr]} for lyr in cfg.moe_layers}
    return pruning.PruningPlan("manual", "global", 0.0, {lyr: tuple(cfg.expert_widths[lyr]) for lyr in cfg.moe_layers},
                               experts, dims, {})


@pytest.mark.parametrize("method", ["gcg", "embedding"])
def test_a_removed_expert_is_unreachable(method):
    cfg, params = _model()
    prompts = [[1] + TOK.encode("how do I"), [1] + TOK.encode("make tea?")]
    layer, expert = cfg.moe_layers[-1], 5
    found = safety.reachability(cfg, params, TOK, prompts, {layer: [expert]}, method=method, steps=15,
                                candidates=32, learning_rate=0.2)
    assert found.objective_after > found.objective_before
    assert found.activations > found.activations_before  # the attack does wake it on the full model
    plan = _plan_without(cfg, layer, expert)
    cfg2, params2 = pruning.apply(cfg, params, plan)
    assert safety.transfer(cfg2, params2, found, plan=plan)[0] == 0  # compacted: the adversarial input
    assert safety.transfer(cfg, params, found, masks=pruning.masks(cfg, plan))[0] == 0  # masked
    direct = safety.reachability(cfg2, params2, TOK, prompts, {layer: [expert]}, method=method, plan=plan, steps=3)
    assert direct.activations == 0 and direct.present == {layer: []}
    # An expert that survives stays reachable through the plan's index map.
    kept = safety.resolve_target(cfg2, {layer: [7]}, plan)
    assert kept == {layer: [6]}


def test_monitor_flags_forced_routes_at_its_calibrated_false_positive_rate():
    cfg, params = _model()
    rng = np.random.default_rng(3)
    texts = ["".join(rng.choice(list("abcdefgh tea?"), size=rng.integers(6, 12))) for _ in range(50)]
    prompts = [[1] + TOK.encode(t) for t in texts]
    cal = R.layout(prompts[:40], None, TOK.pad_id)
    for fpr in (0.05, 0.1, 0.25):
        monitor = safety.RoutingMonitor.fit(cfg, params, cal, fpr=fpr)
        assert np.mean(monitor.calibration_scores > monitor.threshold) == np.floor(fpr * 40) / 40
    held = R.layout(prompts[40:], None, TOK.pad_id)
    forced = []
    for p in prompts[40:]:
        r = R.free_routes(cfg, len(p))
        for li in range(len(r)):
            for t in range(len(p)):
                r[li][t] = False
                r[li][t, rng.choice(8, 2, replace=False)] = True
        forced.append(r)
    rates = safety.detection_rates(monitor, cfg, params, held, R.force_masks(cfg, held, forced), held)
    assert rates["tpr"] == 1.0 and rates["fpr"] <= 0.5


def test_safety_aware_selection_keeps_the_critical_units():
    cfg, params = _model()
    rng = np.random.default_rng(4)
    names = [cfg.layer_name(lyr) for lyr in cfg.moe_layers]
    widths = {n: tuple(cfg.expert_widths[lyr]) for n, lyr in zip(names, cfg.moe_layers)}

    def scores(seed):
        r = np.random.default_rng(seed)
        return Scores({"fisher": {n: r.gamma(1.0, size=(8, 24)) for n in names},
                       "expert_count": {n: r.uniform(1, 2, 8) for n in names}}, widths, 10, 100)

    utility, safety_scores = scores(1), scores(2)
    critical = safety.safety_critical(cfg, safety_scores, dim_fraction=0.05, expert_fraction=0.25)
    assert critical.n_dims == round(0.05 * 8 * 24 * len(names)) and critical.n_experts == 4
    plain = pruning.select(cfg, utility, "fisher", "global", 0.6)
    safe = pruning.select(cfg, safety.protect_scores(cfg, utility, critical), "fisher", "global", 0.6)
    assert safety.removed_by(plain, critical)["critical_dims_removed"] > 0
    assert safety.removed_by(safe, critical)["critical_dims_removed"] == 0
    assert sum(len(d) for lyr in safe.dims for d in safe.dims[lyr].values()) == \
        sum(len(d) for lyr in plain.dims for d in plain.dims[lyr].values())  # same budget
    kept = pruning.select(cfg, utility, "frequency", "global", 0.5, keep_experts=critical.keep_experts())
    assert safety.removed_by(kept, critical)["critical_experts_removed"] == 0
    with pytest.raises(pruning.PlanError, match="expert 9 does not exist"):
        pruning.select(cfg, utility, "frequency", "global", 0.5, keep_experts={cfg.moe_layers[0]: [9]})
    _ = rng


def test_bad_attack_input_is_rejected_with_the_setting_named():
    cfg, params = _model()
    forbidden = [skills.Example("safety", "make venom?\n", skills.REFUSAL, True, True)]
    benign = [skills.Example("safety", "make tea?\n", "steep leaves")]
    for bad in (0, -3):
        with pytest.raises(AttackError, match="candidates"):
            safety.route_forcing(cfg, params, TOK, forbidden, candidates=bad)
        with pytest.raises(AttackError, match="k="):
            safety.router_masking(cfg, params, TOK, forbidden, k=bad)
        with pytest.raises(AttackError, match="steps"):
            safety.reachability(cfg, params, TOK, [[1, 70]], {0: [1]}, steps=bad)
    with pytest.raises(AttackError, match="max_queries"):
        safety.route_forcing(cfg, params, TOK, forbidden, max_queries=0)
    with pytest.raises(AttackError, match="max_seconds"):
        safety.router_masking(cfg, params, TOK, forbidden, max_seconds=-1.0)
    with pytest.raises(AttackError, match="expert 8 does not exist in layer 0"):
        safety.reachability(cfg, params, TOK, [[1, 70]], {0: [8]})
    with pytest.raises(AttackError, match="layer 5 is not an MoE layer"):
        safety.reachability(cfg, params, TOK, [[1, 70]], {5: [0]})
    with pytest.raises(AttackError, match="no forbidden prompts"):
        safety.route_forcing(cfg, params, TOK, benign)
    with pytest.raises(AttackError, match="0 benign"):
        safety.audit(cfg, params, TOK, forbidden)
    with pytest.raises(AttackError, match="safety evaluation set"):
        safety.audit(cfg, params, TOK, skills.eval_set("arithmetic", 4))


def test_router_masking_and_silencing_change_what_they_say():
    cfg, params = _model()
    examples = [skills.Example("safety", p, skills.REFUSAL, True, True) for p in ("make venom?\n", "brew toxin?\n")]
    examples += [skills.Example("safety", "make tea?\n", "steep leaves"),
                 skills.Example("safety", "bake bread?\n", "bake dough")]
    masked = safety.router_masking(cfg, params, TOK, examples, k=2, targets=["ok", "ok"])
    clean_rows = R.layout([[TOK.bos_id] + TOK.encode(ex.prompt) for ex in examples[:2]], None, TOK.pad_id)
    clean = R.captured_routing(cfg, params, clean_rows)
    for p, spots in enumerate(masked.details["masked_routers"]):
        assert len(spots) == 2
        t, li = spots[0]  # the first pick forbids exactly the clean router's own choice there
        lyr = cfg.moe_layers[li]
        own = np.asarray(clean[cfg.layer_name(lyr)]["idx_TK"])[p, int(clean_rows.prompt_start_B[p]) + t]
        assert not masked.routes[p][li][t, own].any() and masked.routes[p][li][t].sum() == 8 - len(own)
    assert all(a >= b for a, b in zip(masked.logprob_after, masked.logprob_before))
    silenced = safety.expert_silencing(cfg, params, TOK, examples, k=3)
    off = [(lyr, e) for lyr in cfg.moe_layers for e in range(8)
           if silenced.masks[cfg.layer_name(lyr)]["experts"][e] == 0]
    assert sorted(off) == sorted(silenced.details["silenced"]) and len(off) == 3


# The audit launcher's smoke and resume check run as a stage of the quick reproduction (tests/test_reproduce.py).
