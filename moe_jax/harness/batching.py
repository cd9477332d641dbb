"""Token requests -> fixed-shape numpy batches, so a whole evaluation compiles a few programs.

Shape letters: B rows of a batch, T padded tokens per row (a power-of-two bucket).

Requests are sorted longest first and cut into batches of `batch_size` rows; each batch is padded
to the bucket of its longest row and, if short, with empty rows to `batch_size`. The number of
compilations is then the number of distinct buckets (about log2(max_length / 16)), not the number
of distinct request lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from moe_jax.model.decode import left_pad

MIN_BUCKET = 16


def bucket(length: int, max_length: int) -> int:
    """The smallest power of two >= `length` (at least MIN_BUCKET), capped at `max_length`."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length > max_length:
        raise ValueError(f"a row of {length} tokens exceeds max_length={max_length}")
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


def longest_first(lengths: Sequence[int], keys: Sequence | None = None) -> list[int]:
    """Request indices, longest first (ties by `keys`, then index): lm-eval's order, so the first
    batch is the largest and a memory error shows at once."""
    keys = keys if keys is not None else [()] * len(lengths)
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], keys[i], i))


def chunks(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(order), batch_size):
        yield list(order[start:start + batch_size])


class ScoreBatch(NamedTuple):
    """Right-padded rows for teacher-forced scoring.

    tokens_BT: model inputs; targets_BT: the token each position must predict; valid_BT: real
    inputs; score_BT: positions whose target belongs to the continuation."""

    tokens_BT: np.ndarray
    targets_BT: np.ndarray
    valid_BT: np.ndarray
    score_BT: np.ndarray


def score_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, batch_size: int,
               pad_id: int = 0) -> ScoreBatch:
    """(context, continuation) token pairs -> one ScoreBatch of `batch_size` rows.

    As lm-eval's HF backend: the model sees (context + continuation)[-(max_length + 1):][:-1]
    (left truncation when too long) and the last len(continuation) positions are scored."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    windows = []
    for context, continuation in rows:
        if not context or not continuation:
            raise ValueError("every request needs >= 1 context and >= 1 continuation token")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        windows.append((whole, len(continuation)))
    width = bucket(max(len(w) - 1 for w, _ in windows), max_length)
    tokens = np.full((batch_size, width), pad_id, np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    valid = np.zeros((batch_size, width), bool)
    score = np.zeros((batch_size, width), bool)
    for b, (whole, n_cont) in enumerate(windows):
        n_in = len(whole) - 1
        tokens[b, :n_in] = whole[:-1]
        targets[b, :n_in] = whole[1:]
        valid[b, :n_in] = True
        score[b, n_in - n_cont:n_in] = True
    return ScoreBatch(tokens, targets, valid, score)


def prompt_rows(prompts: Sequence[Sequence[int]], max_length: int, batch_size: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (tokens_BT, valid_BT) of `batch_size` rows for `model.generate` (`decode.left_pad`
    at the bucket of the longest prompt); a short batch repeats its first prompt, whose extra
    outputs the caller drops."""
    if not prompts or len(prompts) > batch_size:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs >= 1 token")
    rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
    return left_pad(rows, pad_id, bucket(max(len(p) for p in prompts), max_length))
