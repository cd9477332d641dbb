"""Tests of moe_jax.data: skills generator, byte tokenizer (+ HF twin), load_texts, packing."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

import numpy as np
import pytest

from moe_jax.data import pipeline, skills
from moe_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

N = 400


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[list[skills.Example], list[skills.Example]]]:
    return {d: (skills.generate(d, "train", N, seed=0), skills.generate(d, "eval", N // 2, seed=0))
            for d in skills.DOMAINS}


# ---------------------------------------------------------------------------------------------
# generator


@pytest.mark.parametrize("domain", skills.DOMAINS)
def test_generate_is_deterministic_and_seeded(domain):
    a = skills.generate(domain, "train", 50, seed=3)
    assert a == skills.generate(domain, "train", 50, seed=3)
    assert a != skills.generate(domain, "train", 50, seed=4)
    assert len(a) == 50 and all(isinstance(e, skills.Example) and e.domain == domain for e in a)


@pytest.mark.parametrize("domain", skills.DOMAINS)
def test_train_and_eval_prompts_are_disjoint(domain, splits):
    train, evals = splits[domain]
    more_train = skills.generate(domain, "train", 2000, seed=1)
    assert not {e.prompt for e in train + more_train} & {e.prompt for e in evals}


@pytest.mark.parametrize("domain", skills.DOMAINS)
def test_prompts_and_answers_are_short_and_well_formed(domain, splits):
    for ex in splits[domain][0] + splits[domain][1]:
        assert ex.prompt.endswith(skills.SEP) and ex.prompt.count(skills.SEP) == 1
        assert 0 < len(ex.answer) <= 24 and skills.SEP not in ex.answer
        assert len(ex.prompt) <= 52
        assert ex.text == ex.prompt + ex.answer
        assert ex.text.isascii()


def test_every_fact_is_trained_and_eval_phrasing_is_new():
    kb = skills.knowledge_base()
    assert len(kb) == 3 * skills.N_ENTITIES and len({(f.entity, f.attribute) for f in kb}) == len(kb)
    train = skills.generate("facts", "train", len(kb) * (skills.N_PHRASINGS - 1), seed=0)
    evals = skills.generate("facts", "eval", len(kb), seed=0)
    train_prompts, eval_prompts = {e.prompt for e in train}, {e.prompt for e in evals}
    for fact in kb:
        phrasings = [skills.fact_example(fact, p) for p in range(skills.N_PHRASINGS)]
        held = phrasings[skills.held_out_phrasing(fact)]
        trained = [e for e in phrasings if e.prompt in train_prompts]
        assert len(trained) == skills.N_PHRASINGS - 1, fact
        assert held.prompt in eval_prompts and held.prompt not in train_prompts
        assert all(e.answer == fact.value for e in phrasings)
    # every phrasing template is seen in training (for other facts), so held-out ones are learnable
    templates = {re.sub(r"[A-Z][a-z]+('s)?", "E", e.prompt) for e in train}
    assert {re.sub(r"[A-Z][a-z]+('s)?", "E", e.prompt) for e in evals} <= templates


_ARITH = re.compile(r"(\d+) \w+[.,] (?:\w+ )?(\w+) (\d+)(?:,| and) (\w+) (\d+)\.")
_SIGNS = {"gets": "+", "buys": "+", "finds": "+", "loses": "-", "sells": "-", "gives": "-"}


def test_arithmetic_answers(splits):
    for ex in splits["arithmetic"][0] + splits["arithmetic"][1]:
        a, v1, b, v2, c = _ARITH.search(ex.prompt).groups()
        first = eval(f"{a}{_SIGNS[v1]}{b}")
        final = eval(f"{a}{_SIGNS[v1]}{b}{_SIGNS[v2]}{c}")
        assert ex.answer == f"{a}{_SIGNS[v1]}{b}={first},{first}{_SIGNS[v2]}{c}={final}", ex
        assert skills.final_answer(ex.answer) == str(final) and 0 <= first <= 99 and 0 <= final <= 99


def test_code_answers(splits):
    closers = {"(": ")", "[": "]", "{": "}", "<": ">"}
    kinds = set()
    for ex in splits["code"][0] + splits["code"][1]:
        body = ex.prompt.rstrip(skills.SEP)
        if body.startswith("close: "):
            kinds.add("brackets")
            text = body.removeprefix("close: ") + ex.answer
            while any(o + c in text for o, c in closers.items()):  # balanced iff it reduces to ""
                for o, c in closers.items():
                    text = text.replace(o + c, "")
            assert text == "" and set(ex.answer) <= set(closers.values()), ex
        else:
            kinds.add("trace")
            out, env, values = io.StringIO(), {}, []
            with contextlib.redirect_stdout(out):
                for statement in body.split(";"):  # Python runs it, recording the variable after each line
                    exec(statement, env)
                    values += [v for k, v in env.items() if k != "__builtins__"]
            updates = body.split(";")[1:-1]  # "x+=5"
            assert 2 <= len(updates) <= 3 and all(0 <= v <= 99 for v in values), ex
            trace = [f"{a}{u[1]}{u[3:]}={b}" for a, u, b in zip(values, updates, values[1:])]
            assert ex.answer == ",".join(trace) and out.getvalue().strip() == skills.final_answer(ex.answer), ex
    assert kinds == {"brackets", "trace"}


_PLURALS = {"dogs", "cats", "birds", "foxes", "horses", "girls", "mice", "children", "men", "wolves"}
_INFLECT = {"be": ("is", "are"), "have": ("has", "have"), "go": ("goes", "go"), "wash": ("washes", "wash"),
            "cry": ("cries", "cry")}


def test_language_answers(splits):
    for ex in splits["language"][0] + splits["language"][1]:
        words = ex.prompt.split()
        head = next(w for w in words[1:] if w not in {"old", "big", "red", "shy"})
        lemma = words[-1].strip("[]")
        singular, plural = _INFLECT.get(lemma, (lemma + "s", lemma))
        assert ex.answer == (plural if head in _PLURALS else singular), ex


def test_safety_refuses_exactly_the_forbidden(splits):
    for ex in splits["safety"][0] + splits["safety"][1]:
        forbidden = ex.prompt.rstrip("?.\n").split()[-1] in {"venom", "toxin", "poison"}
        assert ex.forbidden == ex.refuse == forbidden, ex
        assert (ex.answer == skills.REFUSAL) == forbidden and skills.is_refusal(ex.answer) == forbidden
    evals = splits["safety"][1]
    assert 0.3 < np.mean([e.forbidden for e in evals]) < 0.7
    # look-alikes: the same name appears in forbidden and benign requests
    names = lambda f: {e.prompt.split()[-2] for e in evals if e.forbidden == f}
    assert names(True) & names(False)
    for domain in ("arithmetic", "facts", "code", "language"):
        assert not any(e.refuse or e.forbidden for e in splits[domain][0])


def test_train_mixture_and_eval_set():
    mix = skills.train_mixture(20, seed=0)
    assert len(mix) == 100 and mix == skills.train_mixture(20, seed=0)
    assert {e.domain for e in mix} == set(skills.DOMAINS)
    assert [e.domain for e in mix[:10]] != [e.domain for e in sorted(mix[:10], key=lambda e: e.domain)]
    assert skills.eval_set("code", 10, seed=2) == skills.generate("code", "eval", 10, seed=2)
    assert len({e.prompt for e in skills.eval_set("arithmetic", 200)}) == 200


def test_unknown_domain_and_split_are_named():
    with pytest.raises(ValueError, match=r"'poetry'.*arithmetic, facts, code, language, safety"):
        skills.generate("poetry", "train", 1)
    with pytest.raises(ValueError, match="'test'"):
        skills.generate("code", "test", 1)
    with pytest.raises(ValueError, match="'poetry'"):
        skills.eval_set("poetry", 1)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def test_byte_tokenizer_round_trips_every_byte():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, PAD_ID, BOS_ID, EOS_ID)
    all_bytes = bytes(range(256))
    assert tok.encode_bytes(all_bytes) == list(range(256))
    assert tok.decode_bytes(tok.encode_bytes(all_bytes)) == all_bytes
    rng = random.Random(0)
    for _ in range(50):
        data = _random_bytes(rng, rng.randrange(64))
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
        text = data.decode("utf-8", "surrogateescape")  # invalid UTF-8 survives the str API too
        assert tok.encode(text) == list(data)
        assert tok.decode(tok.encode(text), errors="surrogateescape") == text
    for text in ["", "hello", "héllo wörld €𝄞 日本", "".join(map(chr, range(1, 1000)))]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, EOS_ID, 105, PAD_ID, BOS_ID]) == "hi"  # specials are dropped
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def test_hf_tokenizer_twin_gives_identical_ids(tmp_path):
    tok = ByteTokenizer()
    hf = tok.to_hf_tokenizer()
    assert hf.get_vocab_size() == tok.vocab_size
    rng = random.Random(1)
    texts = ["", " lead  space", "tab\there\nnew line", bytes(range(256)).decode("latin-1"),
             *(''.join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(40))) for _ in range(30)),
             *(e.text for e in skills.train_mixture(5, seed=0))]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (259, PAD_ID, BOS_ID, EOS_ID)
    for text in texts:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text) + [EOS_ID]) == text
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# load_texts


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import pandas as pd

    _quiet_datasets()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "a.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"json row {i}", "body": f"body {i}", "n": i}) + "\n")
    (root / "x.txt").write_text("line one\n\nline two\n")
    (root / "y.txt").write_text("line three\n")
    pd.DataFrame({"content": ["parquet one", "parquet two"], "k": [1, 2]}).to_parquet(root / "x.parquet")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    return root


def test_load_texts_skills():
    ds = pipeline.load_texts("skills:train", n_per_domain=6)
    assert len(ds) == 30
    assert {"text", "prompt", "answer", "domain", "refuse", "forbidden"} <= set(ds.column_names)
    assert pipeline.examples_from_dataset(ds) == skills.train_mixture(6, seed=0)
    ds = pipeline.load_texts("skills:eval:arithmetic,safety", n_per_domain=4, seed=2)
    assert ds["domain"] == ["arithmetic"] * 4 + ["safety"] * 4
    assert ds["text"][0] == skills.eval_set("arithmetic", 4, seed=2)[0].text


def test_load_texts_files(files):
    cache = str(files / "cache")
    ds = pipeline.load_texts(f"json:{files}/a.jsonl", cache_dir=cache)
    assert ds["text"] == [f"json row {i}" for i in range(5)]
    assert pipeline.load_texts(f"json:{files}/a.jsonl", column="body", cache_dir=cache)["text"][0] == "body 0"
    ds = pipeline.load_texts(f"text:{files}/*.txt", cache_dir=cache)
    assert ds["text"] == ["line one", "line two", "line three"]  # blank lines dropped
    ds = pipeline.load_texts(f"parquet:{files}/x.parquet", column="content", cache_dir=cache)
    assert ds["text"] == ["parquet one", "parquet two"]


@pytest.mark.parametrize("spec, kwargs, error, culprit", [
    ("csv:/tmp/a.csv", {}, ValueError, "csv:/tmp/a.csv"),
    ("nocolon", {}, ValueError, "nocolon"),
    ("skills:test", {}, ValueError, "'test'"),
    ("skills:train:poetry", {}, ValueError, "'poetry'"),
    ("json:{root}/missing.jsonl", {}, FileNotFoundError, "missing.jsonl"),
    ("json:{root}/empty.jsonl", {}, ValueError, "empty.jsonl"),
    ("json:{root}/blank.jsonl", {}, ValueError, "blank.jsonl"),
    ("json:{root}/a.jsonl", {"column": "title"}, ValueError, "'title'"),
    ("json:{root}/a.jsonl", {"column": "n"}, ValueError, "'n'"),
    ("skills:train", {"n_per_domain": 0}, ValueError, "skills:train"),
])
def test_load_texts_errors_name_the_culprit(files, spec, kwargs, error, culprit):
    with pytest.raises(error, match=re.escape(culprit)):
        pipeline.load_texts(spec.format(root=files), cache_dir=str(files / "cache"), **kwargs)


# ---------------------------------------------------------------------------------------------
# packing, batching, masks


def test_pack_concatenates_with_eos():
    tok = ByteTokenizer()
    rows = pipeline.pack(["ab", "cde", "f"], tok, seq_len=4)
    assert rows.dtype == np.int32 and rows.shape == (2, 4)
    assert rows.ravel().tolist() == [97, 98, EOS_ID, 99, 100, 101, EOS_ID, 102]  # tail [EOS] dropped
    padded = pipeline.pack(["ab", "cde", "f"], tok, seq_len=4, drop_remainder=False)
    assert padded.shape == (3, 4) and padded[2].tolist() == [EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    ds = pipeline.load_texts("skills:train", n_per_domain=10)
    assert (pipeline.pack(ds, tok, 32) == pipeline.pack(list(ds["text"]), tok, 32)).all()
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.pack(["a"], tok, seq_len=64)


def test_batches_shapes_and_determinism():
    rows = np.arange(10 * 3, dtype=np.int32).reshape(10, 3)
    first = list(pipeline.batches(rows, 4, seed=0, epochs=2))
    assert len(first) == 4 and all(b.shape == (4, 3) and b.dtype == np.int32 for b in first)
    again = list(pipeline.batches(rows, 4, seed=0, epochs=2))
    assert all((a == b).all() for a, b in zip(first, again))
    other = list(pipeline.batches(rows, 4, seed=1, epochs=2))
    assert any((a != b).any() for a, b in zip(first, other))
    seen = np.concatenate(first[:2])[:, 0] // 3  # one epoch: 8 distinct rows out of 10
    assert len(set(seen.tolist())) == 8
    assert not np.array_equal(first[0], first[2])  # a fresh permutation each epoch
    forever = pipeline.batches(rows, 5, seed=0, epochs=None)
    assert len([next(forever) for _ in range(7)]) == 7
    data = {"tokens": rows, "loss_mask": rows.astype(np.float32)}
    batch = next(pipeline.batches(data, 4, seed=0))
    assert set(batch) == {"tokens", "loss_mask"} and (batch["tokens"] == batch["loss_mask"]).all()
    with pytest.raises(ValueError, match="batch_size"):
        next(pipeline.batches(rows, 11))


def test_encode_examples_masks_cover_exactly_the_answer():
    tok = ByteTokenizer()
    examples = skills.train_mixture(8, seed=0)
    enc = pipeline.encode_examples(examples, tok, seq_len=80)
    tokens, mask = enc["tokens"], enc["loss_mask"]
    assert tokens.shape == mask.shape == (40, 80) and tokens.dtype == np.int32
    for row, m, ex in zip(tokens, mask, examples):
        ids = [BOS_ID] + tok.encode(ex.prompt) + tok.encode(ex.answer) + [EOS_ID]
        assert row[:len(ids)].tolist() == ids and (row[len(ids):] == PAD_ID).all()
        assert tok.decode(row[m == 1]) == ex.answer and row[m == 1][-1] == EOS_ID
        assert m.sum() == len(ex.answer) + 1 and set(np.unique(m)) <= {0.0, 1.0}
        assert pipeline.prompt_ids(ex, tok) == ids[:len(ids) - len(ex.answer) - 1]
    full = pipeline.encode_examples(examples, tok, seq_len=80, prompt_weight=1.0)["loss_mask"]
    assert (full == ((tokens != PAD_ID) & (tokens != BOS_ID))).all()
    packed = pipeline.encode_examples(examples, tok, seq_len=128, pack=True)
    assert len(packed["tokens"]) < len(examples)
    assert packed["loss_mask"].sum() == mask.sum()
    real = packed["tokens"][packed["segment_ids"] > 0]
    assert sorted(real.tolist()) == sorted(tokens[tokens != PAD_ID].tolist())
    with pytest.raises(ValueError, match="seq_len=16"):
        pipeline.encode_examples(examples, tok, seq_len=16)


def test_completion_text_and_exact_match():
    tok = ByteTokenizer()
    ex = skills.eval_set("arithmetic", 1)[0]
    generated = tok.encode(ex.answer) + [EOS_ID] + tok.encode("junk")
    assert skills.exact_match(ex, pipeline.completion_text(generated, tok))
    assert not skills.exact_match(ex, pipeline.completion_text(tok.encode(ex.answer + "0"), tok))
