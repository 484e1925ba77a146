"""The toy model's own small byte-level BPE vocabulary, in CLIP's file layout.

CLIP's vocabulary has 49,408 tokens; a token embedding that size would be most of the
toy model. This one has CLIP's 512 byte tokens (each byte, and each byte ending a
word, ``"</w>"``), one merge chain per word of :data:`WORDS` so each of those words is
a single token, and the start and end tokens, the end token last: the text tower
pools at the largest id. Any other text still tokenizes, byte by byte.
:func:`write_tokenizer` writes ``vocab.json``, ``merges.txt`` and
``tokenizer_config.json``, which :meth:`gem_jax.tokenizer.Tokenizer.from_dir` reads.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import pre_tokenizers

from gem_jax.tokenizer import Tokenizer
from gem_jax.toy import scenes

#: Token positions of the toy text tower: a start token, at most 14 caption tokens, the end token.
CONTEXT_LENGTH = 16
SOT, EOT = "<start_of_text>", "<end_of_text>"
_SUFFIX = "</w>"
#: Words that are one token each: the scene vocabulary, the words of the captions, and a
#: few common prompt-template words (untrained unless captions use them).
WORDS = tuple(dict.fromkeys(
    ["a", "an", "and", "on", "the", "of", "photo", "in", "with", "there", "is", "picture", "scene",
     "background", "object", "shape"]
    + list(scenes.BACKGROUNDS) + list(scenes.COLOURS) + list(scenes.SHAPES)))


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in code-point order (as CLIP's vocabulary)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and merges making each of ``words`` one token."""
    symbols = _byte_symbols()
    tokens = symbols + [s + _SUFFIX for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"vocabulary words are ASCII letters, got {word!r}")
        parts = list(word[:-1]) + [word[-1] + _SUFFIX]
        parts = _apply(parts, ranks)
        # Then join what is left from the left until the word is one token.
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            parts = _apply(parts, ranks)
    tokens += [SOT, EOT]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _apply(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer applies it: merge the best-ranked adjacent pair until none applies."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_tokenizer(directory, context_length: int = CONTEXT_LENGTH) -> pathlib.Path:
    """Writes the toy vocabulary's ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``
    into ``directory`` (created if needed); returns it."""
    vocab, merges = build()
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": SOT, "eos_token": EOT, "unk_token": EOT,
              "pad_token": EOT, "model_max_length": context_length}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return d


def tokenizer(context_length: int = CONTEXT_LENGTH):
    """A :class:`gem_jax.tokenizer.Tokenizer` of the toy vocabulary."""
    vocab, merges = build()
    return Tokenizer(vocab, merges, SOT, EOT, context_length)
