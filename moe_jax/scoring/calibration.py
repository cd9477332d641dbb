"""Calibration batches from any `load_texts` source, in the shape `collect` reads.

Skills sources become supervised rows, one example per row (so a per-row Fisher is a
per-example Fisher), with the loss on every token by default; any other text is concatenated
and cut into rows of `seq_len + 1` tokens, loss on every token.

Why not the answer only: on a model that has learnt a skill, the answer loss is ~0, and so is
its gradient, so an answer-only Fisher calls the best-learnt skills unimportant. On the
built-in model it removed safety at 75% global (refusals 0.44-0.60) where the full-sequence
Fisher kept it at 1.00 (experiments/fisher_moe.py reports both).
"""

from __future__ import annotations

import numpy as np

from moe_jax.data import pipeline
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.scoring.statistics import ScoringError


def calibration_batches(spec: str, tokenizer: Tokenizer, *, n_per_domain: int = 64, seq_len: int = 64,
                        batch_size: int = 8, seed: int = 0, answer_only: bool = False, column: str = "text",
                        max_rows: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows (the last one may be shorter), in a fixed order.

    spec: e.g. "skills:train" (never the eval split for scores that choose what to prune),
    "skills:train:code", "json:/data/calib.jsonl", "hf:wikitext/wikitext-2-raw-v1:train".
    max_rows: keep at most this many rows (0: all).
    """
    if batch_size < 1 or seq_len < 2:
        raise ScoringError(f"calibration: batch_size={batch_size} and seq_len={seq_len} must be >= 1 and >= 2")
    try:
        ds = pipeline.load_texts(spec, column=column, n_per_domain=n_per_domain, seed=seed)
    except ValueError as err:
        raise ScoringError(f"calibration data: {err}") from None
    if "prompt" in ds.column_names:
        examples = pipeline.examples_from_dataset(ds)
        try:
            rows = pipeline.encode_examples(examples, tokenizer, seq_len, prompt_weight=0.0 if answer_only else 1.0)
        except ValueError as err:
            raise ScoringError(f"calibration data {spec!r}: {err} (raise calibration seq_len)") from None
    else:
        try:
            tokens = pipeline.pack(ds, tokenizer, seq_len + 1)
        except ValueError as err:
            raise ScoringError(f"calibration data {spec!r}: {err}") from None
        rows = {"tokens": tokens}
    n = len(rows["tokens"]) if not max_rows else min(max_rows, len(rows["tokens"]))
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def calibration_batches_from_config(c, tokenizer: Tokenizer, **overrides) -> list[dict[str, np.ndarray]]:
    """`calibration_batches` from a launcher's ``config.calibration`` (data, n_per_domain, seq_len,
    batch_size, seed, max_rows and optionally answer_only); `overrides` win."""
    c = dict(c.to_dict() if hasattr(c, "to_dict") else c)
    kwargs = {k: c[k] for k in ("n_per_domain", "seq_len", "batch_size", "seed", "max_rows", "answer_only") if k in c}
    kwargs.update(overrides)
    return calibration_batches(c["data"], tokenizer, **kwargs)


def describe(c) -> str:
    """A launcher's ``config.calibration`` in a report's words: "skills:train (64/domain)", or for
    text "prose:train (320 rows of 64 tokens)"."""
    c = dict(c.to_dict() if hasattr(c, "to_dict") else c)
    if c["data"].startswith("skills:"):
        return f"{c['data']} ({c['n_per_domain']}/domain)"
    rows = f"{c['max_rows']} rows" if c.get("max_rows") else "all rows"
    return f"{c['data']} ({rows} of {c['seq_len']} tokens)"
