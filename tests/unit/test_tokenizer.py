"""Tests for gptkit.tokenizer: exact round-trips, streaming bytes, files, and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import gptkit.tokenizer.bpe as bpe_module
from gptkit.errors import TokenizerError
from gptkit.tokenizer import (
    EOT_TOKEN,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from gptkit.tokenizer.char import char_tokenizer_from_hf

# -- corpora ----------------------------------------------------------------------------------

_WORDS = (
    "the a an king queen castle river forest night day light dark stone sword horse rider "
    "would could should never always again before after under over into through with without "
    "speak hear see know think love fear hope dream sleep wake walk run ride fight fall rise "
    "old young good bad great small long short first last other every each many much more"
).split()


def english_text(n_sentences: int, seed: int) -> str:
    """Deterministic English-like sentences, one per line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        end = rng.choice([".", ".", "!", "?", ","])
        lines.append(" ".join(words).capitalize() + end)
    return "\n".join(lines) + "\n"


TRAIN_TEXT = english_text(400, seed=0)  # ~25 KB
HELD_OUT_TEXT = english_text(20, seed=1)
BPE_VOCAB = 400

HARD_STRINGS = [
    "",
    "a",
    " ",
    "  leading and trailing spaces  ",
    "\n\n\nnewlines\n",
    "\r\n windows \r\n line \r endings",
    "tabs\tand\x0bvertical\x0cfeeds",
    "".join(chr(i) for i in range(0x20)) + "\x7f",  # every C0 control character and DEL
    "line\u2028separator\u2029paragraph\x85next line",
    "nbsp\u00a0ideographic\u3000space\u200bzero width",
    "caf\u00e9 vs cafe\u0301 (combining acute)",
    "Z\u0351\u0300\u0301\u0302\u0303a\u0304\u0305lgo",  # stacked combining marks
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",  # CJK + Hangul
    "\U0001F600\U0001F602\U0001F923 emoji",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 family (ZWJ sequence)",
    "\U0001F1EF\U0001F1F5\U0001F1FA\U0001F1F8 flags",
    "\U0001F44D\U0001F3FD skin tone, \u2764\ufe0f variation selector",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u202eRTL override\u202c",
    "\U00010348 gothic \U0001D11E music \U0010FFFD private use plane 16 \uFFFF noncharacter",
    "\x00nul\x00 in the middle\x00",
    EOT_TOKEN,
    f"doc one{EOT_TOKEN}doc two{EOT_TOKEN}",
    f"<|endoftext|<|endoftext|>|> <|endoftext> {EOT_TOKEN}{EOT_TOKEN}",
    "It's, don't, we'll, they've - I'm 42 3.14159 $100 #tag @user https://x.y/z?a=1&b=2",
    "Mixed: \u00e9\u65e5\U0001F600\x01 \t\u2028" + EOT_TOKEN + "\u0301end",
    "spaces    before\n    indentation\n\t\tand tabs   \n   ",
]


def random_text(rng: random.Random, length: int) -> str:
    """Random text over many Unicode blocks (never surrogates), sometimes with EOT."""
    ranges = [
        (0x00, 0x7F),  # ASCII including controls
        (0x80, 0x24F),  # C1 controls, Latin-1, Latin extended
        (0x300, 0x36F),  # combining marks
        (0x2000, 0x206F),  # general punctuation: odd spaces, ZWJ, separators
        (0x3000, 0x30FF),  # CJK punctuation, kana
        (0x4E00, 0x9FFF),  # CJK ideographs
        (0xE000, 0xFFFF),  # private use ... specials
        (0x1F000, 0x1FAFF),  # emoji and symbols
        (0x10000, 0x10FFFF),  # anything in the supplementary planes
    ]
    out = []
    for _ in range(length):
        if rng.random() < 0.02:
            out.append(EOT_TOKEN)
            continue
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


FUZZ_STRINGS = [random_text(random.Random(seed), random.Random(seed).randint(0, 60)) for seed in range(300)]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return train_char_tokenizer([TRAIN_TEXT])


@pytest.fixture(scope="module")
def bpe_tok() -> BPETokenizer:
    return train_bpe_tokenizer([TRAIN_TEXT], BPE_VOCAB)


@pytest.fixture(scope="module")
def char_tok_on_hard_strings() -> CharTokenizer:
    """A char tokenizer that has the hard strings' characters in its vocabulary (emoji, CJK,
    combining marks as their own ids), so they round-trip without the byte fallback."""
    return train_char_tokenizer([TRAIN_TEXT, *HARD_STRINGS])


@pytest.fixture(params=["char", "char-trained-on-them", "bpe"])
def tok(request, char_tok, char_tok_on_hard_strings, bpe_tok) -> Tokenizer:
    return {"char": char_tok, "char-trained-on-them": char_tok_on_hard_strings, "bpe": bpe_tok}[request.param]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HARD_STRINGS, ids=range(len(HARD_STRINGS)))
def test_round_trip_hard_strings(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok: Tokenizer) -> None:
    for text in FUZZ_STRINGS:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_round_trip_training_text(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode(TRAIN_TEXT)) == TRAIN_TEXT


def test_literal_eot_text_becomes_eot_token(tok: Tokenizer) -> None:
    assert tok.encode(EOT_TOKEN) == [tok.eot_id]
    assert tok.decode([tok.eot_id]) == EOT_TOKEN
    ids = tok.encode(f"a{EOT_TOKEN}b")
    assert ids.count(tok.eot_id) == 1


def test_encode_array_matches_encode(tok: Tokenizer) -> None:
    for text in HARD_STRINGS + FUZZ_STRINGS[:50] + [TRAIN_TEXT]:
        arr = tok.encode_array(text)
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.int64 and arr.ndim == 1
        assert arr.tolist() == tok.encode(text)


def test_decode_accepts_numpy_arrays(tok: Tokenizer) -> None:
    text = "Numpy ids \u00e9\U0001F600"
    assert tok.decode(tok.encode_array(text)) == text
    assert tok.decode(tok.encode_array(text).astype(np.int32)) == text


def test_token_bytes_streaming_equals_decode(tok: Tokenizer) -> None:
    for text in HARD_STRINGS + FUZZ_STRINGS[:100]:
        ids = tok.encode(text)
        parts = [tok.token_bytes(i) for i in ids]
        assert all(isinstance(p, bytes) for p in parts)
        assert b"".join(parts).decode("utf-8") == tok.decode(ids) == text


def test_token_bytes_of_special_token(tok: Tokenizer) -> None:
    assert tok.token_bytes(tok.eot_id) == EOT_TOKEN.encode("utf-8")
    assert tok.token_bytes(np.int64(tok.eot_id)) == EOT_TOKEN.encode("utf-8")


def test_incomplete_byte_sequence_decodes_with_replacement(char_tok: CharTokenizer) -> None:
    # A model can sample a lone byte of a multi-byte character; decode must not crash.
    first_byte_of_e_acute = len(char_tok.chars) + 0xC3
    assert char_tok.decode([first_byte_of_e_acute]) == "\ufffd"


def test_lone_surrogate_is_a_tokenizer_error(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("ok \ud800 bad")


# -- character tokenizer ----------------------------------------------------------------------


def test_char_ids_are_seen_chars_in_code_point_order() -> None:
    tok = train_char_tokenizer(["hello world!", "\nHi"])
    expected = sorted(set("hello world!\nHi"))
    assert tok.chars == expected
    assert tok.encode("".join(expected)) == list(range(len(expected)))
    assert tok.encode("\n") == [0]  # '\n' has the smallest code point, as in nanoGPT
    assert tok.vocab_size == len(expected) + 256 + 1
    assert tok.eot_id == len(expected) + 256
    assert tok.kind == "char"


def test_char_training_order_does_not_matter() -> None:
    assert train_char_tokenizer(["abc", "xyz"]).chars == train_char_tokenizer(["zyx", "cba"]).chars
    assert train_char_tokenizer("abca").chars == ["a", "b", "c"]  # a bare str is one text


def test_char_unseen_characters_fall_back_to_utf8_bytes() -> None:
    tok = train_char_tokenizer(["ab"])
    n = len(tok.chars)
    assert tok.encode("a\u00e9b") == [0, n + 0xC3, n + 0xA9, 1]
    assert tok.encode("\U0001F600") == [n + b for b in "\U0001F600".encode("utf-8")]
    assert tok.decode(tok.encode("a\u00e9b\U0001F600")) == "a\u00e9b\U0001F600"


def test_char_empty_vocabulary_still_round_trips() -> None:
    tok = train_char_tokenizer([])
    assert tok.vocab_size == 257 and tok.eot_id == 256
    for text in HARD_STRINGS:
        assert tok.decode(tok.encode(text)) == text


def test_char_encode_array_on_5mb_with_unseen_characters() -> None:
    text = ("First Citizen: Before we proceed any further, hear me speak.\n" * 85_000)[:5_000_000]
    tok = train_char_tokenizer([text])
    text = text[:-10] + "\u00e9\U0001F600\u65e5" + text[-7:]  # a few unseen characters
    ids = tok.encode_array(text)
    assert len(ids) == len(text) - 3 + 2 + 4 + 3  # the unseen ones as their UTF-8 bytes
    assert tok.decode(ids.tolist()) == text


def test_char_rejects_bad_vocabularies() -> None:
    with pytest.raises(TokenizerError, match="duplicate"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(TokenizerError, match="single characters"):
        CharTokenizer(["ab"])


# -- BPE tokenizer ----------------------------------------------------------------------------


def test_bpe_vocab_size_is_honoured(bpe_tok: BPETokenizer) -> None:
    assert bpe_tok.vocab_size == BPE_VOCAB
    assert bpe_tok.hf_tokenizer.get_vocab_size(with_added_tokens=True) == BPE_VOCAB
    assert max(bpe_tok.encode(TRAIN_TEXT)) < BPE_VOCAB
    assert bpe_tok.kind == "bpe"


def test_bpe_compresses_english(bpe_tok: BPETokenizer) -> None:
    n_bytes = len(HELD_OUT_TEXT.encode("utf-8"))
    n_tokens = len(bpe_tok.encode(HELD_OUT_TEXT))
    assert n_tokens < 0.5 * n_bytes, (n_tokens, n_bytes)


def test_bpe_eot_id_matches_hf_and_is_stable(bpe_tok: BPETokenizer) -> None:
    assert bpe_tok.eot_id == bpe_tok.hf_tokenizer.token_to_id(EOT_TOKEN) == 0
    assert train_bpe_tokenizer([HELD_OUT_TEXT], 300).eot_id == bpe_tok.eot_id


def test_bpe_training_is_deterministic(bpe_tok: BPETokenizer) -> None:
    again = train_bpe_tokenizer([TRAIN_TEXT], BPE_VOCAB)
    assert again.encode(HELD_OUT_TEXT) == bpe_tok.encode(HELD_OUT_TEXT)


def test_bpe_byte_map_matches_hf_byte_level_alphabet() -> None:
    assert set(bpe_module.BYTE_TO_UNICODE.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert len(bpe_module.UNICODE_TO_BYTE) == 256


def test_bpe_ids_match_hf_encoding(bpe_tok: BPETokenizer) -> None:
    for text in HARD_STRINGS + [HELD_OUT_TEXT]:
        assert bpe_tok.encode(text) == bpe_tok.hf_tokenizer.encode(text, add_special_tokens=False).ids


def test_bpe_chunked_encoding_equals_whole_text_encoding(monkeypatch) -> None:
    # Tricky whitespace around the newlines where chunks may be cut; the tokenizer is trained
    # on the same text so that it has merges of whitespace runs ("\n\n", "  \n", ...), which
    # is what a careless cut would split differently.
    text = "".join(
        f"line {i}\n" + ("  \n" if i % 3 == 0 else "") + ("\n\n" if i % 5 == 0 else "")
        + (" indented\n" if i % 7 == 0 else "") + ("\t\n" if i % 4 == 0 else "")
        + (EOT_TOKEN + "\n" if i % 11 == 0 else "") + "\u00e9\U0001F600\nx\n"
        for i in range(300)
    )
    bpe_tok = train_bpe_tokenizer([text], BPE_VOCAB)
    assert bpe_tok.hf_tokenizer.token_to_id("\u010a\u010a") is not None  # "\n\n" was merged
    monkeypatch.setattr(bpe_module, "_CHUNK_CHARS", 40)
    assert len(list(bpe_tok._chunks(text))) > 50
    whole = bpe_tok.hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert bpe_tok.encode(text) == whole
    assert bpe_tok.decode(whole) == text


@pytest.mark.parametrize("bad", [256, 100, 0, -5, True, 300.5, "400"])
def test_bpe_rejects_nonsense_vocab_size(bad) -> None:
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe_tokenizer(["some text"], bad)


def test_bpe_rejects_negative_min_frequency() -> None:
    with pytest.raises(TokenizerError, match="min_frequency"):
        train_bpe_tokenizer(["some text"], 300, min_frequency=-1)


# -- ids out of range -------------------------------------------------------------------------


def test_decode_out_of_range_id_names_id_and_vocab_size(tok: Tokenizer) -> None:
    for bad in (tok.vocab_size, tok.vocab_size + 1000, -1):
        with pytest.raises(TokenizerError) as info:
            tok.decode([1, bad, 2])
        assert str(bad) in str(info.value) and str(tok.vocab_size) in str(info.value)
    with pytest.raises(TokenizerError, match=str(tok.vocab_size)):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(TokenizerError):
        tok.decode([1.5])
    assert tok.decode([]) == ""


# -- save and load ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["directory", "file.json"])
def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path, target: str) -> None:
    path = tmp_path / "out" / target
    tok.save(path)
    file = path if target.endswith(".json") else path / "tokenizer.json"
    assert file.is_file()
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write cleaned up

    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    for text in HARD_STRINGS + FUZZ_STRINGS[:50] + [HELD_OUT_TEXT]:
        assert loaded.encode(text) == tok.encode(text)
    assert [loaded.token_bytes(i) for i in range(tok.vocab_size)] == [
        tok.token_bytes(i) for i in range(tok.vocab_size)
    ]
    assert loaded.to_dict() == tok.to_dict()


def test_char_file_format(char_tok: CharTokenizer, tmp_path: Path) -> None:
    char_tok.save(tmp_path)
    obj = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    n = len(char_tok.chars)
    assert obj["type"] == "gptkit-char" and obj["version"] == 1
    assert obj["chars"] == char_tok.chars == sorted(obj["chars"])
    assert obj["special_tokens"] == {EOT_TOKEN: n + 256}


def test_bpe_file_is_loadable_by_hugging_face(bpe_tok: BPETokenizer, tmp_path: Path) -> None:
    bpe_tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(HELD_OUT_TEXT, add_special_tokens=False).ids == bpe_tok.encode(HELD_OUT_TEXT)
    assert hf.token_to_id(EOT_TOKEN) == bpe_tok.eot_id


def _assert_one_line_error(path: Path, *needles: str) -> None:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path.name) in message
    for needle in needles:
        assert needle in message, message


def test_load_missing_file_and_directory(tmp_path: Path) -> None:
    _assert_one_line_error(tmp_path / "nope.json", "not found")
    _assert_one_line_error(tmp_path, "no tokenizer.json")


def test_load_non_json_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"type": "gptkit-char", "chars": [', encoding="utf-8")
    _assert_one_line_error(bad, "invalid JSON")
    bad.write_bytes(b"\xff\xfe\x00binary")
    _assert_one_line_error(bad, "not UTF-8")


def test_load_json_of_unknown_shape(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("[1, 2, 3]", encoding="utf-8")
    _assert_one_line_error(bad, "JSON object")
    bad.write_text('{"hello": "world"}', encoding="utf-8")
    _assert_one_line_error(bad, "unknown tokenizer format")


def test_load_malformed_char_files(char_tok: CharTokenizer, tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    good = char_tok.to_dict()
    cases = [
        ({**good, "version": 99}, "unsupported"),
        ({**good, "chars": "abc"}, "chars"),
        (
            {**good, "chars": ["a", "bb"], "byte_fallback": {"first_id": 2, "count": 256},
             "special_tokens": {EOT_TOKEN: 258}},
            "single characters",
        ),
        ({**good, "byte_fallback": {"first_id": 0, "count": 256}}, "byte_fallback"),
        ({**good, "special_tokens": {EOT_TOKEN: 3}}, "special_tokens"),
    ]
    for obj, needle in cases:
        file.write_text(json.dumps(obj), encoding="utf-8")
        _assert_one_line_error(file, needle)


def test_load_malformed_hf_files(bpe_tok: BPETokenizer, tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    obj = bpe_tok.to_dict()
    obj["model"]["merges"] = "not a list"
    file.write_text(json.dumps(obj), encoding="utf-8")
    _assert_one_line_error(file, "malformed Hugging Face tokenizer")


def test_load_rejects_hf_tokenizers_that_are_not_exact_byte_level_bpe(tmp_path: Path) -> None:
    # A WordLevel model is not BPE.
    word = HFTokenizer(models.WordLevel({EOT_TOKEN: 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.save(str(tmp_path / "word.json"))
    _assert_one_line_error(tmp_path / "word.json", "unsupported tokenizer model")

    # A byte-level BPE that adds a prefix space does not reproduce text exactly.
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    bpe.save(str(tmp_path / "prefix.json"))
    _assert_one_line_error(tmp_path / "prefix.json", "does not reproduce text exactly")


# -- packaging --------------------------------------------------------------------------------


def test_tokenizer_package_does_not_import_torch() -> None:
    package = Path(bpe_module.__file__).parent
    for source in package.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "import torch" not in text and "from torch" not in text, source


def test_load_accepts_any_existing_file_name(char_tok: CharTokenizer, tmp_path: Path) -> None:
    char_tok.save(tmp_path / "tok.json")
    renamed = (tmp_path / "tok.json").rename(tmp_path / "my-tokenizer.txt")
    assert load_tokenizer(renamed).chars == char_tok.chars


def test_bpe_vocab_size_has_an_upper_bound() -> None:
    # Without it the Rust trainer tries to allocate per entry and aborts the whole process.
    with pytest.raises(TokenizerError, match=r"vocab_size 1099511627776 is too large \(at most 16,777,216"):
        train_bpe_tokenizer(["hello hello"], 2**40)


def test_bpe_file_whose_eot_is_not_special_is_refused(bpe_tok: BPETokenizer, tmp_path: Path) -> None:
    data = bpe_tok.to_dict()
    data["added_tokens"] = []  # hand-edited: <|endoftext|> would encode as ordinary bytes
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="is in the vocabulary but not a special"):
        load_tokenizer(path)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_lone_surrogate_is_reported_at_its_position_in_the_whole_text(char_tok, bpe_tok, kind) -> None:
    tok = char_tok if kind == "char" else bpe_tok
    with pytest.raises(TokenizerError, match="at position 14 "):
        tok.encode("x<|endoftext|>\ud800")


@pytest.mark.parametrize("normalizer", ["NFC", "NFKC"])
def test_a_unicode_normalizer_is_refused(bpe_tok: BPETokenizer, tmp_path: Path, normalizer: str) -> None:
    # Qwen2's tokenizer.json has an NFC normalizer: "e\u0301" would come back as "\u00e9".
    data = bpe_tok.to_dict()
    data["normalizer"] = {"type": normalizer}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    _assert_one_line_error(path, "does not reproduce text exactly")


# -- the character tokenizer in Hugging Face's format (model exports) -------------------------


@pytest.mark.parametrize("which", ["char", "char-trained-on-them"])
def test_char_tokenizer_in_hf_format_encodes_and_decodes_the_same(which, char_tok, char_tok_on_hard_strings) -> None:
    ours = {"char": char_tok, "char-trained-on-them": char_tok_on_hard_strings}[which]
    theirs = HFTokenizer.from_str(ours.to_hf_json())
    assert theirs.get_vocab_size() == ours.vocab_size
    for text in [*HARD_STRINGS, *FUZZ_STRINGS[:100], TRAIN_TEXT[:2000], "<0x41> literal byte-token text"]:
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids, skip_special_tokens=False) == ours.decode(ids) == text


def test_char_tokenizer_reads_back_from_hf_format_and_nothing_else_does(char_tok, bpe_tok, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(char_tok.to_hf_json(), encoding="utf-8")
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.to_dict() == char_tok.to_dict()
    # Other Hugging Face tokenizers stay what they are: a byte-level BPE, or the same layout with
    # one change (a merge, a normaliser, a missing byte token, another special token).
    assert char_tokenizer_from_hf(bpe_tok.to_dict()) is None
    exported = json.loads(char_tok.to_hf_json())
    variants = []
    merged = json.loads(json.dumps(exported))
    merged["model"]["merges"] = [["a", "b"]]
    variants.append(merged)
    normalised = json.loads(json.dumps(exported))
    normalised["normalizer"] = {"type": "NFC"}
    variants.append(normalised)
    missing_byte = json.loads(json.dumps(exported))
    del missing_byte["model"]["vocab"]["<0x7F>"]
    variants.append(missing_byte)
    other_special = json.loads(json.dumps(exported))
    other_special["added_tokens"][0]["content"] = "<|im_end|>"
    variants.append(other_special)
    for variant in variants:
        assert char_tokenizer_from_hf(variant) is None
