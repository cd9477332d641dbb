"""Tokenizers behind one small interface: a built-in byte tokenizer and any HF tokenizer.json.

Id layout of `ByteTokenizer` (chosen so a token id *is* the byte value, which keeps data
readable and makes the Hugging Face twin trivially identical):

    0..255  the raw bytes
    256     PAD  "<|pad|>"
    257     BOS  "<|bos|>"
    258     EOS  "<|eos|>"
    vocab_size = 259

`encode` never adds specials (the pipeline adds BOS/EOS where it wants them). `decode`
drops specials. Text is UTF-8 with ``surrogateescape``, so ``decode(ids,
errors="surrogateescape")`` inverts `encode` for every byte sequence; `encode_bytes` /
`decode_bytes` do the same on raw bytes.

`ByteTokenizer.to_hf_tokenizer()` builds a `tokenizers.Tokenizer` (byte-level BPE with no
merges, GPT-2 byte alphabet) giving the same ids, and `save_pretrained` writes it as
``tokenizer.json`` (+ ``tokenizer_config.json``) so exported checkpoints carry their tokenizer.
One known difference: a text that literally contains a special-token string such as
``<|eos|>`` maps to the special id in the HF twin but to its bytes here.

`HFTokenizer` wraps any ``tokenizer.json`` (e.g. of a pretrained MoE) behind the same
`Tokenizer` protocol; `load_tokenizer("byte" | path)` picks one.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import tokenizers

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"

# Special-token strings tried, in order, when a tokenizer.json says nothing about its roles.
_EOS_CANDIDATES = ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>",
                   "<｜end▁of▁sentence｜>")
_BOS_CANDIDATES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, which HF's ByteLevel uses."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus PAD/BOS/EOS (see module docstring)."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogateescape"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids`, specials dropped; ids outside the vocabulary are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < BYTE_VOCAB_SIZE]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the byte vocabulary [0, {BYTE_VOCAB_SIZE})")
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD unless errors="surrogateescape"."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def to_hf_tokenizer(self) -> tokenizers.Tokenizer:
        """An equivalent `tokenizers.Tokenizer`: same ids for every text and every special."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)])
        ids = [tok.token_to_id(t) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)]
        assert ids == [PAD_ID, BOS_ID, EOS_ID], ids
        return tok

    def save_pretrained(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Write tokenizer.json and tokenizer_config.json (loadable by HF and `load_tokenizer`)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_hf_tokenizer().save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN, "model_max_length": 1_000_000, "add_bos_token": False,
            "add_eos_token": False, "moe_jax_tokenizer": "byte",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory / "tokenizer.json"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from a tokenizer.json) behind the `Tokenizer` protocol."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None):
        self.tok = tok
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | pathlib.Path, eos: str | None = None, bos: str | None = None,
                  pad: str | None = None) -> HFTokenizer:
        """Load tokenizer.json (or a directory holding one); special roles come from the
        arguments, else tokenizer_config.json beside it, else well-known token names."""
        from tokenizers import Tokenizer as RawTokenizer

        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {str(path)!r}")
        tok = RawTokenizer.from_file(str(file))
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def role(given: str | None, key: str, candidates: Sequence[str]) -> int | None:
            names = [given] if given is not None else [_token_name(config.get(key)), *candidates]
            for name in names:
                if name is not None and tok.token_to_id(name) is not None:
                    return tok.token_to_id(name)
            if given is not None:
                raise ValueError(f"token {given!r} ({key}) is not in the vocabulary of {str(file)!r}")
            return None

        eos_id = role(eos, "eos_token", _EOS_CANDIDATES)
        if eos_id is None:
            raise ValueError(f"cannot tell the EOS token of {str(file)!r}; pass eos='<token>'")
        bos_id, pad_id = role(bos, "bos_token", _BOS_CANDIDATES), role(pad, "pad_token", _PAD_CANDIDATES)
        return cls(tok, eos_id, bos_id, pad_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save_pretrained(self, directory: str | pathlib.Path) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        return directory / "tokenizer.json"


def _token_name(entry: object) -> str | None:
    """tokenizer_config.json stores a special as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def load_tokenizer(spec: str | pathlib.Path = "byte") -> Tokenizer:
    """"byte" -> `ByteTokenizer`; a tokenizer.json path or a directory holding one -> `HFTokenizer`."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec)
