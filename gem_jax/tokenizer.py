"""CLIP byte-level BPE tokenizer, offline, giving the same ids as open_clip 2.23's `SimpleTokenizer`."""

# How the ids are made (checked against open_clip on every Unicode code point in several contexts
# and on ~350k words while writing this; tests/test_tokenizer.py keeps a corpus and a random check):
#   1. text cleaning as open_clip does it: ftfy.fix_text, html.unescape twice, strip, runs of
#      whitespace to one space, lower case;
#   2. splitting into words with CLIP's pattern, compiled by the `regex` package with the same
#      IGNORECASE flag. (The `tokenizers` library's own Split pre-tokenizer uses Oniguruma, whose
#      Unicode tables and case-insensitive classes differ from `regex` on a few code points, e.g.
#      U+0345 and letters new in Unicode 17, so the split is done here in Python, as open_clip
#      does it, instead);
#   3. byte-level mapping and BPE merges by the `tokenizers` library (ByteLevel pre-tokenizer,
#      BPE model with end_of_word_suffix "</w>"), one word at a time, cached per word;
#   4. [sot] + ids + [eot], cut to `context_length` keeping eot last, zero padded.
# The literal texts "<start_of_text>" and "<end_of_text>" become the start/end ids where CLIP's
# pattern matches them as a whole, as in open_clip, also for vocabularies whose files name those
# tokens "<|startoftext|>" / "<|endoftext|>" (transformers' names, which are plain text here).

from __future__ import annotations

import gzip
import html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models as _models
from tokenizers import pre_tokenizers as _pre_tokenizers

__all__ = ["Tokenizer", "clean_text", "first_duplicate", "DEFAULT_CONTEXT_LENGTH"]

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The .gz holds a version line then merges; CLIP uses the first 49152 - 256 - 2 of them so that
# 2 * 256 byte tokens + merges + 2 specials = 49408 ids.
_N_MERGES = 49152 - 256 - 2
_WORD_SUFFIX = "</w>"
_SOT_NAMES = ("<start_of_text>", "<|startoftext|>")
_EOT_NAMES = ("<end_of_text>", "<|endoftext|>")
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = regex.compile(r"\s+")
_CACHE_LIMIT = 100_000


def clean_text(text: str) -> str:
    """Normalise a prompt the way open_clip does before BPE.

    Repairs mojibake and odd Unicode with ftfy, unescapes HTML entities twice, collapses runs of
    whitespace to single spaces, strips the ends and lower-cases.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def first_duplicate(texts) -> tuple[str, str] | None:
    """The first pair ``(earlier, later)`` of ``texts`` that the model cannot tell apart (equal
    after :func:`clean_text`: case, spacing, HTML entities), or ``None``."""
    seen: dict[str, str] = {}
    for t in texts:
        key = clean_text(t)
        if key in seen:
            return seen[key], t
        seen[key] = t
    return None


def _shipped_vocab_path():
    """The CLIP vocabulary shipped in the package, as an importlib.resources Traversable."""
    return resources.files("gem_jax") / "data" / VOCAB_FILE


@lru_cache(maxsize=1)
def _shipped_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Read the shipped .gz into CLIP's token -> id table and merge list."""
    lines = gzip.decompress(_shipped_vocab_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(_merge_pair(line) for line in lines[1:1 + _N_MERGES])
    if len(merges) != _N_MERGES:
        raise ValueError(f"{VOCAB_FILE}: expected {_N_MERGES} merges, found {len(merges)}")
    # Byte symbols in code-point order, then their end-of-word forms, then one token per merge.
    symbols = sorted(_pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + _WORD_SUFFIX for s in symbols] + ["".join(m) for m in merges]
    tokens += [_SOT_NAMES[0], _EOT_NAMES[0]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{VOCAB_FILE}: duplicate tokens")
    return vocab, merges


def _merge_pair(line: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"malformed BPE merge line: {line!r}")
    return parts[0], parts[1]


def _token_name(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """CLIP's byte-level BPE tokenizer, ids identical to open_clip's `SimpleTokenizer`.

    Calling it on a string or a list of strings gives an int32 array of shape
    (N, context_length): start token, BPE ids, end token, zero padding. Too-long texts are cut to
    `context_length` tokens with the end token kept as the last one.

    Build it with `Tokenizer.default()` (the vocabulary shipped in the package) or
    `Tokenizer.from_dir(path)` (vocabulary files of a transformers checkpoint).
    """

    def __init__(self, vocab: dict[str, int], merges: Iterable[tuple[str, str]],
                 sot_token: str = _SOT_NAMES[0], eot_token: str = _EOT_NAMES[0],
                 context_length: int = DEFAULT_CONTEXT_LENGTH):
        """Build from a CLIP vocabulary.

        Args:
          vocab: token -> id, byte-level tokens with "</w>" marking word ends, specials included.
          merges: BPE merges, highest priority first.
          sot_token, eot_token: names of the start and end tokens in `vocab`.
          context_length: length of the rows `__call__` returns.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        for name in (sot_token, eot_token):
            if name not in vocab:
                raise ValueError(f"special token {name!r} is not in the vocabulary")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.sot_token, self.eot_token = sot_token, eot_token
        self.sot_token_id = self.vocab[sot_token]
        self.eot_token_id = self.vocab[eot_token]
        self.context_length = int(context_length)
        # Written in a text, open_clip's names stand for the start/end ids whatever the vocabulary
        # files call those tokens, so every vocabulary file layout gives open_clip's ids.
        self._specials = {_SOT_NAMES[0]: self.sot_token_id, _EOT_NAMES[0]: self.eot_token_id}
        self._pattern = regex.compile(
            "|".join(regex.escape(s) for s in self._specials) + "|" + _WORD_PATTERN, regex.IGNORECASE)
        bpe = _HFTokenizer(_models.BPE(
            vocab=self.vocab, merges=self.merges, dropout=None, continuing_subword_prefix="",
            end_of_word_suffix=_WORD_SUFFIX, fuse_unk=False))
        # Words arrive already split; the library only maps bytes to symbols and applies merges.
        bpe.pre_tokenizer = _pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._bpe = bpe
        self._word_ids: dict[str, list[int]] = dict(self._specials_as_words())

    def _specials_as_words(self):
        return ((name, [i]) for name, i in self._specials.items())

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408 for CLIP)."""
        return len(self.vocab)

    # ----------------------------------------------------------------------------- building
    @classmethod
    def default(cls, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """The tokenizer for the CLIP vocabulary shipped with gem_jax (no download, no open_clip).

        Built once per `context_length` and shared: do not mutate the returned object.
        """
        return _default_tokenizer(cls, int(context_length))

    @staticmethod
    def has_files(path) -> bool:
        """Whether directory `path` holds transformers tokenizer files (tokenizer.json, or
        vocab.json and merges.txt)."""
        p = Path(path)
        return p.is_dir() and ((p / "tokenizer.json").is_file()
                               or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()))

    @classmethod
    def from_dir(cls, path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """Load the vocabulary of a transformers CLIP checkpoint directory.

        Reads tokenizer.json (BPE model with "</w>" word ends) or else vocab.json + merges.txt;
        start/end tokens come from tokenizer_config.json's bos/eos tokens when present, else the
        usual CLIP names. Only the vocabulary and merges are taken: text cleaning and splitting
        are always open_clip's, so ids match `Tokenizer.default()` for the same vocabulary.

        Raises:
          FileNotFoundError: the directory holds none of those files.
          ValueError: the files are not a CLIP byte-level BPE vocabulary.
        """
        p = Path(path)
        if not cls.has_files(p):
            found = sorted(x.name for x in p.iterdir()) if p.is_dir() else None
            where = f"directory {str(p)!r} (contains: {', '.join(found) or 'nothing'})" if found is not None \
                else f"{str(p)!r}, which is not a directory"
            raise FileNotFoundError(
                f"No tokenizer files in {where}: expected tokenizer.json, or vocab.json together with "
                "merges.txt, as written by transformers' CLIPTokenizer.save_pretrained or "
                "gem_jax Tokenizer.save. Use Tokenizer.default() for the built-in CLIP vocabulary.")
        if (p / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(p / "tokenizer.json")
        else:
            vocab, merges = _read_vocab_merges(p / "vocab.json", p / "merges.txt")
        config = {}
        if (p / "tokenizer_config.json").is_file():
            config = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        sot = _pick_special(vocab, _token_name(config.get("bos_token")), _SOT_NAMES, "start", p)
        eot = _pick_special(vocab, _token_name(config.get("eos_token")), _EOT_NAMES, "end", p)
        return cls(vocab, merges, sot, eot, context_length)

    def save(self, directory) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (transformers' CLIPTokenizer
        layout) into `directory`, created if needed; `Tokenizer.from_dir` reads them back."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        by_id = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        (d / "vocab.json").write_text(json.dumps(by_id, ensure_ascii=False), encoding="utf-8")
        (d / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "bos_token": self.sot_token,
                  "eos_token": self.eot_token, "unk_token": self.eot_token,
                  "pad_token": self.eot_token, "model_max_length": self.context_length}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens or truncation."""
        return self._encode_many([text])[0]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize a text or a sequence of texts.

        Returns:
          int32 array (N, context_length): [sot] + ids + [eot] then zeros; a text too long is
          cut to context_length tokens whose last one is eot.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        out = np.zeros((len(texts), length), dtype=np.int32)
        for row, ids in zip(out, self._encode_many(texts)):
            ids = ids[:length - 2]
            row[0] = self.sot_token_id
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = self.eot_token_id
        return out

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        words = (self._pattern.findall(clean_text(t)) for t in texts)
        return [[i for w in ws for i in self._word_ids_of(w)] for ws in words]

    def _word_ids_of(self, word: str) -> list[int]:
        ids = self._word_ids.get(word)
        if ids is None:
            if len(self._word_ids) >= _CACHE_LIMIT:
                self._word_ids.clear()
                self._word_ids.update(self._specials_as_words())
            ids = self._bpe.encode([word], is_pretokenized=True, add_special_tokens=False).ids
            self._word_ids[word] = ids
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"sot={self.sot_token!r}, eot={self.eot_token!r})")


@lru_cache(maxsize=None)
def _default_tokenizer(cls, context_length: int) -> Tokenizer:
    vocab, merges = _shipped_vocab()
    return cls(vocab, merges, _SOT_NAMES[0], _EOT_NAMES[0], context_length)


def _read_tokenizer_json(file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{file}: not a BPE tokenizer (model type {model.get('type')!r})")
    suffix = model.get("end_of_word_suffix")
    if suffix not in (None, _WORD_SUFFIX):
        raise ValueError(f"{file}: end_of_word_suffix is {suffix!r}, CLIP's BPE uses {_WORD_SUFFIX!r}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    merges = [_merge_pair(m) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
    return vocab, merges


def _read_vocab_merges(vocab_file: Path, merges_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return vocab, [_merge_pair(line) for line in lines if line.strip()]


def _pick_special(vocab, configured: str | None, names: tuple[str, ...], role: str, where) -> str:
    candidates = ((configured,) if configured else ()) + names
    for name in candidates:
        if name in vocab:
            return name
    raise ValueError(f"{os.fspath(where)}: no {role}-of-text token in the vocabulary "
                     f"(looked for {', '.join(map(repr, candidates))})")
