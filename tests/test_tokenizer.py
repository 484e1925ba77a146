"""Tests of gem_jax.tokenizer: ids against open_clip, truncation, directories, the shipped vocabulary."""

import gzip
import hashlib
import importlib.resources
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gem_jax.tokenizer import Tokenizer, clean_text

SOT, EOT = 49406, 49407

LONG_1 = " ".join(f"word{i} and another-thing, number {i}!" for i in range(40))  # well over 77 tokens
LONG_2 = ("a very detailed photograph showing " + "the small red vehicle registration plate on a car " * 15).strip()
LONG_3 = " ".join(["café"] * 120)
LONG_4 = "日本語のテキスト、" * 30
LONG_5 = " ".join("The Quick Brown Fox Jumps Over The Lazy Dog".split() * 12)  # 108 words

BASE_PROMPTS = [
    "", " ", "   \t\n  ", "a", "A", "cat", "a photo of a cat.", "a photo of a {}.",
    "vehicle registration plate", "a photo of a vehicle registration plate.",
    "Vehicle Registration Plate", "VEHICLE REGISTRATION PLATE", "vehicle  registration\tplate\n",
    # accents, composed and decomposed, and non-Latin scripts
    "café crème", "Café Crème", "CAFÉ CRÈME", "cafe\u0301 cre\u0300me", "naïve façade", "über straße",
    "STRASSE ß", "İstanbul", "ΟΔΟΣ ΣΟΦΟΣ", "σοφός", "Ελληνικά", "crème brûlée à la française",
    "Ærøskøbing", "piñata jalapeño", "Dvořák", "Łódź", "x\u0345y", "\u0345", "α\u0345",
    "日本語のテキスト", "猫の写真", "一只猫的照片", "고양이 사진", "фото кошки", "صورة قطة",
    "बिल्ली की तस्वीर", "รูปแมว", "ひらがな カタカナ 漢字",
    # emoji: plain, skin tones, zero-width joiners, flags, keycaps
    "hello 😀 world", "😀😃😄", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🇫🇷 flag", "1️⃣ one", "a 🐱 on a 🛋️",
    "❤️", "🍕🍔🍟 fast food",
    # html entities, including double-escaped ones
    "fish &amp; chips", "fish &amp;amp; chips", "<p>fish &amp;amp; chips</p>", "a < b &amp;amp; c", "&lt;b&gt;bold&lt;/b&gt;", "&quot;quoted&quot;",
    "&#39;apostrophe&#39;", "&#x263A; smile", "caf&eacute;", "5 &gt; 3 &lt; 4", "&nbsp;space&nbsp;",
    "AT&T", "&unknown; entity", "&amp", "a&b", "<b>bold</b>", "<i>italics</i> & <u>more</u>",
    # whitespace of all kinds
    "multiple   spaces", "tab\tseparated\tvalues", "new\nline", "carriage\r\nreturn",
    "  leading and trailing  ", "non\u00a0breaking space", "zero\u200bwidth space", "em\u2003space",
    "ideographic\u3000space", "\t\ttabs only\t\t", "line\u2028separator", "vertical\x0btab",
    # punctuation and digits
    "Hello, World!", "What's this?!", "wait... what???", "!!!", "???", "...", "--", "@#$%^&*()",
    "(parentheses) [brackets] {braces}", "semi;colon:colon", "back\\slash/slash", "under_score_name",
    "pipe|separated|words", "tilde~and`backtick", "100%", "$19.99", "€50 or £40 or ¥100", "3.14159",
    "1,000,000", "2nd place", "the 1990s", "10:30 am", "2024-01-31", "+1 (555) 123-4567", "#hashtag",
    "@mention", "e-mail: someone@example.com", "https://example.com/path?q=1&r=2", "C++ and C#",
    "x^2 + y^2 = z^2", "½ cup", "Ⅻ roman", "①②③", "٣ arabic digit", "४ devanagari digit",
    # contractions and quotes, straight and curly
    "don't", "DON'T", "I'll", "I'LL BE BACK", "it's", "It’s", "we're", "they've", "I'm", "he'd",
    "‘single’ “double”", "l'amour", "rock 'n' roll", "''quoted''", "'s", "'S", "o'clock",
    # hyphens and dashes
    "state-of-the-art", "well-known", "mother-in-law", "t-shirt", "x-ray", "e—m dash", "en–dash",
    "self‐aware", "non-breaking‑hyphen", "- leading hyphen", "trailing hyphen -",
    # mixed casing
    "iPhone", "McDonald's", "eBay", "NASA", "CamelCaseWords", "snake_case_words", "ALL CAPS TEXT",
    "mIxEd CaSe", "O'Neil", "TÜV", "DžUNGLA ǅungla",
    # ftfy repairs: mojibake, ligatures, full-width, curly quotes, control characters
    "cafÃ©", "Ã©tÃ©", "ﬁsh ﬂour", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "tab\x00null", "bell\x07char",
    "soft\u00adhyphen", "\ufeffbom at start", "a\u200db",
    # literal special-token names
    "<start_of_text>", "<end_of_text>", "x <end_of_text> y", "a<start_of_text>b", ".<start_of_text>",
    "x<<end_of_text>", "<START_OF_TEXT>", "&lt;start_of_text&gt;", "<|startoftext|>", "<|endoftext|>",
    # typical prompt templates
    "a bad photo of a dog.", "a photo of many birds.", "a sculpture of a horse.", "a rendering of a car.",
    "graffiti of a boat.", "a tattoo of a butterfly.", "the embroidered teddy bear.",
    "a plastic traffic light.", "a photo of the hard to see fire hydrant.", "itap of a stop sign.",
    LONG_1, LONG_2, LONG_3, LONG_4, LONG_5,
]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of my {}!", "{}", "A {} in the wild?",
             "there is a {} here", "a close-up of the {}'s details"]
CLASSES = ["vehicle registration plate", "café crème", "hot-air balloon", "Teddy Bear", "person",
           "traffic light", "😀", "猫", "mother-in-law", "fish &amp; chips", "Ærøskøbing", "wine glass",
           "t-shirt", "New York City", "aeroplane"]


def corpus():
    """Hand-written prompts plus template x class combinations, without repeats."""
    return list(dict.fromkeys(BASE_PROMPTS + [t.format(c) for t in TEMPLATES for c in CLASSES]))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def reference(open_clip):
    return open_clip.get_tokenizer("ViT-B-16")


def reference_ids(reference, texts, context_length=77):
    return reference(texts, context_length=context_length).numpy()


def test_corpus_is_large_and_varied():
    texts = corpus()
    assert len(texts) >= 200
    assert sum(len(t.split()) >= 100 for t in texts) >= 3


def test_matches_open_clip_on_corpus(tok, reference):
    texts = corpus()
    ours = tok(texts)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    ref = reference_ids(reference, texts)
    mismatched = [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ from open_clip, e.g. {mismatched[:5]}"


def test_matches_open_clip_one_by_one(tok, reference):
    for text in BASE_PROMPTS[:60]:
        np.testing.assert_array_equal(tok(text), reference_ids(reference, text), err_msg=repr(text))


@pytest.mark.parametrize("context_length", [2, 5, 16, 33])
def test_matches_open_clip_with_short_context(reference, context_length):
    tok = Tokenizer.default(context_length)
    texts = corpus()
    np.testing.assert_array_equal(tok(texts), reference_ids(reference, texts, context_length))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.text(alphabet="aAéÉ ß1'’.-&;#x\t\n\u00a0😀猫<>_", max_size=40),
    st.sampled_from(["&amp;", "&lt;", "&#39;", "'s", "'LL", "<start_of_text>", "<end_of_text>", "Ã©"]),
), max_size=8).map("".join))
def test_matches_open_clip_on_random_text(tok, reference, text):
    np.testing.assert_array_equal(tok(text), reference_ids(reference, text), err_msg=repr(text))


def test_known_ids_without_open_clip(tok):
    expected = {
        "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
        "café crème": [15304, 1075, 12138, 614],
        "vehicle registration plate": [5299, 7302, 5135],
        "Fish &amp; Chips": [2759, 261, 8855],
        "it’s": [585, 568],
        "": [],
    }
    ids = tok(list(expected))
    for row, (text, body) in zip(ids, expected.items()):
        want = [SOT, *body, EOT] + [0] * (77 - len(body) - 2)
        assert row.tolist() == want, text


def test_sot_eot_and_vocab_size(tok):
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)
    assert tok.vocab_size == 49408
    assert tok.context_length == 77


def test_cleaning():
    assert clean_text("  Café\t\tCRÈME &amp;amp; Co  ") == "café crème & co"
    assert clean_text("it’s ﬁne") == "it's fine"


@pytest.mark.parametrize("text", [LONG_1, LONG_2, LONG_3, LONG_4, LONG_5])
def test_truncation_keeps_eot_last(tok, text):
    full = tok.encode(text)
    assert len(full) > 75
    row = tok(text)[0]
    assert row.shape == (77,)
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1].tolist() == full[:75]
    assert EOT not in row[:-1] and 0 not in row


def test_custom_context_length(tok):
    tok16 = Tokenizer.default(context_length=16)
    assert tok16.context_length == 16
    ids = tok16([LONG_1, "a photo of a cat.", ""])
    assert ids.shape == (3, 16) and ids.dtype == np.int32
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and 0 not in ids[0]
    assert ids[0, 1:-1].tolist() == tok.encode(LONG_1)[:14]
    np.testing.assert_array_equal(ids[1:], tok(["a photo of a cat.", ""])[:, :16])
    # exactly full, and one token over
    body = tok.encode("a photo of a cat.")  # 6 ids
    exact = Tokenizer.default(len(body) + 2)("a photo of a cat.")[0].tolist()
    assert exact == [SOT, *body, EOT]
    over = Tokenizer.default(len(body) + 1)("a photo of a cat.")[0].tolist()
    assert over == [SOT, *body[:-1], EOT]


def test_word_cache_limit(tok, monkeypatch):
    import gem_jax.tokenizer as module
    monkeypatch.setattr(module, "_CACHE_LIMIT", 5)
    small = Tokenizer(tok.vocab, tok.merges)
    np.testing.assert_array_equal(small(corpus()), tok(corpus()))
    assert len(small._word_ids) <= 5


def test_default_is_cached():
    assert Tokenizer.default() is Tokenizer.default(77)
    assert Tokenizer.default(16) is not Tokenizer.default(77)


def test_empty_batch(tok):
    assert tok([]).shape == (0, 77)


# ----------------------------------------------------------------------------- directories
def assert_same_ids(a, b):
    texts = corpus()
    assert (a.sot_token_id, a.eot_token_id) == (b.sot_token_id, b.eot_token_id)
    np.testing.assert_array_equal(a(texts), b(texts))


def test_save_then_from_dir(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert Tokenizer.has_files(tmp_path / "tok")
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "tok"))
    loaded = Tokenizer.from_dir(tmp_path / "tok")
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert_same_ids(loaded, tok)
    short = Tokenizer.from_dir(tmp_path / "tok", context_length=16)
    np.testing.assert_array_equal(short(corpus()), Tokenizer.default(16)(corpus()))


def hf_vocab(tok):
    """The vocabulary with transformers' names for the special tokens, as in openai/clip-vit-* on the Hub."""
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    return {rename.get(k, k): v for k, v in tok.vocab.items()}


def test_from_transformers_save_pretrained(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    classes = {transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)}
    for i, cls in enumerate(classes):
        hf = cls(vocab=hf_vocab(tok), merges=tok.merges)
        assert hf("a photo of a cat.")["input_ids"] == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
        hf.save_pretrained(tmp_path / str(i))
        assert Tokenizer.has_files(tmp_path / str(i))
        loaded = Tokenizer.from_dir(tmp_path / str(i))
        assert loaded.sot_token == "<|startoftext|>" and loaded.eot_token == "<|endoftext|>"
        assert_same_ids(loaded, tok)


def test_from_hub_style_vocab_and_merges(tok, tmp_path):
    # vocab.json + merges.txt with a "#version" header, no tokenizer.json and no config
    (tmp_path / "vocab.json").write_text(json.dumps(hf_vocab(tok)), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tok.merges) + "\n",
                                         encoding="utf-8")
    assert Tokenizer.has_files(tmp_path)
    assert_same_ids(Tokenizer.from_dir(tmp_path), tok)


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = ["a photo of a cat.", "vehicle registration plate", "state-of-the-art c++ 3.14"]
    for text, row in zip(texts, tok(texts)):
        assert hf(text)["input_ids"] == row[row != 0].tolist()


def test_from_dir_without_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    assert not Tokenizer.has_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt") as err:
        Tokenizer.from_dir(tmp_path)
    assert "config.json" in str(err.value) and "Tokenizer.default()" in str(err.value)
    assert not Tokenizer.has_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_from_dir_rejects_other_tokenizers(tmp_path):
    spec = {"model": {"type": "WordPiece", "vocab": {"a": 0}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="not a BPE tokenizer"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------- shipped vocabulary
def shipped_vocab():
    return importlib.resources.files("gem_jax") / "data" / "bpe_simple_vocab_16e6.txt.gz"


def test_shipped_vocab_is_package_data():
    vocab = shipped_vocab()
    assert vocab.is_file()
    lines = gzip.decompress(vocab.read_bytes()).decode("utf-8").split("\n")
    assert "#version" in lines[0]
    assert len(lines) > 49152 - 256 - 2
    notice = (importlib.resources.files("gem_jax") / "data" / "LICENSE-bpe-vocab.txt").read_text()
    assert "MIT License" in notice and "Copyright (c) 2021 OpenAI" in notice


def test_shipped_vocab_is_open_clips(open_clip):
    theirs = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with open(theirs, "rb") as f:
        assert hashlib.sha256(shipped_vocab().read_bytes()).digest() == hashlib.sha256(f.read()).digest()


def test_works_without_open_clip_or_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["open_clip"] = None  # any import of open_clip now fails
        sys.modules["torch"] = None
        from gem_jax.tokenizer import Tokenizer
        print(Tokenizer.default()("a photo of a cat.")[0, :8].tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([SOT, 320, 1125, 539, 320, 2368, 269, EOT])
