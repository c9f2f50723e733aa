"""Text normalization and word error rate, in the spirit of Whisper's evaluation.

WER is only meaningful after both sides are written the same way: "Mr. Smith's
colour, twenty-five!" and "MISTER SMITH'S COLOR TWENTY FIVE" are the same words.
`EnglishTextNormalizer` maps both to "mister smith is color 25":

    lower case -> drop [bracketed] and (parenthesized) text -> drop fillers (uh, um)
    -> expand contractions and titles -> strip symbols and diacritics
    -> spoken numbers to digits -> British to American spelling -> collapse spaces

It follows Whisper's choices where they matter for comparable numbers (e.g. "'s"
becomes " is", a lone "one" stays a word) but is smaller: no "double"/"triple",
no plurals of number words, a short spelling list.

`BasicTextNormalizer` is for other languages: lower case, symbols and punctuation
to spaces, optionally one token per character for scripts without spaces.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction

import regex

# ---- shared cleanup --------------------------------------------------------------

_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")

# Letters NFKD does not split into base + mark.
_EXTRA_DIACRITICS = {
    "œ": "oe", "Œ": "OE", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "ß": "ss", "ẞ": "SS",
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "th", "ı": "i",
}  # fmt: skip


def remove_symbols_and_diacritics(text: str, keep: str = "") -> str:
    """ASCII-fold letters (é -> e, æ -> ae) and turn punctuation, symbols and odd
    spaces into plain spaces, except the characters in `keep`."""
    out = []
    for char in unicodedata.normalize("NFKD", text):
        if char in keep:
            out.append(char)
        elif char in _EXTRA_DIACRITICS:
            out.append(_EXTRA_DIACRITICS[char])
        elif unicodedata.category(char)[0] == "M":
            continue  # combining accent split off by NFKD
        elif unicodedata.category(char)[0] in "PSZ":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def remove_symbols(text: str) -> str:
    """Punctuation, symbols and odd spaces to plain spaces; letters and their marks kept."""
    return "".join(" " if unicodedata.category(c)[0] in "PSZ" else c for c in unicodedata.normalize("NFKC", text))


class BasicTextNormalizer:
    """Language-neutral normalization: lower case, no bracketed text, no punctuation.

    With `split_letters`, every character (grapheme) becomes its own token, which
    turns WER into a character error rate for Chinese, Japanese, Thai, ...
    """

    def __init__(self, split_letters: bool = False):
        self.split_letters = split_letters

    def __call__(self, text: str) -> str:
        text = _BRACKETED.sub("", text.lower())
        text = remove_symbols(text)
        if self.split_letters:
            text = " ".join(regex.findall(r"\X", text.replace(" ", "")))
        return " ".join(text.split())


# ---- English numbers -------------------------------------------------------------

_ONES = {
    name: value
    for value, name in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen"
        " fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {name: 10 * (i + 2) for i, name in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_MULTIPLIERS = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}

_IRREGULAR_ORDINALS = {"first": "one", "second": "two", "third": "three", "fifth": "five",
                       "eighth": "eight", "ninth": "nine", "twelfth": "twelve"}  # fmt: skip
_ORDINALS = {  # ordinal word -> cardinal word
    **{name + "th": name for name in [*_ONES, *_MULTIPLIERS] if name not in _IRREGULAR_ORDINALS.values()},
    **{name[:-1] + "ieth": name for name in _TENS},
    **_IRREGULAR_ORDINALS,
}
_CURRENCIES = {"dollar": "$", "dollars": "$", "pound": "£", "pounds": "£",
               "euro": "€", "euros": "€", "cent": "¢", "cents": "¢"}  # fmt: skip
_ARABIC = re.compile(r"^([$£€¢]?)(\d+(?:\.\d+)?)$")


def _ordinal_suffix(value: int) -> str:
    if value % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")


class _Number:
    """A number being read word by word.

    `value` is an int while the words form one arithmetic number ("two hundred and
    five" = 205) and becomes a digit string once they are read digit by digit
    ("nineteen eighty four" = "1984", "one two three" = "123", "three point one four").
    """

    def __init__(self, prefix: str = ""):
        self.value: int | str | None = None
        self.prefix = prefix  # currency symbol
        self.last_kind = ""  # "ones" (0-9), "teens", "tens", "multiplier", "point", "arabic"
        self.words = 0

    def add_small(self, number: int) -> None:
        """Add a 0..99 word: 'five', 'fifteen', 'fifty'."""
        kind = "ones" if number < 10 else "teens" if number < 20 else "tens"
        value = self.value
        if value is None:
            self.value = number
        elif isinstance(value, str):
            # Digit by digit; a digit after "-ty" fills its zero ("1980" + "four").
            if kind == "ones" and self.last_kind == "tens" and value.endswith("0"):
                self.value = value[:-1] + str(number)
            else:
                self.value = value + str(number)
        elif kind == "ones" and self.last_kind in ("tens", "multiplier") and value % 10 == 0:
            self.value = value + number
        elif kind != "ones" and self.last_kind == "multiplier" and value % 100 == 0:
            self.value = value + number
        else:
            self.value = str(value) + str(number)
        self.last_kind = kind
        self.words += 1

    def multiply(self, multiplier: int) -> bool:
        """Apply 'hundred', 'thousand', ...; False when it cannot apply (start a new number)."""
        value = self.value
        if value is None:
            self.value = multiplier
        elif isinstance(value, int):
            # "two million three hundred" -> the hundreds apply only below the last thousand
            above, below = divmod(value, 1000)
            self.value = above * 1000 + below * multiplier if below else value * multiplier
        else:
            try:
                product = Fraction(value) * multiplier
            except ValueError:
                return False
            if product.denominator != 1:
                return False
            self.value = int(product)
        self.last_kind = "multiplier"
        self.words += 1
        return True

    def text(self, suffix: str = "") -> str:
        return f"{self.prefix}{self.value}{suffix}"


def _is_number_word(word: str | None) -> bool:
    return word is not None and (word in _ONES or word in _TENS or word in _MULTIPLIERS or word in _ORDINALS)


def _is_digit_word(word: str | None) -> bool:
    return word is not None and ((word in _ONES and _ONES[word] < 10) or word == "oh")


def _read_numbers(words: Sequence[str]) -> Iterator[str]:
    """Yield `words` with every run of number words replaced by digits."""
    number: _Number | None = None

    def finish() -> Iterator[str]:
        nonlocal number
        if number is not None and number.value is not None:
            lone_one = number.value == 1 and number.words == 1 and not number.prefix
            # a lone "one" is more often a pronoun ("the red one") than a count
            yield "one" if lone_one else number.text()
        number = None

    skip_next = False
    for i, word in enumerate(words):
        if skip_next:
            skip_next = False
            continue
        following = words[i + 1] if i + 1 < len(words) else None
        arabic = _ARABIC.match(word)
        kind = number.last_kind if number is not None else None

        if arabic:
            yield from finish()
            number = _Number(prefix=arabic.group(1))
            digits = arabic.group(2)
            number.value = int(digits) if digits.isdigit() else digits
            number.last_kind, number.words = "arabic", 1
        elif kind == "point" and _is_digit_word(word):
            number.value = f"{number.value}{_ONES.get(word, 0)}"
            number.words += 1
        elif word in _ONES or word in _TENS or (word == "oh" and kind in ("ones", "teens", "tens")):
            if kind in ("arabic", "point"):
                yield from finish()
            if number is None:
                number = _Number()
            number.add_small(_ONES.get(word, _TENS.get(word, 0)))
        elif word in _MULTIPLIERS:
            if kind == "point" or (number is not None and not number.multiply(_MULTIPLIERS[word])):
                yield from finish()
            if number is None:
                number = _Number()
                number.multiply(_MULTIPLIERS[word])
        elif word in _ORDINALS and (word != "second" or kind in ("ones", "teens", "tens", "multiplier")):
            # "second" alone is the unit of time far more often than "2nd"
            if kind in ("arabic", "point"):
                yield from finish()
            if number is None:
                number = _Number()
            cardinal = _ORDINALS[word]
            if cardinal in _MULTIPLIERS:
                number.multiply(_MULTIPLIERS[cardinal])
            else:
                number.add_small(_ONES.get(cardinal, _TENS.get(cardinal, 0)))
            yield number.text(_ordinal_suffix(int(str(number.value)[-2:])))
            number = None
        elif word == "and" and kind == "multiplier" and _is_number_word(following):
            continue  # "one hundred and three"
        elif word == "point" and kind not in (None, "point") and "." not in str(number.value) and _is_digit_word(following):
            number.value = f"{number.value}."
            number.last_kind = "point"
        elif word in _CURRENCIES and number is not None and not number.prefix:
            number.prefix = _CURRENCIES[word]
            yield from finish()
        elif (word == "percent" or (word == "per" and following == "cent")) and number is not None:
            yield number.text("%")
            number = None
            skip_next = word == "per"
        else:
            yield from finish()
            yield word
    yield from finish()


def normalize_english_numbers(text: str) -> str:
    """Spoken numbers to digits: "twenty five" -> "25", "one hundred and three" -> "103",
    "twenty first" -> "21st", "five dollars" -> "$5", "ten percent" -> "10%"."""
    text = re.sub(r"([a-z])(\d)", r"\1 \2", text)  # "covid19" -> "covid 19"
    text = re.sub(r"(\d)([a-z])", r"\1 \2", text)
    text = re.sub(r"(\d)\s+(st|nd|rd|th|s)\b", r"\1\2", text)  # ... but keep "21st", "1990s"
    return " ".join(_read_numbers(text.split()))


# ---- English spelling ------------------------------------------------------------

def _british_to_american() -> dict[str, str]:
    """A modest British -> American list, with the usual inflections of each word."""
    mapping: dict[str, str] = {}

    def add(british: str, american: str, suffixes: Sequence[str]) -> None:
        for suffix in ("", *suffixes):
            mapping[british + suffix] = american + suffix

    # -our -> -or
    for stem in ("colo", "favo", "hono", "labo", "neighbo", "behavio", "harbo", "humo", "flavo",
                 "rumo", "vapo", "savo", "armo", "odo", "endeavo", "splendo", "vigo", "paro", "ardo"):  # fmt: skip
        add(stem + "ur", stem + "r", ("s", "ed", "ing", "ful", "less", "able", "ably", "ite", "ites", "hood"))
    # -re -> -er
    for stem in ("cent", "theat", "met", "lit", "fib", "somb", "spect", "sab", "lust", "calib", "manoeuv"):
        add(stem + "re", stem + "er", ("s", "d"))
    mapping.update({"centred": "centered", "centring": "centering", "manoeuvre": "maneuver",
                    "manoeuvres": "maneuvers", "manoeuvred": "maneuvered"})  # fmt: skip
    # -ise -> -ize
    for stem in ("real", "organ", "recogn", "apolog", "critic", "emphas", "civil", "character",
                 "memor", "special", "summar", "symbol", "sympath", "util", "author", "econom"):  # fmt: skip
        add(stem + "is", stem + "iz", ("e", "es", "ed", "ing", "ation", "ations"))
    for stem in ("analy", "paraly"):
        add(stem + "s", stem + "z", ("e", "es", "ed", "ing"))
    # doubled l before a suffix
    for stem in ("travel", "cancel", "counsel", "label", "model", "level", "signal", "fuel",
                 "quarrel", "marvel", "jewel", "dial", "duel", "total", "channel", "rival"):  # fmt: skip
        add(stem + "l", stem, ("ed", "ing", "er", "ers"))
        mapping.pop(stem + "l", None)
    mapping.update({"jewellery": "jewelry", "marvellous": "marvelous", "counsellor": "counselor",
                    "counsellors": "counselors", "woollen": "woolen"})  # fmt: skip
    # one-offs
    for british, american in {
        "grey": "gray", "greys": "grays", "defence": "defense", "offence": "offense",
        "licence": "license", "pretence": "pretense", "practise": "practice", "practised": "practiced",
        "programme": "program", "programmes": "programs", "catalogue": "catalog", "dialogue": "dialog",
        "cheque": "check", "cheques": "checks", "tyre": "tire", "tyres": "tires",
        "plough": "plow", "ploughed": "plowed", "mould": "mold", "moulded": "molded",
        "aluminium": "aluminum", "sceptic": "skeptic", "sceptical": "skeptical",
        "whilst": "while", "amongst": "among", "storey": "story", "storeys": "stories",
        "kerb": "curb", "gaol": "jail", "gaoler": "jailer", "waggon": "wagon", "waggons": "wagons",
        "judgement": "judgment", "acknowledgement": "acknowledgment", "ageing": "aging",
        "moustache": "mustache", "pyjamas": "pajamas", "draught": "draft", "cosy": "cozy",
        "enquire": "inquire", "enquiry": "inquiry", "enquired": "inquired",
    }.items():  # fmt: skip
        mapping[british] = american
    return mapping


BRITISH_TO_AMERICAN: dict[str, str] = _british_to_american()


# ---- English text ----------------------------------------------------------------

FILLER_WORDS = ("hmm", "mm", "mhm", "mmm", "uh", "um", "uhm", "erm")
_FILLERS = re.compile(r"\b(?:" + "|".join(FILLER_WORDS) + r")\b")

# Applied in order: whole words, then titles, then the contracted endings.
_WHOLE_WORD_CONTRACTIONS = {
    "won't": "will not",
    "can't": "can not",
    "shan't": "shall not",
    "let's": "let us",
    "ain't": "aint",
    "y'all": "you all",
    "wanna": "want to",
    "gotta": "got to",
    "gonna": "going to",
    "ma'am": "madam",
}
_TITLES = {
    "mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "prof": "professor",
    "capt": "captain", "gov": "governor", "gen": "general", "sen": "senator", "rev": "reverend",
    "lt": "lieutenant", "col": "colonel", "jr": "junior", "sr": "senior", "esq": "esquire",
}  # fmt: skip
_CONTRACTED_ENDINGS = {
    r"'d been\b": " had been",
    r"'s been\b": " has been",
    r"'d gone\b": " had gone",
    r"'s gone\b": " has gone",
    r"'s got\b": " has got",
    r"n't\b": " not",
    r"'re\b": " are",
    r"'s\b": " is",  # also the possessive; what matters is that both sides read the same
    r"'d\b": " would",
    r"'ll\b": " will",
    r"'ve\b": " have",
    r"'m\b": " am",
}
_RULES = [
    *((re.compile(rf"\b{re.escape(short)}\b"), full) for short, full in _WHOLE_WORD_CONTRACTIONS.items()),
    *((re.compile(rf"\b{short}\b\.?"), full + " ") for short, full in _TITLES.items()),
    *((re.compile(pattern), full) for pattern, full in _CONTRACTED_ENDINGS.items()),
]

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


class EnglishTextNormalizer:
    """Whisper-style English normalization for WER (see the module docstring)."""

    def __call__(self, text: str) -> str:
        text = text.lower().translate(_APOSTROPHES)
        text = _BRACKETED.sub("", text)
        text = _FILLERS.sub("", text)
        text = re.sub(r"\s+'", "'", text)  # "don 't" -> "don't"
        for pattern, replacement in _RULES:
            text = pattern.sub(replacement, text)
        text = re.sub(r"(\d),(\d)", r"\1\2", text)  # "1,000" -> "1000"
        text = re.sub(r"\.(\D|$)", r" \1", text)  # full stops go, decimal points stay
        text = remove_symbols_and_diacritics(text, keep=".%$¢€£")
        text = normalize_english_numbers(text)
        text = " ".join(BRITISH_TO_AMERICAN.get(word, word) for word in text.split())
        # keep currency and percent signs only where they touch a number
        text = re.sub(r"([$¢€£])\s+(\d)", r"\1\2", text)
        text = re.sub(r"(\d)\s+%", r"\1%", text)
        text = re.sub(r"[.$¢€£](\D|$)", r" \1", text)
        text = re.sub(r"(\D|^)%", r"\1 ", text)
        return " ".join(text.split())


def text_normalizer(language: str | None) -> Callable[[str], str]:
    """The normalizer to score `language` with: English rules for 'en', characters as
    words for languages written without spaces, the basic rules otherwise."""
    if language in (None, "en", "english"):
        return EnglishTextNormalizer()
    return BasicTextNormalizer(split_letters=language in {"zh", "ja", "th", "lo", "my", "yue"})


# ---- word error rate -------------------------------------------------------------

def edit_distance(reference: Sequence[str] | str, hypothesis: Sequence[str] | str) -> int:
    """Levenshtein distance in words (substitutions + deletions + insertions).

    Strings are split on whitespace; lists are compared item by item.
    """
    ref = reference.split() if isinstance(reference, str) else list(reference)
    hyp = hypothesis.split() if isinstance(hypothesis, str) else list(hypothesis)
    # One row of the DP table: previous[j] = distance(ref[:i], hyp[:j]).
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(
    references: Sequence[str], hypotheses: Sequence[str], normalizer: Callable[[str], str] | None = None
) -> float:
    """Corpus WER: total word edits over total reference words.

    The strings are split on whitespace, after `normalizer` when one is given.
    """
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("word_error_rate takes lists of sentences; use edit_distance for one pair")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if normalizer is not None:
        references = [normalizer(r) for r in references]
        hypotheses = [normalizer(h) for h in hypotheses]
    n_words = sum(len(r.split()) for r in references)
    n_edits = sum(edit_distance(r, h) for r, h in zip(references, hypotheses))
    if n_words == 0:
        raise ValueError("the references hold no words, so WER is undefined")
    return n_edits / n_words
