"""The built-in generic text: Python standard-library docstrings, an offline analogue of web text.

The papers calibrate on generic web text (C4, WikiText) and pretrained LLMs learn every token of
it. The testbed needs the same without a download, so moe_jax ships real human-written English
prose (with the code fragments technical prose carries): the docstrings of CPython's standard
library, under the PSF licence (`PSF_LICENSE.txt` beside the corpus). `build` extracts them once
into `prose_stdlib.json.gz` (committed, so every machine reads the same bytes whatever its
Python); `passages(split)` cuts them into passages that fit a training row. One docstring in
`HOLDOUT_MODULUS`, by a hash of its source name, is held out for evaluation.

    python -c 'from moe_jax.data import prose; prose.build()'   # rewrites prose_stdlib.json.gz
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import platform
import re
import sysconfig
from pathlib import Path

from moe_jax import reporting

CORPUS = Path(__file__).with_name("prose_stdlib.json.gz")
SPLITS = ("train", "eval")
HOLDOUT_MODULUS = 10  # 1 docstring in 10 is held out
MIN_CHARS = 300  # shorter docstrings are mostly one-line summaries
MIN_LETTER_SHARE = 0.8  # letters and spaces: prose, not tables or doctest sessions
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip"}


def _prose_share(text: str) -> float:
    return sum(c.isalpha() or c == " " for c in text) / max(len(text), 1)


def extract(stdlib: Path) -> list[dict[str, str]]:
    """Every prose docstring of the `stdlib` tree as {source, text}, whitespace collapsed, sorted."""
    docs, seen = [], set()
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.split())
            if len(text) < MIN_CHARS or not text.isascii() or _prose_share(text) < MIN_LETTER_SHARE or text in seen:
                continue
            seen.add(text)
            name = module if isinstance(node, ast.Module) else f"{module}:{node.name}@{node.lineno}"
            docs.append({"source": name, "text": text})
    return docs


def build(out: Path = CORPUS, stdlib: Path | None = None) -> dict:
    """Extract the running Python's stdlib docstrings into `out` (written to a temporary name, then renamed)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    corpus = {"python": platform.python_version(), "licence": "PSF-2.0 (PSF_LICENSE.txt)", "docs": extract(stdlib)}
    reporting.atomic_write(out, gzip.compress(json.dumps(corpus, indent=0, sort_keys=True).encode(), mtime=0))
    return corpus


@functools.lru_cache(maxsize=2)
def documents(path: Path = CORPUS) -> tuple[dict[str, str], ...]:
    """The corpus' docstrings, in file order."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            corpus = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a prose corpus written by moe_jax.data.prose.build ({err})") from err
    if not isinstance(corpus, dict) or not isinstance(corpus.get("docs"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'docs' list")
    return tuple(corpus["docs"])


def split_of(source: str) -> str:
    """'eval' for one source name in HOLDOUT_MODULUS (a stable hash), else 'train'."""
    digest = hashlib.blake2b(source.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % HOLDOUT_MODULUS == 0 else "train"


def chunk(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars`, at sentence ends where possible, else at spaces."""
    if max_chars < 16:
        raise ValueError(f"max_chars={max_chars}: passages need at least 16 characters")
    pieces, rest = [], text.strip()
    while len(rest) > max_chars:
        window = rest[:max_chars + 1]
        ends = [m.end() for m in re.finditer(r"[.!?:;] ", window)]
        cut = ends[-1] if ends and ends[-1] > max_chars // 2 else window.rfind(" ") + 1
        if cut <= 0:  # one unbroken word longer than a passage
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def passages(split: str, max_chars: int = 240, path: Path = CORPUS) -> list[str]:
    """The `split` docstrings cut into passages of at most `max_chars` characters (bytes: ASCII).

    Docstrings repeat paragraphs (parse_qs and parse_qsl, say), so an eval passage that also
    occurs in train is dropped: the held-out split holds no passage the model trained on.
    """
    if split not in SPLITS:
        raise ValueError(f"prose split {split!r}: expected one of {SPLITS}")
    return list(_split_passages(max_chars, path)[split])


@functools.lru_cache(maxsize=4)
def _split_passages(max_chars: int, path: Path) -> dict[str, tuple[str, ...]]:
    out = {s: [p for doc in documents(path) if split_of(doc["source"]) == s for p in chunk(doc["text"], max_chars)]
           for s in SPLITS}
    trained = set(out["train"])
    out["eval"] = [p for p in out["eval"] if p not in trained]
    return {s: tuple(v) for s, v in out.items()}
