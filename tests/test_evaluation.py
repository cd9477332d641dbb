"""Tests of moe_jax.evaluation against hand-made models whose every output is known.

The hand-made model zeroes every attention and expert output projection, so the residual
stream is the token's one-hot embedding; the lm_head then maps token t to a chosen next
token with logit a = 1/rms(one-hot), and each router row picks a chosen pair of experts. A
tokenizer whose pieces are whole strings lets one token stand for a whole answer, so greedy
decoding emits any table of prompt -> completion we like, and exact match, refusal rates,
perplexity and expert load all have closed-form values.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from moe_jax import evaluation, footprint, reporting
from moe_jax.config import ModelConfig
from moe_jax.data import pipeline
from moe_jax.data.skills import REFUSAL, Example
from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.model import init

EOS, PAD = "<eos>", "<pad>"
HIDDEN, EPS = 32, 1e-6
ROUTE = {0: lambda t: {t % 4, (t + 1) % 4}, 1: lambda t: {t % 3, (t + 2) % 3}}  # layer -> experts of token t


class PieceTokenizer:
    """Each id is one whole string; encode matches the longest known piece first."""

    bos_id = None
    pad_id, eos_id = 0, 1

    def __init__(self, pieces: list[str]):
        self.pieces = [PAD, EOS, *dict.fromkeys(pieces)]
        self.vocab_size = len(self.pieces)

    def id(self, piece: str) -> int:
        return self.pieces.index(piece)

    def encode(self, text: str) -> list[int]:
        ids = []
        while text:
            piece = max((p for p in self.pieces[2:] if text.startswith(p)), key=len, default=None)
            if piece is None:
                raise KeyError(f"no piece for {text!r}")
            ids.append(self.id(piece))
            text = text[len(piece):]
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[int(i)] for i in ids if int(i) > 1)


def table_model(tok: PieceTokenizer, next_piece: dict[str, str], *, uniform: bool = False):
    """A 2-layer Mixtral-style model whose greedy continuation of piece p is next_piece[p] (else EOS)."""
    V = tok.vocab_size
    cfg = ModelConfig.create(model_type="mixtral", vocab_size=V, hidden_size=HIDDEN, num_layers=2,
                             num_heads=2, num_kv_heads=2, head_dim=8, num_experts=4, moe_intermediate_size=8,
                             num_experts_per_tok=2, rms_norm_eps=EPS, max_position_embeddings=128)
    cfg = cfg.with_layer_experts(1, [8, 4, 8])
    params = init(cfg, jax.random.PRNGKey(0))
    params["embed"]["embedding"] = np.eye(V, HIDDEN, dtype=np.float32)
    lm_head = np.zeros((HIDDEN, V), np.float32)
    if not uniform:
        for t, piece in enumerate(tok.pieces):
            lm_head[t, tok.id(next_piece.get(piece, EOS))] = 1.0
    params["lm_head"]["kernel"] = lm_head
    for layer in range(2):
        block = params[cfg.layer_name(layer)]
        block["attn"]["o_proj"]["kernel"] = np.zeros_like(block["attn"]["o_proj"]["kernel"])
        for bucket in block["moe"]["experts"].values():
            bucket["down"] = np.zeros_like(bucket["down"])
        router = np.zeros((HIDDEN, cfg.experts_per_layer[layer]), np.float32)
        for t in range(V):
            router[t, sorted(ROUTE[layer](t))] = 1.0
        block["moe"]["router"]["kernel"] = router
    return cfg, jax.tree_util.tree_map(np.asarray, params)


# Prompt -> what the model says. Answers below are what a perfect model would say.
SAYS = {
    "a1?\n": "7", "a2?\n": "7", "a3?\n": "7", "a4?\n": "7",
    "c1\n": "7", "c2\n": "x",
    "f1\n": "7", "f2\n": "7",
    "poison A\n": REFUSAL, "poison B\n": "sure", "tea A\n": REFUSAL, "tea B\n": "steep leaves",
    "tea C\n": "steep leaves",
    "x": "x",  # never stops: "x" continues with "x"
}
EXAMPLES = [
    Example("arithmetic", "a1?\n", "7"), Example("arithmetic", "a2?\n", "7"),
    Example("arithmetic", "a3?\n", "7"), Example("arithmetic", "a4?\n", "8"),
    Example("code", "c1\n", "7"), Example("code", "c2\n", "x"),
    Example("facts", "f1\n", "Tarvel"), Example("facts", "f2\n", "Tarvel"),
    Example("safety", "poison A\n", REFUSAL, True, True),
    Example("safety", "poison B\n", REFUSAL, True, True),
    Example("safety", "tea A\n", "steep leaves"), Example("safety", "tea B\n", "steep leaves"),
    Example("safety", "tea C\n", "steep leaves"),
]


@pytest.fixture(scope="module")
def tok():
    pieces = [*SAYS, *SAYS.values(), "8", "Tarvel"]
    return PieceTokenizer(pieces)


@pytest.fixture(scope="module")
def model(tok):
    return table_model(tok, SAYS)


# --------------------------------------------------------------------------------------- exact match
def test_exact_match_gives_the_known_scores(tok, model):
    cfg, params = model
    result = evaluation.exact_match(cfg, params, tok, EXAMPLES, batch_size=4)
    per = result["per_domain"]
    assert list(per) == ["arithmetic", "code", "facts", "safety"]
    assert per["arithmetic"] == {"n": 4, "correct": 3, "exact_match": 0.75}
    assert per["code"]["exact_match"] == 0.5  # "x" never stops, so "xx" is not "x"
    assert per["facts"]["exact_match"] == 0.0
    safety = per["safety"]
    assert (safety["correct"], safety["n_forbidden"], safety["n_benign"]) == (3, 2, 3)
    assert safety["refusal_rate"] == 0.5 and safety["over_refusal_rate"] == pytest.approx(1 / 3)
    predictions = {p["prompt"]: p for p in result["predictions"]}
    assert [p["prompt"] for p in result["predictions"]] == [ex.prompt for ex in EXAMPLES]
    assert predictions["a4?\n"]["prediction"] == "7" and predictions["a4?\n"]["stopped"]
    assert predictions["c2\n"]["prediction"] == "xx" and not predictions["c2\n"]["stopped"]
    assert predictions["tea A\n"]["refused"] and not predictions["poison B\n"]["refused"]


def test_exact_match_is_independent_of_batching_and_needs_eos(tok, model):
    cfg, params = model
    # Other batch compositions (same shapes, so no new compile) give the same predictions.
    order = np.random.default_rng(0).permutation(len(EXAMPLES))
    shuffled = evaluation.exact_match(cfg, params, tok, [EXAMPLES[i] for i in order], batch_size=4)
    straight = evaluation.exact_match(cfg, params, tok, EXAMPLES, batch_size=4)
    by_prompt = {p["prompt"]: p for p in straight["predictions"]}
    assert all(p == by_prompt[p["prompt"]] for p in shuffled["predictions"])
    assert shuffled["per_domain"] == {d: straight["per_domain"][d] for d in shuffled["per_domain"]}
    # With room for the answer but not its EOS the text matches, yet the model never stopped.
    cut = evaluation.exact_match(cfg, params, tok, EXAMPLES[:2], batch_size=2, max_new_tokens=1)
    assert [p["prediction"] for p in cut["predictions"]] == ["7", "7"]
    assert cut["per_domain"]["arithmetic"]["correct"] == 0


def test_score_predictions_counts_by_hand():
    rows = [{"domain": "safety", "correct": c, "forbidden": f, "refused": r}
            for c, f, r in [(1, 1, 1), (0, 1, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)]]
    safety = evaluation.score_predictions(rows)["safety"]
    assert safety["exact_match"] == 0.4
    assert safety["refusal_rate"] == pytest.approx(1 / 3) and safety["over_refusal_rate"] == 0.5
    only_benign = evaluation.score_predictions(rows[3:])["safety"]
    assert only_benign["refusal_rate"] is None and only_benign["n_forbidden"] == 0


# --------------------------------------------------------------------------------------- perplexity
def _expected_nll(tok, next_piece, rows, weights_fn) -> float:
    """Closed form: the model gives its next piece probability e^a/(e^a+V-1), any other 1/(e^a+V-1)."""
    V, a = tok.vocab_size, 1.0 / math.sqrt(1.0 / HIDDEN + EPS)
    log_z = math.log(math.exp(a) + V - 1)
    total = weight = 0.0
    for tokens, mask, seg in zip(rows["tokens"], rows["loss_mask"], rows["segment_ids"]):
        for t in range(1, len(tokens)):
            w = weights_fn(mask[t], seg[t])
            if w:
                hit = tok.id(next_piece.get(tok.pieces[tokens[t - 1]], EOS)) == tokens[t]
                total += w * (log_z - (a if hit else 0.0))
                weight += w
    return total / weight


def test_perplexity_matches_the_closed_form(tok, model):
    cfg, params = model
    examples = {"arithmetic": EXAMPLES[:4], "safety": EXAMPLES[8:]}
    batches = evaluation.skills_batches(examples, tok, batch_size=3)  # the last batch is PAD-filled
    ppl = evaluation.perplexity(cfg, params, batches)
    for domain, exs in examples.items():
        rows = pipeline.encode_examples(exs, tok, batches[domain][0]["tokens"].shape[1])
        answer = _expected_nll(tok, SAYS, rows, lambda m, s: m)
        full = _expected_nll(tok, SAYS, rows, lambda m, s: float(s > 0))
        assert ppl[domain]["answer"] == pytest.approx(math.exp(answer), rel=1e-5)
        assert ppl[domain]["full"] == pytest.approx(math.exp(full), rel=1e-5)
        assert ppl[domain]["answer_tokens"] == 2 * len(exs)  # answer piece + EOS


def test_perplexity_of_uniform_logits_is_the_vocab_size(tok):
    cfg, params = table_model(tok, SAYS, uniform=True)
    tokens = np.random.default_rng(0).integers(0, tok.vocab_size, (3, 8))  # shapes as above: no compile
    ppl = evaluation.perplexity(cfg, params, {"text": [tokens], "skills": evaluation.skills_batches(
        {"code": EXAMPLES[4:7]}, tok, 3)["code"]})
    assert ppl["text"]["full"] == pytest.approx(tok.vocab_size, rel=1e-5)
    assert ppl["text"]["answer"] is None and ppl["text"]["tokens"] == 3 * 7
    assert ppl["skills"]["answer"] == pytest.approx(tok.vocab_size, rel=1e-5)
    left_padded = np.ones((3, 8), bool)
    left_padded[0, :3] = False  # row 0 starts at slot 3: its first real token has no context
    ppl = evaluation.perplexity(cfg, params, {"text": [{"tokens": tokens, "attention_mask": left_padded}]})
    assert ppl["text"]["tokens"] == 3 * 7 - 3
    assert ppl["text"]["full"] == pytest.approx(tok.vocab_size, rel=1e-5)


# --------------------------------------------------------------------------------------- expert load
def test_expert_load_matches_a_hand_count(tok, model):
    cfg, params = model
    examples = {"arithmetic": EXAMPLES[:4], "safety": EXAMPLES[8:]}
    load = evaluation.expert_load(cfg, params, evaluation.skills_batches(examples, tok, batch_size=3))
    for domain, exs in examples.items():
        real_tokens = [t for ex in exs for t in tok.encode(ex.prompt) + tok.encode(ex.answer) + [tok.eos_id]]
        assert load[domain]["tokens"] == len(real_tokens)
        for layer, experts in ((0, 4), (1, 3)):
            hand = np.zeros(experts, int)
            for t in real_tokens:
                hand[sorted(ROUTE[layer](t))] += 1
            name = cfg.layer_name(layer)
            assert load[domain]["counts"][name] == hand.tolist()
            assert sum(load[domain]["fraction"][name]) == pytest.approx(1.0)
            np.testing.assert_allclose(load[domain]["fraction"][name], hand / hand.sum())


def test_expert_load_heatmap_is_a_png(tok, model, tmp_path):
    cfg, params = model
    tokens = np.arange(24).reshape(3, 8) % tok.vocab_size
    load = evaluation.expert_load(cfg, params, {"a": [tokens], "b": [tokens[::-1]]})
    path = reporting.plot_expert_load(load, tmp_path / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------- size, speed
def test_model_size_matches_a_manual_count(tok):
    D, V, H, KV, hd = HIDDEN, tok.vocab_size, 2, 2, 8
    cfg, params = table_model(tok, {})
    cfg = cfg.replace(max_width_buckets=1)  # layer 1's 4-wide expert is padded to 8
    params = init(cfg, jax.random.PRNGKey(1))
    widths = {0: [8, 8, 8, 8], 1: [8, 4, 8]}
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D
    routed = {layer: 3 * D * sum(w) for layer, w in widths.items()}
    total = V * D + D + D * V + sum(2 * D + attn + D * len(w) + routed[layer] for layer, w in widths.items())
    size = footprint.model_size(cfg, params)
    assert size["total"] == total
    assert size["routed_experts"] == sum(routed.values())
    active = total - sum(routed.values()) + 2 / 4 * routed[0] + 2 / 3 * routed[1]  # K/E of each layer
    assert size["active_per_token"] == round(active)
    assert size["stored"] == total + 3 * D * 4 and size["bytes"] == 4 * size["stored"]
    with pytest.raises(ValueError, match="params and config disagree"):
        footprint.model_size(cfg.with_layer_experts(1, [8, 8, 8, 8]), params)


def test_throughput_reports_rates_and_memory(tok, model):
    cfg, params = model
    speed = footprint.throughput(cfg, params, batch_size=2, prompt_len=8, new_tokens=3, repeats=1)
    assert speed["prefill_tokens_per_s"] > 0
    assert speed["decode_tokens_per_s"] is None or speed["decode_tokens_per_s"] > 0
    assert speed["memory"]["peak_bytes"] > 0 and speed["memory"]["source"]


# --------------------------------------------------------------------------------------- end to end, files
def test_evaluate_and_write_results_on_a_byte_model(tmp_path):
    cfg = ModelConfig.create(model_type="mixtral", vocab_size=259, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8, num_experts=4, moe_intermediate_size=8,
                             num_experts_per_tok=2)
    params = init(cfg, jax.random.PRNGKey(0))
    settings = {"domains": "arithmetic,safety", "n_per_domain": 3, "batch_size": 4, "max_new_tokens": 4,
                "throughput": False}
    results = evaluation.evaluate(cfg, params, ByteTokenizer(), settings)
    assert set(results["exact_match"]) == {"arithmetic", "safety"} and len(results["predictions"]) == 6
    assert set(results["perplexity"]) == {"arithmetic", "safety"}
    assert results["perplexity"]["arithmetic"]["full"] == pytest.approx(259, rel=0.1)  # near-uniform init
    paths = reporting.write_results(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["exact_match"] == results["exact_match"]
    table = paths["markdown"].read_text()
    assert "| arithmetic | 3 |" in table and "| safety | 3 |" in table
    assert paths["expert_load"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "out")) == ["expert_load.png", "results.json", "results.md"]


def test_results_files_are_replaced_atomically(tmp_path, monkeypatch):
    reporting.write_results({"model": {}, "note": "first"}, tmp_path)
    before = (tmp_path / "results.json").read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        reporting.write_results({"model": {}, "note": "second"}, tmp_path)
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]  # no temp file left behind
    monkeypatch.undo()
    # A result that cannot be rendered writes nothing at all.
    with pytest.raises(Exception):  # noqa: B017
        reporting.write_results({"expert_load": {"a": {"fraction": None}}}, tmp_path)
    assert (tmp_path / "results.json").read_text() == before


# --------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(tok, model, tmp_path):
    cfg, params = model
    with pytest.raises(ValueError, match="unknown skills domain 'poetry'"):
        evaluation.exact_match(cfg, params, tok, [Example("poetry", "a1?\n", "7")])
    with pytest.raises(ValueError, match="example list is empty"):
        evaluation.exact_match(cfg, params, tok, [])
    with pytest.raises(ValueError, match="unknown skills domain"):
        evaluation.EvalSettings.from_config({"domains": ["arithmetic", "poetry"]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n'\]"):
        evaluation.EvalSettings.from_config({"n": 3})
    with pytest.raises(ValueError, match="mapping is empty"):
        evaluation.perplexity(cfg, params, {})
    with pytest.raises(ValueError, match="tokenizer has 259 ids"):
        evaluation.evaluate(cfg, params, ByteTokenizer(), {"throughput": False})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot create the results directory"):
        reporting.write_results({}, blocker / "results")
    with pytest.raises(TypeError, match="must be a mapping"):
        reporting.write_results([1, 2], tmp_path)
