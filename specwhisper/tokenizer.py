"""Whisper's tokenizer as a tiktoken `Encoding`, built from a checkpoint's own `tokenizer.json`.

A Hugging Face `tokenizer.json` for Whisper stores the byte-level BPE vocabulary as
GPT-2 "printable unicode" strings mapped to ids. Those ids are the BPE merge ranks,
so tiktoken needs only the strings turned back into bytes; the merge list is
redundant. `added_tokens` lists the special tokens (end of text, start of
transcript, one per language, task, ...) but not the 1501 timestamp tokens, which
Whisper places right after the last special token: `<|0.00|>`, `<|0.02|>`, ...,
`<|30.00|>`.

Layout of the multilingual vocabulary (English-only is the same, one lower):

    0 .. 50256          BPE text tokens (eot - 1 is an empty token)
    50257               <|endoftext|>            = eot
    50258               <|startoftranscript|>    = sot
    50259 .. 50357      <|en|> .. <|su|>          (large-v3 adds <|yue|>)
    50358 .. 50363      translate, transcribe, startoflm, startofprev, nocaptions, notimestamps
    50364 .. 51864      <|0.00|> .. <|30.00|>     = timestamp_begin ..

No id is hard-coded here: all are read from the file.

Using the ranks rather than the merge list also sidesteps a defect of the
multilingual export: its merges lack the first one, "Ġ t", so Hugging Face's own
reading of the file splits " there" into " " + "there", while the ranks (like
OpenAI's multilingual.tiktoken) give the single token the model was trained on.
"""

from __future__ import annotations

import json
import string
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import regex
import tiktoken

LANGUAGES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

_LANGUAGE_ALIASES = {
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}
TO_LANGUAGE_CODE: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    **_LANGUAGE_ALIASES,
}

TASKS = ("transcribe", "translate")
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
TIME_PRECISION = 0.02  # seconds per timestamp token step

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, symbol runs (each
# optionally led by one space), then whitespace that is not followed by a word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same split for `encode_bytes` on text holding stray bytes of a cut UTF-8
# sequence. Those bytes arrive as lone surrogates U+DC80..U+DCFF (Python's
# "surrogateescape"); they are counted as letters so a character cut in half
# stays in the piece of the word it belongs to.
_STRAY = "\udc80-\udcff"
_BYTES_PATTERN = regex.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{{L}}{_STRAY}]+| ?\p{{N}}+| ?[^\s\p{{L}}\p{{N}}{_STRAY}]+|\s+(?!\S)|\s+"""
)

# Languages written without spaces between words: split words at character boundaries.
_UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}
# Word timestamps' defaults (openai-whisper's): punctuation merged into the word after / before it.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"

# Whisper's own name for the no-speech token; Hugging Face files call it <|nocaptions|>.
# Some English-only files also spell Hebrew with its old ISO code <|iw|>.
_SPECIAL_ALIASES = {
    "<|nospeech|>": "<|nocaptions|>",
    "<|nocaptions|>": "<|nospeech|>",
    "<|he|>": "<|iw|>",
    "<|iw|>": "<|he|>",
}
_LEGACY_LANGUAGE_CODES = {"iw": "he"}


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table.

    GPT-2 shows each byte as a visible character: bytes that are already printable
    Latin-1 (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves, and the other 68
    (control bytes, space, soft hyphen, ...) are moved, in byte order, to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _timestamp_name(index: int) -> str:
    return f"<|{index * TIME_PRECISION:.2f}|>"


def resolve_language_code(language: str) -> str:
    key = language.lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"unknown language {language!r}: expected a code such as 'en' or a name such as 'english'")


class Tokenizer:
    """Whisper's text tokens, special tokens and timestamp tokens over one tiktoken `Encoding`."""

    def __init__(self, encoding: tiktoken.Encoding, special_ids: dict[str, int], timestamp_begin: int):
        self.encoding = encoding
        self._special_ids = dict(special_ids)
        self._special_names = {i: name for name, i in special_ids.items()}
        self.n_vocab: int = encoding.n_vocab
        self.eot: int = special_ids["<|endoftext|>"]
        self.sot: int = special_ids["<|startoftranscript|>"]
        self.sot_prev: int = special_ids["<|startofprev|>"]
        self.sot_lm: int = special_ids["<|startoflm|>"]
        self.no_speech: int = self.id_of_special("<|nocaptions|>")
        self.no_timestamps: int = special_ids["<|notimestamps|>"]
        self.transcribe: int = special_ids["<|transcribe|>"]
        self.translate: int = special_ids["<|translate|>"]
        self.timestamp_begin: int = timestamp_begin
        self._language_ids: dict[str, int] = {}
        for name, i in sorted(special_ids.items(), key=lambda item: item[1]):
            code = _LEGACY_LANGUAGE_CODES.get(name[2:-2], name[2:-2])
            if name.startswith("<|") and code in LANGUAGES:
                self._language_ids[code] = i
        self.language_codes: tuple[str, ...] = tuple(self._language_ids)
        self.language_token_ids: tuple[int, ...] = tuple(self._language_ids.values())
        # English-only checkpoints carry the language tokens too but were trained with
        # none of them; the multilingual BPE has one more text token, which pushes the
        # total to 51865 or more (the test Whisper itself uses on `n_vocab`).
        self.multilingual: bool = self.n_vocab >= 51865
        self.non_speech_tokens: tuple[int, ...] = self._find_non_speech_tokens()

    @classmethod
    def from_file(cls, tokenizer_json: str | Path) -> Tokenizer:
        """Read a Hugging Face `tokenizer.json` (or a model folder holding one)."""
        path = Path(tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        stat = path.stat()  # a rewritten file at the same path must not hit the cache
        return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    # ---- special tokens -------------------------------------------------------------

    def special_name(self, id: int) -> str | None:
        """'<|en|>', '<|0.02|>', ... for a special or timestamp id; None for a text token."""
        return self._special_names.get(int(id))

    def id_of_special(self, name: str) -> int | None:
        """Id of a special token by name ('<|nospeech|>' and '<|nocaptions|>' both work)."""
        if name in self._special_ids:
            return self._special_ids[name]
        alias = _SPECIAL_ALIASES.get(name)
        return self._special_ids.get(alias) if alias else None

    def language_token(self, code: str) -> int:
        """Id of `<|code|>`; accepts a language name as well as a code."""
        code = resolve_language_code(code)
        if not self.multilingual and code != "en":
            raise ValueError(f"English-only vocabulary has no usable language {code!r}; only 'en'")
        token = self._language_ids.get(code)
        if token is None:
            raise ValueError(f"language {code!r} is not in this vocabulary ({len(self.language_codes)} languages)")
        return token

    def sot_sequence(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """Decoder prompt: [sot, <|lang|>, <|task|>] (multilingual) or [sot] (English-only),
        followed by <|notimestamps|> unless `timestamps`."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
        if self.multilingual:
            if language is None:
                raise ValueError("a multilingual vocabulary needs a language for its start sequence")
            tokens = [self.sot, self.language_token(language), getattr(self, task)]
        else:
            if language is not None and resolve_language_code(language) != "en":
                raise ValueError(f"English-only vocabulary cannot transcribe language {language!r}")
            if task != "transcribe":
                raise ValueError("English-only vocabulary has no translate task")
            tokens = [self.sot]
        if not timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    # ---- text ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ordinary text to BPE ids; special-token strings in `text` are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """BPE over raw bytes that may start or end inside a UTF-8 character.

        Equals `encode` on valid UTF-8. Otherwise the stray bytes are split as if they
        were letters (see `_BYTES_PATTERN`) and each piece is BPE-encoded as bytes, so
        `decode_bytes(encode_bytes(data)) == data` always holds.
        """
        data = bytes(data)
        try:
            return self.encoding.encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        for piece in _BYTES_PATTERN.findall(text):
            ids.extend(self.encoding._encode_single_piece(piece.encode("utf-8", errors="surrogateescape")))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the text tokens; every id >= eot (specials, timestamps) is dropped."""
        return self.encoding.decode([t for t in map(int, ids) if t < self.eot])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of the text tokens, specials dropped; may end inside a UTF-8 character."""
        return self.encoding.decode_bytes([t for t in map(int, ids) if t < self.eot])

    def decode_with_timestamps(self, ids: Iterable[int]) -> str:
        """Text with special and timestamp tokens written out, e.g. '<|0.00|> Hello<|1.08|>'."""
        return self.encoding.decode([int(t) for t in ids])

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one text token (possibly part of a UTF-8 character)."""
        id = int(id)
        if not 0 <= id < self.eot:
            raise ValueError(f"token {id} is not a text token (text tokens are 0..{self.eot - 1})")
        return self.encoding.decode_single_token_bytes(id)

    def timestamp_seconds(self, id: int) -> float:
        """Time in seconds of a timestamp token."""
        index = int(id) - self.timestamp_begin
        if not 0 <= index < N_TIMESTAMPS:
            raise ValueError(f"token {id} is not a timestamp token")
        return index * TIME_PRECISION

    # ---- word splitting (for word-level timestamps) ----------------------------------

    def split_to_word_tokens(self, ids: list[int], language: str = "en") -> tuple[list[str], list[list[int]]]:
        """Group ids into words: at spaces and punctuation, or at every complete
        character for languages written without spaces."""
        if resolve_language_code(language) in _UNSPACED_LANGUAGES:
            return self._split_on_characters(ids)
        words: list[str] = []
        groups: list[list[int]] = []
        for text, group in zip(*self._split_on_characters(ids)):
            starts_word = group[0] >= self.eot or text.startswith(" ") or text.strip() in string.punctuation
            if starts_word or not words:
                words.append(text)
                groups.append(list(group))
            else:
                words[-1] += text
                groups[-1].extend(group)
        return words, groups

    def _split_on_characters(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        """Cut after each token that completes a UTF-8 character (specials stand alone)."""
        words: list[str] = []
        groups: list[list[int]] = []
        pending: list[int] = []
        pending_bytes = b""
        for token in map(int, ids):
            if token >= self.eot:
                if pending:  # a cut character before a special: keep it as its own piece
                    words.append(pending_bytes.decode("utf-8", errors="replace"))
                    groups.append(pending)
                    pending, pending_bytes = [], b""
                words.append(self._special_names.get(token, ""))
                groups.append([token])
                continue
            pending.append(token)
            pending_bytes += self.encoding.decode_single_token_bytes(token)
            try:
                words.append(pending_bytes.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            groups.append(pending)
            pending, pending_bytes = [], b""
        if pending:
            words.append(pending_bytes.decode("utf-8", errors="replace"))
            groups.append(pending)
        return words, groups

    # ---- suppression --------------------------------------------------------------

    def _find_non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens that spell speaker tags, sound annotations and music symbols.

        Whisper suppresses these so it never writes "[MUSIC]", "(laughs)" or "♪♪"
        that was not spoken. Commas, periods, question marks etc. stay allowed, and so
        do "-" and "'" inside words; only their word-initial forms " -", " '" are banned.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # Musical signs U+2669..U+266F are several tokens in some vocabularies; their
        # first token is then a shared UTF-8 prefix of the U+2640..U+267F block, which
        # holds nothing speech needs, so it is safe to ban.
        music = list("♩♪♫♬♭♮♯")
        banned = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + music:
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in music:
                    banned.add(ids[0])
        return tuple(sorted(banned))

    def __repr__(self) -> str:
        kind = "multilingual" if self.multilingual else "English-only"
        return f"Tokenizer({kind}, n_vocab={self.n_vocab}, languages={len(self.language_codes)})"


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int = 0, size: int = 0) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{path}: expected a BPE model, found {spec['model']['type']!r}")

    specials = {token["content"]: token["id"] for token in spec["added_tokens"] if token.get("special", True)}
    special_ids = set(specials.values())
    to_byte = _gpt2_unicode_to_byte()
    ranks = {
        bytes(to_byte[ch] for ch in text): rank
        for text, rank in spec["model"]["vocab"].items()
        if rank not in special_ids
    }
    if len(ranks) != max(ranks.values()) + 1:
        raise ValueError(f"{path}: BPE ranks are not contiguous from 0")
    for name in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if name not in specials:
            raise ValueError(f"{path}: missing special token {name}")

    if _timestamp_name(0) in specials:  # some exports list the timestamps too
        timestamp_begin = specials[_timestamp_name(0)]
    else:
        timestamp_begin = max(special_ids) + 1
        for index in range(N_TIMESTAMPS):
            specials[_timestamp_name(index)] = timestamp_begin + index
    if specials.get(_timestamp_name(N_TIMESTAMPS - 1)) != timestamp_begin + N_TIMESTAMPS - 1:
        raise ValueError(f"{path}: timestamp tokens are not contiguous")

    encoding = tiktoken.Encoding(
        name=f"whisper-{Path(path).parent.name}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=len(ranks) + len(specials),
    )
    return Tokenizer(encoding, specials, timestamp_begin)
