"""Text sources -> `datasets.Dataset` -> fixed-shape numpy token batches.

`load_texts(spec)` is the one entry point for every corpus, always through `datasets`:

    skills:<split>[:<domain>[,<domain>...]]   the synthetic skills corpus (`skills.py`)
    prose:<split>                             the built-in generic text (`prose.py`), passages
    json:<path or glob>                       JSON / JSON-lines files
    text:<path or glob>                       plain-text files, one row per line
    parquet:<path or glob>                    Parquet files
    hf:<repo>[:<config>]:<split>              a Hugging Face hub dataset (needs network);
                                              ``hf:wikitext/wikitext-2-raw-v1:train`` also works

It returns a Dataset with a ``text`` column (taken from ``column=`` for files and the hub;
empty rows dropped); skills datasets also carry prompt / answer / domain / refuse / forbidden.

Language-model rows come from `pack` (texts joined with EOS, cut into ``seq_len`` rows);
supervised skills rows from `encode_examples` (one example per row, or several with
``pack=True``) with a loss mask; `batches` shuffles either deterministically into (B, T)
arrays. Convention for the trainer: row ``t`` predicts token ``t + 1``, so a mask is aligned
with the *tokens*: use ``tokens[:, :-1]`` as inputs, ``tokens[:, 1:]`` as targets and
``loss_mask[:, 1:]`` as weights.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_jax.data import prose, skills
from moe_jax.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

SCHEMES = ("skills", "prose", "json", "text", "parquet", "hf")
_SPEC_HELP = ("expected one of 'skills:train', 'skills:eval:arithmetic', 'prose:eval', 'json:/path/a.jsonl', "
              "'text:/path/*.txt', 'parquet:/path/x.parquet', 'hf:wikitext/wikitext-2-raw-v1:train'")


def load_texts(spec: str, *, column: str = "text", n_per_domain: int = 1000, seed: int = 0,
               cache_dir: str | None = None) -> datasets.Dataset:
    """Load the corpus named by `spec` (see module docstring) as a Dataset with a `text` column.

    `column` names the text field of files / hub datasets; `n_per_domain` and `seed` size and
    seed the skills corpus; `cache_dir` is passed to `datasets.load_dataset`.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(f"unknown data spec {spec!r}: the scheme must be one of {', '.join(SCHEMES)}; "
                         f"{_SPEC_HELP}")
    if scheme == "skills":
        ds = _skills_dataset(spec, rest, n_per_domain, seed)
    elif scheme == "prose":
        ds = _prose_dataset(spec, rest)
    else:
        ds = _ensure_text_column(spec, _load_with_datasets(spec, scheme, rest, cache_dir), column)
        ds = ds.filter(lambda text: bool(text and text.strip()), input_columns="text")
    if len(ds) == 0:
        raise ValueError(f"data spec {spec!r} gave an empty dataset (no non-empty rows)")
    return ds


def _skills_dataset(spec: str, rest: str, n_per_domain: int, seed: int) -> datasets.Dataset:
    import datasets

    split, _, domain_list = rest.partition(":")
    if split not in skills.SPLITS:
        raise ValueError(f"data spec {spec!r}: unknown skills split {split!r}; "
                         f"valid splits: {', '.join(skills.SPLITS)}")
    domains = tuple(d.strip() for d in domain_list.split(",")) if domain_list else skills.DOMAINS
    try:
        for domain in domains:
            skills.check_domain(domain)
    except ValueError as err:
        raise ValueError(f"data spec {spec!r}: {err}") from None
    if split == "train":
        examples = skills.train_mixture(n_per_domain, seed, domains)
    else:
        examples = [ex for d in domains for ex in skills.eval_set(d, n_per_domain, seed)]
    if not examples:
        raise ValueError(f"data spec {spec!r} gave an empty dataset (n_per_domain={n_per_domain})")
    return datasets.Dataset.from_list([
        {"text": ex.text, "prompt": ex.prompt, "answer": ex.answer, "domain": ex.domain,
         "refuse": ex.refuse, "forbidden": ex.forbidden} for ex in examples
    ], features=_skills_features())


def _prose_dataset(spec: str, split: str) -> datasets.Dataset:
    import datasets

    if split not in prose.SPLITS:
        raise ValueError(f"data spec {spec!r}: unknown prose split {split!r}; valid splits: {', '.join(prose.SPLITS)}")
    return datasets.Dataset.from_dict({"text": prose.passages(split)})


def _skills_features() -> datasets.Features:
    import datasets

    string, boolean = datasets.Value("string"), datasets.Value("bool")
    return datasets.Features({"text": string, "prompt": string, "answer": string, "domain": string,
                              "refuse": boolean, "forbidden": boolean})


def _load_with_datasets(spec: str, scheme: str, rest: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if scheme == "hf":
        return _load_hub(spec, rest, cache_dir)
    files = sorted(glob.glob(os.path.expanduser(rest)))
    if not files:
        raise FileNotFoundError(f"data spec {spec!r}: no file matches {rest!r}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"data spec {spec!r} gave an empty dataset (all files are empty)")
    try:
        return datasets.load_dataset(scheme, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as err:
        raise ValueError(f"data spec {spec!r}: datasets could not read {files}: "
                         f"{type(err).__name__}: {err}") from err


def _load_hub(spec: str, rest: str, cache_dir: str | None) -> datasets.Dataset:
    """hf:<repo>:<split>, hf:<repo>:<config>:<split>, or the short hf:<name>/<config>:<split>."""
    import datasets

    parts = rest.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"data spec {spec!r}: expected hf:<repo>[:<config>]:<split>")
    if len(parts) == 3:
        attempts = [(parts[0], parts[1])]
    else:
        path, segments = parts[0], parts[0].split("/")
        attempts = [(path, None)]
        if len(segments) == 2:  # "wikitext/wikitext-2-raw-v1" may mean name/config
            attempts.append((segments[0], segments[1]))
        elif len(segments) == 3:
            attempts = [("/".join(segments[:2]), segments[2])]
    errors = []
    for path, config in attempts:
        try:
            return datasets.load_dataset(path, config, split=parts[-1], cache_dir=cache_dir)
        except Exception as err:  # reported below, with every attempt
            errors.append(f"load_dataset({path!r}, {config!r}): {type(err).__name__}: {err}")
            if isinstance(err, ConnectionError):  # offline: the other reading fails the same way
                break
    raise RuntimeError(f"data spec {spec!r}: could not load the hub dataset (network needed?):\n  "
                       + "\n  ".join(errors))


def _ensure_text_column(spec: str, ds: datasets.Dataset, column: str) -> datasets.Dataset:
    if column not in ds.column_names:
        raise ValueError(f"data spec {spec!r} has no column {column!r}; columns: {ds.column_names} "
                         f"(pass column=...)")
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"data spec {spec!r}: column {column!r} holds {ds.features[column]}, not text")
    if column != "text":
        if "text" in ds.column_names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(column, "text")
    return ds


def examples_from_dataset(ds: datasets.Dataset) -> list[skills.Example]:
    """Skills Examples back from a `load_texts("skills:...")` dataset."""
    cols = [ds[c] for c in ("domain", "prompt", "answer", "refuse", "forbidden")]
    return [skills.Example(*row) for row in zip(*cols)]


# ---------------------------------------------------------------------------------------------
# tokens


def _text_column(texts: Iterable[str] | datasets.Dataset) -> Iterable[str]:
    return texts["text"] if hasattr(texts, "column_names") else texts


def _encode_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    return encode_batch(list(texts)) if encode_batch else [tokenizer.encode(t) for t in texts]


def pack(texts: Iterable[str] | datasets.Dataset, tokenizer: Tokenizer, seq_len: int,
         drop_remainder: bool = True) -> np.ndarray:
    """Concatenate `texts` (each followed by EOS) and cut the stream into (N, seq_len) int32 rows.

    The tail shorter than a row is dropped, or padded with PAD when `drop_remainder` is False.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream: list[int] = []
    texts = iter(_text_column(texts))
    while chunk := list(itertools.islice(texts, 1024)):
        for ids in _encode_many(tokenizer, chunk):
            stream.extend(ids)
            stream.append(tokenizer.eos_id)
    n_rows, tail = divmod(len(stream), seq_len)
    if tail and not drop_remainder:
        stream.extend([tokenizer.pad_id] * (seq_len - tail))
        n_rows += 1
    if n_rows == 0:
        raise ValueError(f"only {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    return np.asarray(stream[: n_rows * seq_len], dtype=np.int32).reshape(n_rows, seq_len)


def encode_examples(examples: Sequence[skills.Example], tokenizer: Tokenizer, seq_len: int, *,
                    prompt_weight: float = 0.0, pack: bool = False,
                    add_bos: bool = True) -> dict[str, np.ndarray]:
    """Supervised rows ``[BOS] prompt answer EOS PAD...`` with a loss mask aligned to tokens.

    Returns ``tokens`` (int32, B x T), ``loss_mask`` (float32: 1 on answer and EOS tokens,
    `prompt_weight` on prompt tokens, 0 on BOS and PAD; ``prompt_weight=1`` is the
    full-sequence mask) and ``segment_ids`` (int32: k for the k-th example of the row, 0 on
    PAD). With ``pack=True`` several examples share a row (fewer, fuller rows; the trainer may
    restrict attention with segment_ids). A too-long example is an error, not truncated.
    """
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    pieces = []  # (ids, mask) per example
    for ex in examples:
        prompt, answer = tokenizer.encode(ex.prompt), tokenizer.encode(ex.answer) + [tokenizer.eos_id]
        ids = bos + prompt + answer
        if len(ids) > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len={seq_len}: {ex.text!r}")
        pieces.append((ids, [0.0] * len(bos) + [prompt_weight] * len(prompt) + [1.0] * len(answer)))
    rows: list[list[tuple[list[int], list[float]]]] = []
    for piece in pieces:
        if pack and rows and sum(len(p[0]) for p in rows[-1]) + len(piece[0]) <= seq_len:
            rows[-1].append(piece)
        else:
            rows.append([piece])
    tokens = np.full((len(rows), seq_len), tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), seq_len), dtype=np.float32)
    segments = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        pos = 0
        for k, (ids, weights) in enumerate(row, start=1):
            tokens[r, pos:pos + len(ids)] = ids
            mask[r, pos:pos + len(ids)] = weights
            segments[r, pos:pos + len(ids)] = k
            pos += len(ids)
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": segments}


def prompt_ids(example: skills.Example, tokenizer: Tokenizer, add_bos: bool = True) -> list[int]:
    """Token ids to condition greedy generation on (same prefix as in `encode_examples`)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(example.prompt)


def completion_text(ids: Iterable[int], tokenizer: Tokenizer) -> str:
    """Decode generated ids up to (not including) the first EOS, for `skills.exact_match`."""
    return tokenizer.decode(itertools.takewhile(lambda i: int(i) != tokenizer.eos_id, ids))


# ---------------------------------------------------------------------------------------------
# batches

Rows = np.ndarray | Mapping[str, np.ndarray]


def batches(rows: Rows, batch_size: int, seed: int = 0, epochs: int | None = 1) -> Iterator[Any]:
    """Deterministic shuffled (batch_size, T) batches; `rows` is an array or a dict of arrays
    sharing the first axis (then each batch is such a dict). Every epoch is a fresh permutation
    seeded by (seed, epoch); an incomplete last batch is dropped so shapes never change.
    `epochs=None` repeats forever."""
    arrays = dict(rows) if isinstance(rows, Mapping) else {"": np.asarray(rows)}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"arrays disagree on the number of rows: { {k: len(a) for k, a in arrays.items()} }")
    (n,) = lengths
    if batch_size <= 0 or n < batch_size:
        raise ValueError(f"batch_size={batch_size} needs 1 <= batch_size <= number of rows ({n})")
    for epoch in itertools.count() if epochs is None else range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            batch = {k: a[idx] for k, a in arrays.items()}
            yield batch if isinstance(rows, Mapping) else batch[""]
