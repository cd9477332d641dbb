"""The loader matrix: every family x every kind of pruned export, loaded by moe_jax, by transformers
(stock classes for uniform exports, the shipped remote code for non-uniform ones) and by lm-eval's
HF backend, each checked against moe_jax's compacted model.

Per cell: moe_jax reads the export back to the same weights; transformers reports no missing,
unexpected or mismatched key, its float32 logits equal moe_jax's within 1e-4, and its 16 greedy
tokens are what moe_jax's argmax picks at every step (teacher-forced on transformers' output, which
is greedy decoding's definition and needs one moe_jax compilation per cell, not sixteen); lm-eval's
HFLM scores the same requests as MoeJaxLM within 1e-4 with the same is_greedy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from moe_jax import hf, pruning  # noqa: E402
from moe_jax.harness import MoeJaxLM  # noqa: E402
from moe_jax.model import forward  # noqa: E402
from tests.conftest import random_dim_scores, scaled_params, tiny_config, write_bpe_tokenizer  # noqa: E402

KEEP = lambda p, a: a  # noqa: E731  place=KEEP keeps numpy leaves
FAMILIES = {  # tiny_config overrides: 8 experts of width 24; DeepSeek in two router groups of four
    "qwen2_moe": dict(num_layers=3, dense_layers=(1,)), "mixtral": {}, "qwen3_moe": {}, "olmoe": {},
    "deepseek_v3": dict(num_layers=3, n_group=2, topk_group=1),
    "deepseek_v2": dict(num_layers=3, n_group=2, topk_group=1),
}
# kind -> per MoE layer (index among the MoE layers): kept experts and their widths (None = whole)
KINDS = {
    "expert_removal": [{e: None for e in (0, 2, 4, 6)}, {e: None for e in (1, 3, 5, 7)}],
    "uneven_widths": [{e: 8 + 2 * e for e in range(8)}, {e: 24 - e for e in range(8)}],
    "uneven_counts": [{e: None for e in (0, 1, 2, 4, 5, 6)}, {e: None for e in (0, 3, 5, 7)}],
    "both": [{0: 24, 1: 5, 2: 13, 4: 9, 5: 20, 6: 16}, {0: 11, 3: 24, 5: 7, 7: 18}],
}
REQUESTS = [("The quick brown fox", " jumps over the lazy dog"), ("what is two plus", " three"),
            ("", "Experts route tokens"), ("A router picks the top two", " experts for each token.")]


def pruned(family: str, kind: str):
    """(cfg, params) of a tiny `family` model compacted as `kind` says."""
    cfg = tiny_config(family, vocab_size=128, **FAMILIES[family])
    params = scaled_params(cfg)
    rng = np.random.default_rng(1)
    if kind == "expert_widths":  # one width, a multiple of 8: what stock kernels run
        plan = pruning.select(cfg, random_dim_scores(cfg), "fisher", "expert", 0.4, width_multiple=8)
    else:
        keep = dict(zip(cfg.moe_layers, KINDS[kind]))
        plan = pruning.PruningPlan(
            method="test", scope="layer", ratio=0.5, source_widths={i: cfg.expert_widths[i] for i in cfg.moe_layers},
            experts={i: tuple(sorted(keep[i])) for i in cfg.moe_layers},
            dims={i: {e: tuple(sorted(rng.choice(24, w or 24, replace=False).tolist())) for e, w in keep[i].items()}
                  for i in cfg.moe_layers})
    return pruning.apply(cfg, params, plan)


def flat(tree, prefix=()):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, prefix + (key,)).items()}
    return {prefix: np.asarray(tree)}


@pytest.mark.parametrize("kind", ["expert_widths", *KINDS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_loader_runs_the_export_as_moe_jax_does(family, kind, tmp_path):
    cfg, params = pruned(family, kind)
    assert cfg.is_uniform == (kind in ("expert_widths", "expert_removal"))
    # Stock classes for uniform exports; remote code for non-uniform ones and for DeepSeek whose
    # routed width no longer divides its shared width (stock fields cannot say that shared width).
    uniform = cfg.is_uniform and not (family.startswith("deepseek") and cfg.shared_expert_width % cfg.max_width(
        cfg.moe_layers[0]))
    out = hf.save_pretrained(cfg, params, tmp_path / "out")
    write_bpe_tokenizer(out, add_bos=family.startswith("deepseek") or family == "mixtral")
    # moe_jax reads it back
    cfg2, params2 = hf.load_pretrained(out, place=KEEP)
    assert dataclasses.replace(cfg2, hf_extra=()) == cfg  # hf_extra: config.json keys kept for re-export
    ours_flat, back = flat(params), flat(params2)
    assert set(back) == set(ours_flat) and all(np.array_equal(back[k], ours_flat[k]) for k in back)
    # transformers: stock classes for uniform exports, the shipped remote code otherwise
    model, info = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=not uniform,
                                                         output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert (model.config.model_type == cfg.model_type) == uniform
    prompt = np.random.RandomState(0).randint(3, 128, (1, 8))
    with torch.no_grad():
        greedy = model.generate(torch.tensor(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                pad_token_id=0, eos_token_id=None).numpy()
        theirs = model(torch.tensor(greedy)).logits.numpy()
    ours = np.asarray(forward(cfg, params, greedy))
    assert np.abs(theirs - ours).max() <= 1e-4
    assert np.array_equal(ours[0, 7:-1].argmax(-1), greedy[0, 8:])  # moe_jax's greedy choice at every step
    # lm-eval's own HF backend scores the same requests as MoeJaxLM
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    hflm = HFLM(pretrained=str(out), trust_remote_code=not uniform, dtype="float32", batch_size=4, device="cpu")
    theirs_ll = hflm.loglikelihood(requests, disable_tqdm=True)
    ours_ll = MoeJaxLM(cfg, params, MoeJaxLM.load_tokenizer(out), batch_size=4).loglikelihood(requests,
                                                                                          disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(theirs_ll, ours_ll):
        assert abs(a - b) <= 1e-4 and greedy_a == greedy_b
