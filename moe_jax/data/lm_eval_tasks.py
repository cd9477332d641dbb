"""Stand-in lm-eval tasks: tiny local tasks of the three request types, for smoke runs and tests.

They exercise every path a real benchmark takes (multiple-choice loglikelihoods, few-shot
generate_until with stop strings and a GSM8K-style regex filter, loglikelihood_rolling over
documents longer than a small max_length) in seconds and offline; their scores mean nothing.
`write(root)` puts the YAMLs and JSON-lines files in `root`; pass it as `include_path`;
`write_tokenizer(dir)` a small BPE tokenizer for their vocabulary, as transformers loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_FOX = "The quick brown fox jumps over the lazy dog near the river bank."

_MC_ROWS = [{"q": "The quick brown fox jumps over the", "choices": ["lazy dog", "river bank", "top two"], "label": 0},
            {"q": "A router picks the", "choices": ["top two experts", "quick fox", "lazy river"], "label": 0},
            {"q": "Experts route", "choices": ["tokens", "dogs", "banks"], "label": 1},
            {"q": "what is two plus", "choices": ["three", "five", "fox"], "label": 2}]
_QA_ROWS = [{"question": f"what is {a} plus {b}?", "answer": f"{w} #### {a_n + b_n}"}
            for (a, a_n), (b, b_n), w in ((("two", 2), ("three", 3), "five"), (("two", 2), ("two", 2), "four"),
                                          (("three", 3), ("three", 3), "six"), (("one", 1), ("one", 1), "two"),
                                          (("one", 1), ("two", 2), "three"))]
_TEXT_ROWS = [{"text": " ".join([_FOX] * k)} for k in (1, 3, 5)]
# Every sentence the tasks hold, for building more requests of the same vocabulary (benchmarks).
TEXT = (_FOX, *(r["q"] + " " + " ".join(r["choices"]) for r in _MC_ROWS),
        *(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in _QA_ROWS))
TASKS = ("tiny_mc", "tiny_gsm", "tiny_text")


def write(root: str | os.PathLike) -> Path:
    """Local lm-eval tasks of the three request types over JSON-lines files in `root` (use it as
    `include_path`): tiny_mc (multiple choice: loglikelihood), tiny_gsm (generate_until, GSM8K-style
    few-shot prompt, stop strings and a `#### n` regex filter), tiny_text (loglikelihood_rolling over
    documents longer than a small max_length)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("mc", _MC_ROWS), ("qa", _QA_ROWS), ("text", _TEXT_ROWS)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = lambda **splits: dict(dataset_path="json", dataset_kwargs={"data_files": {
        k: str(v) for k, v in splits.items()}}, test_split="test")
    metrics = lambda *names: [{"metric": n, "aggregation": "mean" if n.startswith("acc") else (
        "bits_per_byte" if n == "bits_per_byte" else "weighted_perplexity"), "higher_is_better": n.startswith("acc")}
        for n in names]
    tasks = {
        "tiny_mc": dict(source(test=files["mc"]), output_type="multiple_choice", doc_to_text="{{q}}",
                        doc_to_choice="{{choices}}", doc_to_target="label", metric_list=metrics("acc", "acc_norm")),
        "tiny_gsm": dict(source(train=files["qa"], test=files["qa"]), training_split="train", fewshot_split="train",
                         num_fewshot=2,
                         output_type="generate_until", doc_to_text="Question: {{question}}\nAnswer:",
                         doc_to_target=" {{answer}}", target_delimiter="", fewshot_delimiter="\n\n",
                         generation_kwargs={"until": ["\n\n", "Question:"], "do_sample": False, "max_gen_toks": 12},
                         filter_list=[{"name": "strict-match", "filter": [
                             {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                             {"function": "take_first"}]}],
                         metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]),
        "tiny_text": dict(source(test=files["text"]), output_type="loglikelihood_rolling", doc_to_text="",
                          doc_to_target="{{text}}", metric_list=metrics("word_perplexity", "byte_perplexity",
                                                                         "bits_per_byte")),
    }
    for name, spec in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **spec}, sort_keys=False))
    return root


_TOKENIZER_TEXT = ("Question: what is two plus three? Answer: five #### 5",
                   "The quick brown fox jumps over the lazy dog near the river bank.",
                   "Experts route tokens; a router picks the top two experts for each token.")


def write_tokenizer(out_dir: str | os.PathLike, *, add_bos: bool, vocab_size: int = 120) -> int:
    """A small BPE tokenizer (sentencepiece-style spaces) trained on a few sentences of the tasks'
    vocabulary, written as tokenizer.json + tokenizer_config.json, which transformers' AutoTokenizer
    loads; with `add_bos` its post-processor prepends <s> as Llama's and DeepSeek's do. Returns its
    vocabulary size."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(list(_TOKENIZER_TEXT) * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return tok.get_vocab_size()
