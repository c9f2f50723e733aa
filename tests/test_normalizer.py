"""Text normalization and WER on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from specwhisper.normalizer import (
    BasicTextNormalizer,
    EnglishTextNormalizer,
    edit_distance,
    normalize_english_numbers,
    text_normalizer,
    word_error_rate,
)

english = EnglishTextNormalizer()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Smith's colour, twenty-five!", "mister smith is color 25"),
        ("HE HOPED THERE WOULD BE STEW FOR DINNER", "he hoped there would be stew for dinner"),
        ("[MUSIC] Well, uh, I think (laughs) um so.", "well i think so"),
        ("I can't do it; you won't, they don't.", "i can not do it you will not they do not"),
        ("We're here, you'll see, I've been, I'm fine.", "we are here you will see i have been i am fine"),
        ("She'd been there; let's go!", "she had been there let us go"),
        ("Dr. Jones met St. John", "doctor jones met saint john"),
        ("The theatre's centre was grey", "the theater is center was gray"),
        ("He COUNSELLED them to organise", "he counseled them to organize"),
        ("Café naïve façade, Ærø", "cafe naive facade aero"),
        ("don\u2019t", "do not"),
        ("It costs $5, or 1,000 dollars.", "it costs $5 or $1000"),
        ("Pi is 3.14, nearly.", "pi is 3.14 nearly"),
        ("  lots   of\tspace\n", "lots of space"),
    ],
)
def test_english_normalizer(text, expected):
    assert english(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("twenty five", "25"),
        ("one hundred and three", "103"),
        ("two thousand and five", "2005"),
        ("two million three hundred thousand", "2300000"),
        ("nineteen eighty four", "1984"),
        ("nineteen oh five", "1905"),
        ("one oh one", "101"),
        ("twenty first of may", "21st of may"),
        ("forty second street", "42nd street"),
        ("the twelfth night", "the 12th night"),
        ("the hundredth time", "the 100th time"),
        ("three point one four", "3.14"),
        ("five dollars and ten cents", "$5 and ¢10"),
        ("ten percent", "10%"),
        ("ten per cent", "10%"),
        ("5 million", "5000000"),
        ("the 1990s and the 21st", "the 1990s and the 21st"),
        ("the red one", "the red one"),  # a lone "one" is a word
        ("one dollar", "$1"),
        ("wait a second", "wait a second"),
        ("oh no", "oh no"),
        ("zero", "0"),
        ("and then", "and then"),
    ],
)
def test_numbers(text, expected):
    assert normalize_english_numbers(text) == expected


def test_upper_case_reference_matches_punctuated_sentence():
    reference = "FOR A FULL HOUR HE HAD PACED UP AND DOWN WAITING BUT HE COULD WAIT NO LONGER"
    written = "For a full hour, he had paced up and down—waiting; but he could wait no longer!"
    assert english(reference) == english(written)
    reference = "I DON'T THINK IT'S TWENTY ONE MISTER BROWN"
    written = "I don't think it's 21, Mr. Brown."
    assert english(reference) == english(written) == "i do not think it is 21 mister brown"


def test_normalizer_is_idempotent():
    for text in ["Mr. Smith's colour, twenty-five!", "It costs $5, or 1,000 dollars.", "I can't do it"]:
        once = english(text)
        assert english(once) == once


def test_basic_normalizer():
    basic = BasicTextNormalizer()
    assert basic("Sous le consulat, il devient (conservateur) des Eaux et Forêts!") == "sous le consulat il devient des eaux et forêts"
    assert basic("Der hinter diesem «Portal» liegenden Raum.") == "der hinter diesem portal liegenden raum"
    assert basic("그는 이리저리 피하면서, 길.") == "그는 이리저리 피하면서 길"
    assert BasicTextNormalizer(split_letters=True)("广州市，房地产。") == "广 州 市 房 地 产"


def test_text_normalizer_by_language():
    assert isinstance(text_normalizer("en"), EnglishTextNormalizer)
    assert text_normalizer("zh")("大学生") == "大 学 生"
    assert text_normalizer("de")("Hallo, Welt!") == "hallo welt"


def test_edit_distance():
    assert edit_distance("a b c", "a b c") == 0
    assert edit_distance("a b c", "a x c") == 1  # substitution
    assert edit_distance("a b c", "a c") == 1  # deletion
    assert edit_distance("a b c", "a b c d") == 1  # insertion
    assert edit_distance("the cat sat on the mat", "cat sat on a mat today") == 3
    assert edit_distance("", "a b") == 2
    assert edit_distance("a b", "") == 2
    assert edit_distance(["kitten"], ["sitting"]) == 1  # lists compare whole items


def test_word_error_rate():
    assert word_error_rate(["a b c", "d e"], ["a b c", "d e"]) == 0.0
    # 1 substitution + 1 insertion over 5 reference words
    assert word_error_rate(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(2 / 5)
    # 1 deletion + 2 insertions over 4 reference words
    assert word_error_rate(["a b c d"], ["a c d x y"]) == pytest.approx(3 / 4)
    assert word_error_rate(["hello world"], [""]) == 1.0
    refs = ["MISTER SMITH IS TWENTY FIVE"]
    hyps = ["Mr. Smith is 25."]
    # unnormalized: 4 substitutions (case and punctuation count) + 1 deletion
    assert word_error_rate(refs, hyps) == pytest.approx(5 / 5)
    assert word_error_rate(refs, hyps, normalizer=english) == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        word_error_rate([""], ["a"])
