"""The decoder's own contracts: masks equal physical removal, cache equals full forward,
batching equals one-by-one, and the real Qwen1.5-MoE shape counts ~14.3B parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import ModelConfig
from moe_jax.hf import config_json as hf_config
from moe_jax.model import apply, forward, generate, init, init_cache
from moe_jax.model.layout import expert_weight, pack_experts
from tests.conftest import tiny_config

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def _random_params(cfg, seed=0, scale=0.3):
    """init() scaled up (padding stays zero), so routing and masks visibly matter."""
    params = init(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) * (scale / 0.02)) if x.ndim > 1 else x,
                                  params)


def _tokens(cfg, shape=(2, 10), seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape).astype(np.int32)


def _remove_expert(cfg, params, layer, expert):
    """Oracle for an expert mask: the model with that expert physically gone."""
    keep = [e for e in range(cfg.experts_per_layer[layer]) if e != expert]
    per = [expert_weight(cfg, params, layer, e) for e in keep]
    cfg2 = cfg.with_layer_experts(layer, [cfg.expert_widths[layer][e] for e in keep])
    p2 = jax.tree_util.tree_map(lambda x: x, params)
    moe = p2[cfg.layer_name(layer)]["moe"]
    moe["router"]["kernel"] = moe["router"]["kernel"][:, jnp.array(keep)]
    if "score_bias" in moe:
        moe["score_bias"] = moe["score_bias"][jnp.array(keep)]
    moe["experts"] = pack_experts(cfg2, layer, per, xp=jnp)
    return cfg2, p2


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe"])
def test_expert_mask_equals_removing_the_expert(family):
    cfg = tiny_config(family)
    params = _random_params(cfg)
    tokens = _tokens(cfg)
    layer = cfg.moe_layers[-1]
    _, aux = forward(cfg, params, tokens, capture=("routing",))
    busiest = int(np.bincount(np.asarray(aux[cfg.layer_name(layer)]["idx_TK"]).ravel()).argmax())
    mask = jnp.ones(cfg.experts_per_layer[layer]).at[busiest].set(0)
    masked = forward(cfg, params, tokens, {cfg.layer_name(layer): {"experts": mask}})
    cfg2, p2 = _remove_expert(cfg, params, layer, busiest)
    removed = forward(cfg2, p2, tokens)
    np.testing.assert_allclose(masked, removed, atol=1e-5)
    assert np.abs(masked - forward(cfg, params, tokens)).max() > 1e-3  # the mask did something


def test_dims_mask_equals_slicing_the_dims():
    """Masking dims of one expert == a non-uniform model whose expert is narrower."""
    cfg = tiny_config("qwen3_moe")
    params = _random_params(cfg)
    tokens = _tokens(cfg)
    layer, expert, keep = 1, 5, np.arange(0, 24, 3)
    dims = jnp.ones((8, 24)).at[expert].set(0).at[expert, keep].set(1)
    masked = forward(cfg, params, tokens, {cfg.layer_name(layer): {"dims": dims}})
    per = [expert_weight(cfg, params, layer, e) for e in range(8)]
    per[expert] = {"gate": per[expert]["gate"][:, keep], "up": per[expert]["up"][:, keep],
                   "down": per[expert]["down"][keep]}
    widths = [24] * 8
    widths[expert] = len(keep)
    cfg2 = cfg.with_layer_experts(layer, widths)
    assert len(cfg2.expert_buckets(layer)) == 2
    p2 = jax.tree_util.tree_map(lambda x: x, params)
    p2[cfg.layer_name(layer)]["moe"]["experts"] = pack_experts(cfg2, layer, per, xp=jnp)
    np.testing.assert_allclose(masked, forward(cfg2, p2, tokens), atol=1e-5)


def test_per_sequence_masks_match_one_sequence_at_a_time():
    cfg = tiny_config("mixtral")
    params = _random_params(cfg)
    tokens = _tokens(cfg, (3, 8))
    rs = np.random.RandomState(1)
    name = cfg.layer_name(1)
    dims = jnp.asarray(rs.rand(3, 8, 24) > 0.3, jnp.float32)
    experts = jnp.ones((3, 8)).at[0, 2].set(0).at[2, 5].set(0)
    batched = forward(cfg, params, tokens, {name: {"dims": dims, "experts": experts}})
    for s in range(3):
        single = forward(cfg, params, tokens[s:s + 1], {name: {"dims": dims[s], "experts": experts[s]}})
        np.testing.assert_allclose(batched[s:s + 1], single, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(family):
    cfg = tiny_config(family)
    params = _random_params(cfg)
    tokens = _tokens(cfg, (2, 9))
    full = forward(cfg, params, tokens)
    cache = init_cache(cfg, 2, 9)
    valid = jnp.ones((2, 9), bool)
    step = jax.jit(apply, static_argnums=0)
    logits, cache, _ = step(cfg, params, tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)), jnp.arange(4),
                             valid, cache=cache, index=0)
    steps = [logits]
    for t in range(4, 9):
        pos = jnp.full((2, 1), t)
        logits, cache, _ = step(cfg, params, tokens[:, t:t + 1], pos, jnp.array([t]), valid, cache=cache, index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padded_batch_generates_like_single_prompts():
    cfg = tiny_config("qwen2_moe")
    params = _random_params(cfg)
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6]]
    batched = generate(cfg, params, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batched[i], generate(cfg, params, [p], max_new_tokens=6)[0])


def test_padding_does_not_change_real_logits():
    cfg = tiny_config("deepseek_v3")
    params = _random_params(cfg)
    tokens = _tokens(cfg, (1, 6))
    padded = np.concatenate([np.zeros((1, 3), np.int32), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 6), bool)], axis=1)
    np.testing.assert_allclose(forward(cfg, params, padded, attention_mask=mask)[:, 3:], forward(cfg, params, tokens),
                               atol=1e-5)


def test_eos_stops_rows_and_pads():
    cfg = tiny_config("mixtral")
    params = _random_params(cfg)
    free = generate(cfg, params, [[1, 2, 3]], max_new_tokens=8)[0]
    eos = int(free[2])
    out = generate(cfg, params, [[1, 2, 3]], max_new_tokens=8, eos_id=eos, pad_id=63)[0]
    stop = list(free).index(eos)
    np.testing.assert_array_equal(out[: stop + 1], free[: stop + 1])
    assert (out[stop + 1:] == 63).all()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    cfg = tiny_config("olmoe")
    params = _random_params(cfg)
    p = [[4, 5, 6]]
    a = generate(cfg, params, p, 8, temperature=1.0, rng=jax.random.PRNGKey(3))
    b = generate(cfg, params, p, 8, temperature=1.0, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a, b)
    greedy = generate(cfg, params, p, 8)
    np.testing.assert_array_equal(generate(cfg, params, p, 8, temperature=0.7, top_p=1e-6), greedy)


def test_sliding_window_changes_only_long_range():
    cfg = tiny_config("mixtral")
    params = _random_params(cfg)
    tokens = _tokens(cfg, (1, 12))
    full = forward(cfg, params, tokens)
    win = forward(cfg.replace(sliding_window=4), params, tokens)
    np.testing.assert_allclose(full[:, :4], win[:, :4], atol=1e-5)
    assert np.abs(full[:, 4:] - win[:, 4:]).max() > 1e-4


def test_capture_shapes():
    cfg = tiny_config("qwen2_moe")
    params = _random_params(cfg)
    logits, aux = forward(cfg, params, _tokens(cfg, (2, 5)), capture=("routing", "activations"))
    assert set(aux) == {cfg.layer_name(i) for i in cfg.moe_layers}
    a = aux["layer_0"]
    assert a["idx_TK"].shape == (2, 5, 2) and a["scores_TE"].shape == (2, 5, 8)
    assert a["act_abs_sum"].shape == (8, 24) and int(a["count"].sum()) == 2 * 5 * 2
    with pytest.raises(ValueError, match="unknown item"):
        forward(cfg, params, _tokens(cfg), capture=("nonsense",))


def test_qwen15_moe_a27b_builds_abstractly_with_14_3b_params():
    hf = {
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "norm_topk_prob": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "decoder_sparse_step": 1,
    }
    cfg = hf_config.from_hf(hf)
    shapes = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    routed = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                 if "experts" in jax.tree_util.keystr(path))
    assert 14.2e9 < total < 14.4e9, total
    assert 12.4e9 < routed < 12.6e9, routed


def test_config_json_round_trip_and_hash():
    cfg = tiny_config("deepseek_v3").with_layer_experts(1, [24, 24, 12, 12, 8, 8, 24, 24])
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert not cfg.is_uniform
    stored, useful = cfg.padded_expert_params(1)
    assert useful == sum(cfg.expert_widths[1]) and stored == useful  # 3 widths, 3 buckets: no padding


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_packed_segments_equal_each_example_alone(family):
    """A packed row (segment_ids) gives every example the logits it gets on its own row."""
    cfg = tiny_config(family)
    params = _random_params(cfg)
    lengths = [5, 3, 4]
    examples = [_tokens(cfg, (1, n), seed=i)[0] for i, n in enumerate(lengths)]
    T = sum(lengths) + 2  # two padding slots at the end
    packed = np.zeros((1, T), np.int32)
    segment_ids = np.zeros((1, T), np.int32)
    start = 0
    for k, ex in enumerate(examples, start=1):
        packed[0, start:start + len(ex)] = ex
        segment_ids[0, start:start + len(ex)] = k
        start += len(ex)
    got = np.asarray(forward(cfg, params, packed, segment_ids=segment_ids))
    start = 0
    for ex in examples:
        alone = np.asarray(forward(cfg, params, ex[None]))[0]
        np.testing.assert_allclose(got[0, start:start + len(ex)], alone, atol=1e-5)
        start += len(ex)
    # Without the segments the later examples would see the earlier ones.
    unmasked = np.asarray(forward(cfg, params, packed))
    assert np.abs(unmasked[0, lengths[0]:sum(lengths)] - got[0, lengths[0]:sum(lengths)]).max() > 1e-3
    with pytest.raises(ValueError, match="segment_ids shape"):
        forward(cfg, params, packed, segment_ids=segment_ids[:, :-1])


def test_segment_positions_restart_at_each_packed_example():
    from moe_jax.model.transformer import segment_positions

    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(jnp.asarray(seg)), [[0, 1, 2, 0, 1, 0, 0, 1]])
