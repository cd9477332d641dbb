"""The built-in generic text (moe_jax.data.prose): extraction, passages, splits, and its place in training rows."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from moe_jax import train
from moe_jax.data import pipeline, prose, training_rows
from moe_jax.data.tokenizer import ByteTokenizer

PROSE = "This module provides helpers. " * 12  # 360 characters of prose
MODULE = f'"""{PROSE}"""\n\n\ndef f():\n    """short"""\n\n\nclass C:\n    """{PROSE}"""\n\n\ndef g():\n' \
         '    """' + "x = [1, 2, 3]; y = {4: 5}; " * 20 + '"""\n'


def test_extract_keeps_long_prose_docstrings_once(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text(MODULE.replace("helpers", "tests"))
    (tmp_path / "broken.py").write_text("def (:\n")
    docs = prose.extract(tmp_path)
    # The class repeats the module's text (deduplicated); the one-liner, the code-heavy
    # docstring, the test directory and the unparsable file give nothing.
    assert docs == [{"source": "pkg.mod", "text": PROSE.strip()}]


def test_build_writes_a_corpus_that_documents_reads(tmp_path):
    (tmp_path / "mod.py").write_text(MODULE)
    out = tmp_path / "corpus.json.gz"
    built = prose.build(out, stdlib=tmp_path)
    assert prose.documents(out) == tuple(built["docs"]) and len(built["docs"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json.gz", "mod.py"]  # no temporary left
    first = out.read_bytes()
    prose.build(out, stdlib=tmp_path)
    assert out.read_bytes() == first  # rebuilding gives the same bytes
    (tmp_path / "bad.json.gz").write_bytes(gzip.compress(b'{"docs": 3}'))
    with pytest.raises(ValueError, match="bad.json.gz: expected a JSON object with a 'docs' list"):
        prose.documents(tmp_path / "bad.json.gz")
    (tmp_path / "junk.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="junk.json.gz: not a prose corpus"):
        prose.documents(tmp_path / "junk.json.gz")


@pytest.mark.parametrize("max_chars", [16, 60, 240])
def test_chunk_cuts_within_the_limit_and_loses_nothing(max_chars):
    text = " ".join(d["text"] for d in prose.documents()[:20])
    pieces = prose.chunk(text, max_chars)
    assert all(0 < len(p) <= max_chars for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    if max_chars == 240:  # most cuts land on a sentence end
        ends = sum(p[-1] in ".!?:;" for p in pieces[:-1])
        assert ends > 0.5 * (len(pieces) - 1)
    with pytest.raises(ValueError, match="max_chars=8"):
        prose.chunk(text, 8)


def test_committed_corpus_splits_by_source_and_is_ascii():
    docs = prose.documents()
    assert len(docs) > 1000
    raw = json.loads(gzip.decompress(prose.CORPUS.read_bytes()))
    assert raw["licence"].startswith("PSF-2.0") and (prose.CORPUS.parent / "PSF_LICENSE.txt").is_file()
    splits = {prose.split_of(d["source"]) for d in docs}
    assert splits == {"train", "eval"}
    held_out = [d for d in docs if prose.split_of(d["source"]) == "eval"]
    assert 0.05 < len(held_out) / len(docs) < 0.15
    for split in prose.SPLITS:
        passages = prose.passages(split)
        assert passages and all(p.isascii() and 0 < len(p) <= 240 for p in passages)
    assert not set(prose.passages("train")) & set(prose.passages("eval")) - {""}
    # The same source always lands in the same split (a stable hash, not Python's hash()).
    digest = int.from_bytes(hashlib.blake2b(b"os", digest_size=8).digest(), "little")
    assert prose.split_of("os") == ("eval" if digest % prose.HOLDOUT_MODULUS == 0 else "train")


def test_load_texts_prose_spec():
    ds = pipeline.load_texts("prose:eval")
    assert ds["text"] == prose.passages("eval")
    with pytest.raises(ValueError, match="unknown prose split 'dev'"):
        pipeline.load_texts("prose:dev")


def test_training_rows_mix_prose_with_every_token_in_the_loss():
    config = train.default_config()
    config.data.update(seq_len=128, pack=True, prose_passages=30, prose_max_chars=100, eval_examples_per_domain=4)
    config.data.examples_per_domain.update({d: 10 for d in config.data.examples_per_domain})
    data = training_rows.load_skills(config, ByteTokenizer())
    tok = ByteTokenizer()
    texts = {p for p in prose.passages("train", 100)}
    found = 0
    for tokens, mask, seg in zip(data.train["tokens"], data.train["loss_mask"], data.train["segment_ids"]):
        for k in range(1, seg.max() + 1):
            ids, weights = tokens[seg == k], mask[seg == k]
            text = tok.decode(ids[1:-1])  # without BOS and EOS
            if text in texts:
                found += 1
                np.testing.assert_array_equal(weights, [0.0] + [1.0] * (len(ids) - 1))
    assert found == 30
    assert list(dict.fromkeys(data.eval_domain))[-1] == "prose"
    assert (data.eval_domain == "prose").sum() >= 1
    config.data.prose_max_chars = 127
    with pytest.raises(train.TrainError, match=r"config\.data\.prose_max_chars=127: must be in \[16, .*126\]"):
        train.validate_config(config)
