"""Data for moe_jax: the synthetic skills corpus, tokenizers, and the loading/packing pipeline.

`skills` generates the five exactly-scored tasks of the built-in tiny MoE; `tokenizer` gives
the byte tokenizer (and its Hugging Face twin) or wraps any tokenizer.json; `pipeline`
loads any corpus through `datasets` and turns it into fixed-shape numpy batches.
"""

from moe_jax.data.pipeline import (
    SCHEMES,
    batches,
    completion_text,
    encode_examples,
    examples_from_dataset,
    load_texts,
    pack,
    prompt_ids,
)
from moe_jax.data.skills import (
    DOMAINS,
    REFUSAL,
    SPLITS,
    Example,
    Fact,
    eval_set,
    exact_match,
    generate,
    is_refusal,
    knowledge_base,
    train_mixture,
)
from moe_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BOS_ID", "DOMAINS", "EOS_ID", "PAD_ID", "REFUSAL", "SCHEMES", "SPLITS", "ByteTokenizer", "Example",
    "Fact", "HFTokenizer", "Tokenizer", "batches", "completion_text", "encode_examples", "eval_set",
    "exact_match", "examples_from_dataset", "generate", "is_refusal", "knowledge_base", "load_texts",
    "load_tokenizer", "pack", "prompt_ids", "train_mixture",
]
