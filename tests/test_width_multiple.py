"""Kernel-friendly widths: `pruning.select(..., width_multiple=N)` keeps every expert width a multiple
of N (or whole), as close to the budget as N allows, and is checked against a brute force over block
counts; the expert-scope export of widths that do not divide evenly then runs in stock transformers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe_jax import hf, pruning
from moe_jax.model import forward
from moe_jax.pruning import PlanError
from tests.conftest import random_dim_scores, random_hf_checkpoint, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def widths_of(plan, layer):
    return [len(plan.dims[layer][e]) for e in plan.experts[layer]]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_layer_scope_blocks_equal_a_brute_force_over_block_counts(ratio):
    """Widths 16, multiple 4: the kept dims of each expert are its best 4k, and the k per expert
    maximise the summed score among all choices keeping the budget's number of blocks."""
    cfg = tiny_config("olmoe", num_layers=1, dense_layers=(), num_experts=4, moe_intermediate_size=16)
    scores = random_dim_scores(cfg)
    plan = pruning.select(cfg, scores, "fisher", "layer", ratio, width_multiple=4)
    s_EF = scores["fisher"][cfg.layer_name(0)]
    n_blocks = round((64 - round(ratio * 64)) / 4)
    prefix = [np.concatenate([[0.0], np.cumsum(np.sort(s_EF[e])[::-1])]) for e in range(4)]
    best = max((ks for ks in itertools.product(range(5), repeat=4) if sum(ks) == n_blocks and min(ks) >= 1),
               key=lambda ks: sum(prefix[e][4 * k] for e, k in enumerate(ks)))
    assert [len(plan.dims[0].get(e, ())) for e in range(4)] == [4 * k for k in best]
    for e in plan.experts[0]:  # each expert's best dims
        assert set(plan.dims[0][e]) == set(np.argsort(-s_EF[e], kind="stable")[:len(plan.dims[0][e])])
    assert plan.meta["width_multiple"] == 4 and plan.meta["dims_removed"] == pytest.approx(1 - 4 * n_blocks / 64)


@pytest.mark.parametrize("scope", ["expert", "layer", "global"])
def test_every_kept_width_is_a_multiple_or_whole_and_the_budget_is_as_close_as_it_allows(scope):
    cfg = tiny_config("qwen3_moe", num_experts=6, moe_intermediate_size=28)  # 28 = 3 x 8 + 4
    for ratio in (0.1, 0.3, 0.5, 0.7):
        plan = pruning.select(cfg, random_dim_scores(cfg, 1), "fisher", scope, ratio, width_multiple=8)
        for layer in cfg.moe_layers:
            assert all(w % 8 == 0 or w == 28 for w in widths_of(plan, layer)), (scope, ratio)
        unit = 28 if scope == "expert" else 28 * 6 * (len(cfg.moe_layers) if scope == "global" else 1)
        assert abs(plan.dims_removed_fraction() - ratio) <= 8 / unit + 1e-9, (scope, ratio)


@pytest.mark.parametrize("multiple, message", [(0, "positive integer"), (-8, "positive integer"),
                                               (2.5, "positive integer"), (True, "positive integer"),
                                               (32, "larger than the width 28 of expert 0")])
def test_bad_width_multiples_are_refused(multiple, message):
    cfg = tiny_config("qwen3_moe", moe_intermediate_size=28)
    with pytest.raises(PlanError, match=message):
        pruning.select(cfg, random_dim_scores(cfg), "fisher", "expert", 0.5, width_multiple=multiple)


def test_a_budget_below_one_block_per_expert_names_the_multiple():
    cfg = tiny_config("qwen3_moe", num_experts=6, moe_intermediate_size=28)
    with pytest.raises(PlanError, match=r"one block of width_multiple=8"):
        pruning.select(cfg, random_dim_scores(cfg), "fisher", "layer", 0.8, width_multiple=8)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_expert_scope_exports_of_uneven_widths_run_in_stock_transformers(tmp_path, family):
    """Widths 20 (Qwen3-MoE) and 28 (OLMoE) at 30% and 50% with multiple 8: stock transformers loads
    the export with no key reported and runs its default expert kernel in float32 (logits equal
    moe_jax's) and bfloat16."""
    random_hf_checkpoint(tmp_path / "orig", family)
    cfg, params = hf.load_pretrained(tmp_path / "orig", dtype="float32")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    for ratio in (0.3, 0.5):
        plan = pruning.select(cfg, random_dim_scores(cfg), "fisher", "expert", ratio, width_multiple=8)
        cfg2, params2 = pruning.apply(cfg, params, plan)
        assert cfg2.is_uniform and cfg2.expert_widths[cfg2.moe_layers[0]][0] % 8 == 0
        out = hf.save_pretrained(cfg2, params2, tmp_path / f"pruned{ratio}")
        ours = np.asarray(forward(cfg2, params2, tokens))
        for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, None)):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            with torch.no_grad():
                theirs = model(torch.tensor(tokens)).logits.float().numpy()
            if atol:
                np.testing.assert_allclose(theirs, ours, atol=atol)
            else:  # bfloat16 runs and follows float32 (relative RMS; bfloat16 can flip a near-tied top-k
                # choice of these random routers, so not to 1e-4) — garbage weights would give ~1
                assert np.isfinite(theirs).all()
                assert np.sqrt(np.mean((theirs - ours) ** 2) / np.mean(ours ** 2)) < 0.15
