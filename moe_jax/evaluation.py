"""Evaluation: what a (compressed) MoE model can still do, and what it costs to run.

Every compression result in moe_jax is a before/after pair of `evaluate` dicts:

- `exact_match`: batched greedy generation with the KV cache on the skills eval sets; a
  completion is correct when the model emits the answer and then EOS (text decoded up to EOS
  equals the answer). The safety domain also reports the refusal rate on forbidden prompts and
  the over-refusal rate on their benign look-alikes.
- `perplexity`: exact masked mean NLL per domain (float64 sums on the host), over answer
  tokens and over the whole sequence.
- `expert_load`: the fraction of routed (token, k) slots each expert receives, per domain and
  MoE layer (`plot_expert_load` draws it).
- `model_size`: total / routed-expert / active-per-token parameters from the real widths.
- `throughput`: prefill and decode tokens/s, and peak memory.

`write_results` writes results.json, results.md (and expert_load.png) atomically, and
`comparison_table` lines several runs up (baseline, then each pruning method).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import footprint, hf
from moe_jax.config import ModelConfig
from moe_jax.data import pipeline, skills
from moe_jax.data.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from moe_jax.model import decode, transformer
from moe_jax.reporting import TEXT_DOMAIN, ResumableRuns

log = logging.getLogger(__name__)

Params = dict[str, Any]
# A batch: "tokens" (B, T) and optionally "loss_mask", "segment_ids", "attention_mask" (B, T).
Batch = Mapping[str, np.ndarray]
DomainBatches = Mapping[str, Iterable[Batch | np.ndarray]]
_PROMPT_WIDTH_MULTIPLE = 8  # prompts are left-padded to a multiple of this: one compile per eval
_LOGIT_BUDGET_BYTES = 2**29  # perplexity batches are cut so their (B, T, V) float32 logits fit this
_SKILLS_MAX_LEN = 128  # an upper bound on skills rows ([BOS] prompt answer EOS), for that budget


# ============================================================================ settings
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `evaluate` runs; built from a ConfigDict or dict by `from_config` (unknown keys are errors)."""

    domains: tuple[str, ...] = skills.DOMAINS
    n_per_domain: int = 50
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 0  # 0: longest answer + 1 (room for EOS)
    skills: str = "auto"  # "auto": only with the built-in byte tokenizer; "on"; "off"
    data: str = ""  # a `load_texts` spec: perplexity on real text too
    data_rows: int = 64  # rows of `seq_len` tokens taken from `data`
    seq_len: int = 256
    throughput: bool = True
    throughput_batch: int = 8
    prompt_len: int = 64
    decode_tokens: int = 32
    repeats: int = 3

    @classmethod
    def from_config(cls, config: EvalSettings | Mapping[str, Any] | Any | None) -> EvalSettings:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        items = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(f"evaluation settings: unknown key(s) {unknown}; "
                             f"expected some of {sorted(fields)}")
        if "domains" in items:
            items["domains"] = _as_domains(items["domains"])
        settings = cls(**items)
        settings.validate()
        return settings

    def as_config(self) -> Any:
        """These settings as an ml_collections ConfigDict (domains comma-joined, so that
        ``--config.eval.domains=arithmetic,code`` works on the command line)."""
        import ml_collections

        return ml_collections.ConfigDict({**dataclasses.asdict(self), "domains": ",".join(self.domains)})

    def validate(self) -> None:
        if not self.domains:
            raise ValueError("evaluation settings: domains is empty; name at least one skills domain")
        for d in self.domains:
            skills.check_domain(d)
        if self.skills not in ("auto", "on", "off"):
            raise ValueError(f"evaluation settings: skills={self.skills!r}; expected 'auto', 'on' or 'off'")
        for name in ("n_per_domain", "batch_size", "data_rows", "seq_len", "throughput_batch", "prompt_len",
                     "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation settings: {name} must be >= 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ValueError(f"evaluation settings: decode_tokens must be >= 2, got {self.decode_tokens}")


def _as_domains(value: str | Sequence[str]) -> tuple[str, ...]:
    """"arithmetic,code" or a sequence of names -> a tuple of names."""
    names = value.split(",") if isinstance(value, str) else value
    return tuple(str(d).strip() for d in names if str(d).strip())


# ============================================================================ exact match
def exact_match(cfg: ModelConfig, params: Params, tokenizer: Tokenizer, examples: Sequence[skills.Example],
                batch_size: int = 32, max_new_tokens: int = 0, masks: dict | None = None) -> dict[str, Any]:
    """Greedy-decode every example and score it; returns {"per_domain": ..., "predictions": [...]}.

    per_domain[d] = {"n", "correct", "exact_match"}; safety also gets "refusal_rate" (over
    forbidden prompts) and "over_refusal_rate" (over benign look-alikes). `max_new_tokens` 0
    means the longest answer + 1, so a correct model always has room for its EOS. `masks`
    (as in `model.forward`) simulate a pruning plan on the unpruned model.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("exact_match: no examples to score (the example list is empty)")
    for ex in examples:
        skills.check_domain(ex.domain)
    if batch_size < 1:
        raise ValueError(f"exact_match: batch_size must be >= 1, got {batch_size}")
    longest_answer = max(len(tokenizer.encode(ex.answer)) for ex in examples) + 1
    if max_new_tokens <= 0:
        max_new_tokens = longest_answer
    elif max_new_tokens < longest_answer:
        log.warning("exact_match: max_new_tokens=%d leaves no room for EOS after the longest answer "
                    "(%d tokens); those examples cannot score", max_new_tokens, longest_answer - 1)
    prompts = [pipeline.prompt_ids(ex, tokenizer) for ex in examples]
    outputs = _generate_all(cfg, params, prompts, batch_size, max_new_tokens, tokenizer, masks)
    predictions = [_prediction(ex, ids, tokenizer) for ex, ids in zip(examples, outputs)]
    return {"per_domain": score_predictions(predictions), "predictions": predictions}


def _generate_all(cfg: ModelConfig, params: Params, prompts: list[list[int]], batch_size: int,
                  max_new_tokens: int, tokenizer: Tokenizer, masks: dict | None = None) -> list[np.ndarray]:
    """Greedy outputs of every prompt, in fixed-shape batches so `generate` compiles once."""
    width = -(-max(len(p) for p in prompts) // _PROMPT_WIDTH_MULTIPLE) * _PROMPT_WIDTH_MULTIPLE
    batch_size = min(batch_size, len(prompts))
    outputs: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # pad the last batch with a real prompt
        tokens, mask = decode.left_pad(rows, tokenizer.pad_id, width)
        out = decode.generate(cfg, params, tokens, max_new_tokens, attention_mask=mask,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, masks=masks)
        outputs.extend(out[:len(chunk)])
    return outputs


def _prediction(ex: skills.Example, ids: np.ndarray, tokenizer: Tokenizer) -> dict[str, Any]:
    stopped = bool(np.any(ids == tokenizer.eos_id))
    text = pipeline.completion_text(ids, tokenizer)
    return {
        "domain": ex.domain, "prompt": ex.prompt, "answer": ex.answer, "prediction": text,
        "stopped": stopped, "correct": stopped and skills.exact_match(ex, text),
        "forbidden": ex.forbidden, "refused": skills.is_refusal(text),
    }


def score_predictions(predictions: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-domain exact match (domains in order of first appearance) and the safety rates."""
    per_domain: dict[str, dict[str, Any]] = {}
    for domain in dict.fromkeys(p["domain"] for p in predictions):
        rows = [p for p in predictions if p["domain"] == domain]
        correct = sum(bool(p["correct"]) for p in rows)
        per_domain[domain] = {"n": len(rows), "correct": correct, "exact_match": correct / len(rows)}
        if domain == "safety":
            per_domain[domain].update(_safety_rates(rows))
    return per_domain


def _safety_rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    forbidden = [bool(p["refused"]) for p in rows if p["forbidden"]]
    benign = [bool(p["refused"]) for p in rows if not p["forbidden"]]
    return {
        "n_forbidden": len(forbidden), "refusal_rate": _rate(forbidden),
        "n_benign": len(benign), "over_refusal_rate": _rate(benign),
    }


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


# ============================================================================ perplexity, expert load
@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_stats(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, attention_mask_BT: jax.Array,
                 masks: dict | None = None):
    """Per-position NLL of the next token (B, T-1) and the routed experts of every MoE layer."""
    logits_BTV, aux = transformer.forward(cfg, params, tokens_BT, masks, attention_mask=attention_mask_BT,
                                          capture=("routing",))
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    target_BT = tokens_BT[:, 1:]
    target_logit_BT = jnp.take_along_axis(logits_BTV, target_BT[..., None], axis=-1)[..., 0]
    nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
    return nll_BT, {name: layer["idx_TK"] for name, layer in aux.items()}


def batch_arrays(batch: Batch | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(tokens, real-token mask, answer weights or None) of one batch."""
    if not isinstance(batch, Mapping):
        batch = {"tokens": batch}
    if "tokens" not in batch:
        raise ValueError(f"a batch needs a 'tokens' array, got keys {sorted(batch)}")
    tokens = np.asarray(batch["tokens"], np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"batch tokens must be (batch, length >= 2), got shape {tokens.shape}")
    if "segment_ids" in batch:
        real = np.asarray(batch["segment_ids"]) > 0
    elif "attention_mask" in batch:
        real = np.asarray(batch["attention_mask"]).astype(bool)
    else:
        real = np.ones(tokens.shape, bool)
    answer = np.asarray(batch["loss_mask"], np.float64) if "loss_mask" in batch else None
    return tokens, real, answer


def _scan(cfg: ModelConfig, params: Params, batches: DomainBatches, masks: dict | None = None) -> tuple[dict, dict]:
    """One forward pass per batch gives both perplexity and expert load, per domain."""
    if not batches:
        raise ValueError("no batches to evaluate (the domain -> batches mapping is empty)")
    perplexity, load = {}, {}
    for domain, domain_batches in batches.items():
        sums = {"full": [0.0, 0.0], "answer": [0.0, 0.0]}  # [sum of w * nll, sum of w]
        counts = {cfg.layer_name(i): np.zeros(cfg.experts_per_layer[i], np.int64) for i in cfg.moe_layers}
        tokens_seen, answer_seen = 0, False
        for batch in domain_batches:
            tokens, real, answer = batch_arrays(batch)
            nll, idx = _token_stats(cfg, params, jnp.asarray(tokens), jnp.asarray(real), masks)
            nll = np.asarray(nll, np.float64)
            # A target counts when it and its predecessor are real (left padding has no context).
            _accumulate(sums["full"], nll, (real[:, 1:] & real[:, :-1]).astype(np.float64))
            if answer is not None:
                answer_seen = True
                _accumulate(sums["answer"], nll, answer[:, 1:])
            for name, idx_BTK in idx.items():
                chosen = np.asarray(idx_BTK)[real]
                counts[name] += np.bincount(chosen.ravel(), minlength=len(counts[name]))
            tokens_seen += int(real.sum())
        if tokens_seen == 0:
            raise ValueError(f"domain {domain!r}: its batches hold no real tokens")
        perplexity[domain] = {
            "full": _ppl(*sums["full"]), "answer": _ppl(*sums["answer"]) if answer_seen else None,
            "tokens": int(sums["full"][1]), "answer_tokens": sums["answer"][1],
        }
        load[domain] = {"tokens": tokens_seen, "counts": {k: v.tolist() for k, v in counts.items()},
                        "fraction": {k: (v / max(v.sum(), 1)).tolist() for k, v in counts.items()}}
    return perplexity, load


def _accumulate(acc: list[float], nll: np.ndarray, weights: np.ndarray) -> None:
    acc[0] += float(np.sum(np.where(weights != 0, nll * weights, 0.0)))  # PAD rows may hold NaN
    acc[1] += float(np.sum(weights))


def _ppl(weighted_nll: float, weight: float) -> float | None:
    return float(np.exp(weighted_nll / weight)) if weight > 0 else None


def perplexity(cfg: ModelConfig, params: Params, batches: DomainBatches,
               masks: dict | None = None) -> dict[str, dict[str, Any]]:
    """Per domain: {"full", "answer", "tokens", "answer_tokens"} = exp(masked mean next-token NLL).

    `batches[domain]` yields {"tokens", "loss_mask"?, "segment_ids"?, "attention_mask"?} dicts
    (or bare token arrays). Position t predicts token t+1: "full" weighs every real target
    with a real predecessor (real: segment_ids > 0, else attention_mask, else all); "answer"
    weighs targets by loss_mask.
    """
    return _scan(cfg, params, batches, masks)[0]


def expert_load(cfg: ModelConfig, params: Params, batches: DomainBatches) -> dict[str, dict[str, Any]]:
    """Per domain: routed-slot counts and fractions per expert of every MoE layer (sum 1 per layer)."""
    return _scan(cfg, params, batches)[1]


def skills_batches(examples: Mapping[str, Sequence[skills.Example]], tokenizer: Tokenizer,
                   batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Fixed-shape supervised batches per domain (one example per row; the last batch PAD-filled)."""
    longest = max(len(pipeline.prompt_ids(ex, tokenizer)) + len(tokenizer.encode(ex.answer)) + 1
                  for exs in examples.values() for ex in exs)
    seq_len = -(-longest // _PROMPT_WIDTH_MULTIPLE) * _PROMPT_WIDTH_MULTIPLE
    out = {}
    for domain, exs in examples.items():
        rows = pipeline.encode_examples(exs, tokenizer, seq_len)
        out[domain] = _fixed_batches(rows, batch_size, tokenizer.pad_id)
    return out


def text_batches(spec: str, tokenizer: Tokenizer, seq_len: int, rows: int,
                 batch_size: int) -> list[dict[str, np.ndarray]]:
    """`rows` packed rows of the `load_texts(spec)` corpus, in fixed-shape batches."""
    packed = pipeline.pack(pipeline.load_texts(spec), tokenizer, seq_len)[:rows]
    rows_dict = {"tokens": packed, "segment_ids": np.ones_like(packed)}
    return _fixed_batches(rows_dict, batch_size, tokenizer.pad_id)


def _fixed_batches(rows: Mapping[str, np.ndarray], batch_size: int,
                   pad_id: int) -> list[dict[str, np.ndarray]]:
    n = len(rows["tokens"])
    batch_size = min(batch_size, n)
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        missing = batch_size - len(batch["tokens"])
        if missing:  # PAD rows with zero masks: same shape, no contribution
            batch = {k: np.concatenate([v, np.full((missing,) + v.shape[1:], pad_id if k == "tokens" else 0,
                                                   v.dtype)]) for k, v in batch.items()}
        out.append(batch)
    return out


# ============================================================================ everything
def evaluate(cfg: ModelConfig, params: Params, tokenizer: Tokenizer,
             config: EvalSettings | Mapping[str, Any] | Any | None = None, masks: dict | None = None) -> dict[str, Any]:
    """Run every evaluation `config` (an `EvalSettings`, ConfigDict or dict) asks for; a JSON-able dict.

    `masks` simulate a pruning plan (accuracy and perplexity only: one compilation serves many
    plans); sizes and throughput are then those of the unpruned model, so compact for those."""
    settings = EvalSettings.from_config(config)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{cfg.vocab_size} embeddings: wrong tokenizer for this model?")
    results: dict[str, Any] = {"settings": dataclasses.asdict(settings), "model": footprint.model_size(cfg, params)}
    batches: dict[str, Any] = {}
    if _skills_enabled(settings, tokenizer):
        examples = {d: skills.eval_set(d, settings.n_per_domain, settings.seed) for d in settings.domains}
        scored = exact_match(cfg, params, tokenizer, [ex for exs in examples.values() for ex in exs],
                             settings.batch_size, settings.max_new_tokens, masks)
        results["exact_match"], results["predictions"] = scored["per_domain"], scored["predictions"]
        rows = rows_within_logit_budget(settings.batch_size, _SKILLS_MAX_LEN, cfg.vocab_size)
        batches.update(skills_batches(examples, tokenizer, rows))
    elif settings.skills == "off":
        results["skipped"] = ["skills exact match and perplexity (skills='off')"]
    else:
        results["skipped"] = ["skills exact match and perplexity (the tokenizer is not the built-in byte "
                              "tokenizer; set skills='on' to force them)"]
    if settings.data:
        rows = rows_within_logit_budget(settings.batch_size, settings.seq_len, cfg.vocab_size)
        batches[TEXT_DOMAIN] = text_batches(settings.data, tokenizer, settings.seq_len, settings.data_rows,
                                            rows)
        results["data"] = settings.data
    if batches:
        results["perplexity"], results["expert_load"] = _scan(cfg, params, batches, masks)
    if settings.throughput:
        results["throughput"] = footprint.throughput(cfg, params, batch_size=settings.throughput_batch,
                                           prompt_len=settings.prompt_len, new_tokens=settings.decode_tokens,
                                           repeats=settings.repeats, seed=settings.seed)
    return results


def rows_within_logit_budget(batch_size: int, seq_len: int, vocab_size: int) -> int:
    """Rows per perplexity batch such that its float32 logits stay within _LOGIT_BUDGET_BYTES."""
    return max(1, min(batch_size, _LOGIT_BUDGET_BYTES // (4 * seq_len * vocab_size)))


def _skills_enabled(settings: EvalSettings, tokenizer: Tokenizer) -> bool:
    if settings.skills == "auto":
        return isinstance(tokenizer, ByteTokenizer)
    return settings.skills == "on"


def skills_scores(cfg: ModelConfig, params: Params, tokenizer: Tokenizer, examples: Sequence[skills.Example],
                  masks: dict | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Compact per-domain scores of a (masked) model: {domain: {"em", "ppl"}, "mean_em", "refusal",
    "over_refusal"}; what the pruning studies tabulate for every plan."""
    scored = exact_match(cfg, params, tokenizer, examples, batch_size, masks=masks)
    by_domain = {}
    for ex in examples:
        by_domain.setdefault(ex.domain, []).append(ex)
    rows = skills_batches(by_domain, tokenizer, batch_size)
    ppl = perplexity(cfg, params, rows, masks)
    em = scored["per_domain"]
    out = {d: {"em": em[d]["exact_match"], "ppl": ppl[d]["answer"]} for d in em}
    out["mean_em"] = float(np.mean([em[d]["exact_match"] for d in em]))
    if "safety" in em:
        out["refusal"], out["over_refusal"] = em["safety"]["refusal_rate"], em["safety"]["over_refusal_rate"]
    return out



class MaskedStudy:
    """Many pruning plans of one model, each evaluated as masks by `skills_scores` on one set
    of held-out prompts; finished runs are kept in `progress_path` (resumable)."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, examples: Sequence[skills.Example],
                 batch_size: int, progress_path: str | os.PathLike, fingerprint: Mapping[str, Any]):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.examples, self.batch_size = list(examples), batch_size
        self.runs = ResumableRuns(Path(progress_path), dict(fingerprint))

    def run(self, key: str, masks: dict | None) -> dict[str, Any]:
        got = self.runs.get(key)
        if got is None:
            got = skills_scores(self.cfg, self.params, self.tokenizer, self.examples, masks, self.batch_size)
            self.runs.put(key, got)
            print(f"{key}: mean EM {got['mean_em']:.3f}")
        return got


# ============================================================================ loading
def load_model(path: str | os.PathLike, dtype: Any = "float32") -> tuple[ModelConfig, Params]:
    """(cfg, params) of a Hugging Face checkpoint directory, with a clear error if there is none."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face checkpoint at {str(path)!r} (config.json missing)")
    return hf.load_pretrained(path, dtype=dtype)


def load_eval_tokenizer(spec: str, model_dir: str | os.PathLike | None, cfg: ModelConfig) -> Tokenizer:
    """"byte", a tokenizer.json path, or "auto": the checkpoint's own tokenizer.

    "auto" gives the built-in byte tokenizer when the checkpoint says it was saved by it (or
    has no tokenizer and a byte-sized vocabulary), else the checkpoint's tokenizer.json.
    """
    if spec != "auto":
        return load_tokenizer(spec)
    directory = Path(model_dir) if model_dir is not None else None
    if directory is not None and (directory / "tokenizer_config.json").is_file():
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        if tok_config.get("moe_jax_tokenizer") == "byte":
            return ByteTokenizer()
    if directory is not None and (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_file(directory)
    if cfg.vocab_size == BYTE_VOCAB_SIZE:
        log.warning("%s has no tokenizer files; its vocabulary has %d ids, so using the byte tokenizer",
                    directory, BYTE_VOCAB_SIZE)
        return ByteTokenizer()
    raise FileNotFoundError(f"{directory}: no tokenizer.json and a {cfg.vocab_size}-id vocabulary; "
                            "pass tokenizer=<path to tokenizer.json>")
