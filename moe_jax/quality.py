"""Quality columns for any checkpoint and tokenizer: held-out perplexity and lm-eval task scores.

Every launcher that compares models (prune, fisher_moe, pathfinder, trimming, audit) adds these
to its table, so a Hugging Face checkpoint with its own tokenizer is measured even where the
built-in skills evaluation (byte tokenizer only) cannot run. `config.eval.data` is any
`load_texts` spec; `config.lm_eval.tasks` any lm-eval task names (needs the `eval` extra).
Both take pruning masks, so a plan simulated on the unpruned weights is measured as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from moe_jax import evaluation
from moe_jax.config import ModelConfig
from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.reporting import TEXT_DOMAIN

try:  # the `eval` extra (requirements-eval.txt); without it only lm-eval columns are unavailable
    from moe_jax import harness
except ImportError:
    harness = None

Params = dict[str, Any]
PPL_COLUMN = "ppl (eval.data)"


def eval_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.eval` of a launcher: held-out text for perplexity ("" = none); same names as EvalSettings."""
    return ml_collections.ConfigDict({**dict(data="", data_rows=64, seq_len=256, batch_size=8), **overrides})


def lm_eval_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.lm_eval` of a launcher: no tasks = no lm-eval columns. num_fewshot -1 = each task's
    own; limit 0 = every document; max_length 0 = the model's; tokenizer "" = the checkpoint's own."""
    return ml_collections.ConfigDict({**dict(tasks=(), include_path="", num_fewshot=-1, limit=0, batch_size=8,
                                             max_length=0, max_gen_toks=256, tokenizer=""), **overrides})


def lm_eval_scorer(lm_config: Mapping[str, Any] | Any, path: str | os.PathLike, seed: int = 0):
    """fn(cfg, params, masks=None) -> {"task metric": value} on `lm_config.tasks`, or None when no
    tasks are set. Tasks and their data load now, so a bad task fails before any model is evaluated."""
    c = lm_config
    if not c.tasks:
        return None
    if harness is None:
        raise ValueError("config.lm_eval.tasks needs lm-eval: pip install -r requirements-eval.txt")
    manager = harness.task_manager(c.include_path or None)
    tasks = harness.load_tasks(list(c.tasks), manager)
    tokenizer = harness.MoeJaxLM.load_tokenizer(c.tokenizer or path)
    stop_token_ids = harness.generation_eos_ids(path)

    def score(cfg: ModelConfig, params: Params, masks: dict | None = None) -> dict[str, float]:
        lm = harness.MoeJaxLM(cfg, params, tokenizer, masks=masks, batch_size=c.batch_size,
                              max_length=c.max_length or None, max_gen_toks=c.max_gen_toks,
                              stop_token_ids=stop_token_ids)
        results = harness.simple_evaluate(lm, list(tasks.values()), num_fewshot=c.num_fewshot, limit=c.limit,
                                          seed=seed, manager=manager)
        return harness.scores(results)

    return score


class Quality:
    """Held-out perplexity and lm-eval scores of one model (or of masked variants of it).

    Build it once per launcher run (`from_config`), then call it per row: the held-out batches are
    tokenised once and the lm-eval tasks loaded once. `columns` names what a call returns.
    """

    def __init__(self, held_out: list[dict] | None = None, lm_eval=None):
        self.held_out, self.lm_eval = held_out, lm_eval

    @classmethod
    def from_config(cls, config, path: str | os.PathLike, cfg: ModelConfig, tokenizer, seed: int = 0) -> Quality:
        """From a launcher config's `eval` (data, data_rows, seq_len, batch_size) and `lm_eval`
        nodes (either may be absent); `tokenizer` is the moe_jax tokenizer the perplexity uses."""
        e = config.get("eval")
        held_out = None
        if e is not None and e.get("data"):
            rows = evaluation.rows_within_logit_budget(e.batch_size, e.seq_len, cfg.vocab_size)
            held_out = evaluation.text_batches(e.data, tokenizer, e.seq_len, e.data_rows, rows)
            if not held_out:
                raise ValueError(f"config.eval.data={e.data!r}: no text to score (is the file empty?)")
        lm_config = config.get("lm_eval")
        scorer = lm_eval_scorer(lm_config, path, seed) if lm_config is not None else None
        return cls(held_out, scorer)

    @property
    def enabled(self) -> bool:
        return self.held_out is not None or self.lm_eval is not None

    def __call__(self, cfg: ModelConfig, params: Params, masks: dict | None = None) -> dict[str, Any]:
        """{"ppl (eval.data)": float, "<task> <metric>": float, ...}; empty when nothing is configured."""
        out: dict[str, Any] = {}
        if self.held_out is not None:
            ppl = evaluation.perplexity(cfg, params, {TEXT_DOMAIN: self.held_out}, masks)
            out[PPL_COLUMN] = ppl[TEXT_DOMAIN]["full"]
        if self.lm_eval is not None:
            out.update(self.lm_eval(cfg, params, masks))
        return out

    def skills_apply(self, tokenizer) -> bool:
        """Whether a launcher's skills exact match runs: only with the built-in byte tokenizer (another
        tokenizer's text makes its answers meaningless), and then these columns must be configured."""
        if isinstance(tokenizer, ByteTokenizer):
            return True
        if not self.enabled:
            raise ValueError("this checkpoint has its own tokenizer, so the skills exact match does not apply: set "
                             "--config.eval.data=<held-out text, any load_texts spec> and/or "
                             "--config.lm_eval.tasks=\"('arc_easy',)\" for the comparison's columns")
        print("Skills exact match skipped (it needs the built-in byte tokenizer): the tables carry the quality columns")
        return False

    def cached(self, runs, key: str, cfg: ModelConfig, params: Params, masks: dict | None = None) -> dict | None:
        """This row's columns from `runs` (a resumable store with get/put, e.g. `reporting.ResumableRuns`)
        under "quality <key>", measured and stored on a miss; None when nothing is configured."""
        if not self.enabled:
            return None
        got = runs.get(f"quality {key}")
        if got is None:
            got = self(cfg, params, masks)
            runs.put(f"quality {key}", got)
            print(f"{key}: {got}")
        return got

    def study_runner(self, study: evaluation.MaskedStudy, skills_on: bool):
        """run(key, masks) -> a masked study's row: skills scores when `skills_on`, plus "quality" when
        configured; both kept in the study's progress file, so a resumed run recomputes no finished row."""

        def run(key: str, masks: dict | None) -> dict[str, Any]:
            got = dict(study.run(key, masks)) if skills_on else {}
            if self.enabled:
                got["quality"] = self.cached(study.runs, key, study.cfg, study.params, masks)
            return got

        return run


def load_compared(config, path: str | os.PathLike, seed: int = 0):
    """(cfg, params, tokenizer, measure, skills_on) for a launcher that compares variants of the model
    at `path` (float32): the model, its own tokenizer, this config's quality columns and whether the
    skills exact match applies. Every bad input fails here, before anything expensive runs."""
    cfg, params = evaluation.load_model(path, "float32")
    tokenizer = evaluation.load_eval_tokenizer("auto", path, cfg)
    measure = Quality.from_config(config, path, cfg, tokenizer, seed)
    return cfg, params, tokenizer, measure, measure.skills_apply(tokenizer)
