"""Training rows of the skills corpus and the batch of every step, addressed by step number.

The batch of step ``s`` is a pure function of (rows, batch size, seed, s): epoch-wise
permutations seeded by (seed, epoch). A restart needs only the step, which is what makes a
killed-and-resumed training run end with exactly the uninterrupted run's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping

import ml_collections
import numpy as np

from moe_jax.checkpoint import TrainError
from moe_jax.data import pipeline, prose, skills
from moe_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SkillsData:
    """Encoded rows: the training mixture, and held-out rows (answer-only loss mask on skills,
    every token of prose) with the domain of each row ("prose" for generic text)."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    eval_domain: np.ndarray  # (N_eval,) domain name of each eval row


def load_skills(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> SkillsData:
    """Encode the training mixture and the held-out sets of ``config.data`` (rows + positions)."""
    d = config.data
    train_examples = []
    for domain, n in d.examples_per_domain.items():
        train_examples += skills.generate(domain, "train", int(n), d.seed)
    train_examples += prose_examples("train", d.prose_passages, d.prose_max_chars, d.seed)
    # Shuffle before packing so rows mix domains; the loop reshuffles rows every epoch.
    order = np.random.default_rng([d.seed, 12345]).permutation(len(train_examples))
    train_examples = [train_examples[i] for i in order]
    eval_examples = {dom: skills.eval_set(dom, d.eval_examples_per_domain, d.seed) for dom in skills.DOMAINS}
    if d.prose_passages:
        eval_examples["prose"] = prose_examples("eval", d.eval_examples_per_domain, d.prose_max_chars, d.seed)

    def encode(examples, prompt_weight):
        try:
            rows = pipeline.encode_examples(examples, tokenizer, d.seq_len, prompt_weight=prompt_weight,
                                            pack=d.pack)
        except ValueError as err:
            raise TrainError(f"config.data.seq_len={d.seq_len}: {err}") from err
        return dict(rows)

    # Held-out loss is on answers only, whatever the training mask, so runs compare.
    per_domain = {dom: encode(exs, 0.0) for dom, exs in eval_examples.items() if exs}
    keys = next(iter(per_domain.values()))
    eval_rows = {k: np.concatenate([rows[k] for rows in per_domain.values()]) for k in keys}
    eval_domain = np.concatenate([[dom] * len(rows["tokens"]) for dom, rows in per_domain.items()])
    return SkillsData(encode(train_examples, d.prompt_weight), eval_rows, eval_domain)


def prose_examples(split: str, n: int, max_chars: int, seed: int) -> list[skills.Example]:
    """`n` prose passages of `split` as prompt-less examples (every token is an answer token):
    the split's passages shuffled by `seed`, cycled when `n` exceeds them."""
    if n <= 0:
        return []
    pool = prose.passages(split, max_chars)
    order = np.random.default_rng([seed, 777]).permutation(len(pool))
    return [skills.Example("prose", "", pool[order[i % len(pool)]]) for i in range(int(n))]


def batch_indices(step: int, num_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of the batch at `step`: epoch-wise permutations seeded by (seed, epoch).

    The same order as ``pipeline.batches(rows, batch_size, seed, epochs=None)``, but addressed
    by step, so resuming needs no iterator state.
    """
    epoch, index = data_position(step, num_rows, batch_size)
    order = _permutation(seed, epoch, num_rows)
    return order[index * batch_size:(index + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def data_position(step: int, num_rows: int, batch_size: int) -> tuple[int, int]:
    """(epoch, batch within epoch) that `step` reads; an incomplete last batch is skipped."""
    per_epoch = num_rows // batch_size
    if per_epoch == 0:
        raise TrainError(f"config.batch_size={batch_size} is larger than the {num_rows} training rows")
    return divmod(int(step), per_epoch)


def data_fingerprint(rows: Mapping[str, np.ndarray], batch_size: int, seed: int) -> str:
    """A short hash of the training rows and batch order: a resume must see the same ones."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{batch_size}|{seed}|".encode())
    for key in sorted(rows):
        h.update(key.encode())
        h.update(np.ascontiguousarray(rows[key]).tobytes())
    return h.hexdigest()


def batch_at(rows: Mapping[str, np.ndarray], step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    idx = batch_indices(step, len(rows["tokens"]), batch_size, seed)
    return {k: v[idx] for k, v in rows.items()}


