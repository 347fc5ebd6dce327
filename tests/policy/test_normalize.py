"""Folding and matching: every cheap variant of a registered name is caught (a hypothesis property),
ordinary Japanese and English prompts are not, and the documented edges behave as documented."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.policy.index import NameIndex
from farm.policy.normalize import FoldedText, alias_problem, fold
from tests.policy.names import ORDINARY, entries

PROPS = settings(max_examples=400, derandomize=True, deadline=None)
ENTRIES = entries()
INDEX = NameIndex(ENTRIES)
ALL_KINDS = ("work", "character", "public_figure")


def found(prompt: str, index: NameIndex = INDEX):
    return index.find(FoldedText.of(prompt), ALL_KINDS)


# -- variant makers: each changes how a name is written, never which name it is -------------------

def _half_width_table() -> dict[str, str]:
    """Full-width katakana → half-width (voiced ones as base + ﾞ/ﾟ), from Unicode's own mappings."""
    table = {}
    for code in range(0xFF61, 0xFFA0):
        full = unicodedata.normalize("NFKC", chr(code))
        if len(full) == 1:
            table.setdefault(full, chr(code))
    for ch in [chr(c) for c in range(0x30A1, 0x30FB)]:
        base, *marks = unicodedata.normalize("NFD", ch)
        if marks and base in table:
            table[ch] = table[base] + {"\u3099": "\uff9e", "\u309a": "\uff9f"}[marks[0]]
    return table


HALF = _half_width_table()
SEPARATORS = [" ", "\u3000", "・", "･", "·", "-", ".", "、", "。", "「", "」", "\u200b", "★", "_", "/", "!", "'",
              "\t", "♪", "…", "~"]
LONG_MARKS = ["ー", "ｰ", "〜", "～", "〰", "", "ーー"]
CIRCLED = {chr(ord("a") + i): chr(0x24D0 + i) for i in range(26)} | {chr(ord("A") + i): chr(0x24B6 + i)
                                                                       for i in range(26)}


def kana_switch(ch: str, to_katakana: bool) -> str:
    code = ord(ch)
    if to_katakana and 0x3041 <= code <= 0x3096:
        return chr(code + 0x60)
    if not to_katakana and 0x30A1 <= code <= 0x30F6:
        return chr(code - 0x60)
    return ch


def compat(ch: str, how: int) -> str:
    """One NFKC compatibility or width form of ``ch``, picked by ``how``."""
    if how == 0 and "!" <= ch <= "~":
        return chr(ord(ch) + 0xFEE0)  # full width
    if how == 1 and ch in HALF:
        return HALF[ch]  # half-width katakana (ガ → ｶﾞ)
    if how == 2 and ch in CIRCLED:
        return CIRCLED[ch]
    if how == 3 and len(unicodedata.normalize("NFD", ch)) == 2 and 0x30A1 <= ord(ch) <= 0x30F6:
        base, mark = unicodedata.normalize("NFD", ch)
        return base + {"\u3099": "゛", "\u309a": "゜"}[mark]  # the spacing sound marks
    if how == 4:
        return unicodedata.normalize("NFD", ch)  # decomposed (ガ → カ + U+3099, é → e + U+0301)
    if how == 5 and ch.isascii() and ch.isalpha():
        return chr(0x1D400 + ord(ch.upper()) - ord("A")) if ch.isupper() else ch  # mathematical bold
    return ch


@st.composite
def variants(draw: st.DrawFn) -> tuple[str, str]:
    """(entry id, a prompt naming that entry in some disguise)."""
    entry = draw(st.sampled_from(ENTRIES))
    spelling = draw(st.sampled_from(entry.spellings()))
    out = []
    for i, ch in enumerate(spelling):
        if ch == "ー":
            out.append(draw(st.sampled_from(LONG_MARKS)))
            continue
        ch = kana_switch(ch, draw(st.booleans()))
        ch = ch.upper() if draw(st.booleans()) else ch.lower()
        if draw(st.integers(0, 3)) == 0:
            ch = compat(ch, draw(st.integers(0, 5)))
        out.append(ch)
        if i < len(spelling) - 1 and draw(st.integers(0, 3)) == 0:
            out.append("".join(draw(st.lists(st.sampled_from(SEPARATORS + ["ー", "ｰ"]), min_size=1, max_size=3))))
    name = "".join(out)
    where = draw(st.sampled_from(["alone", "english", "japanese", "quoted"]))
    if where == "english":
        name = f"{draw(st.sampled_from(['a photo of', 'cinematic shot:', 'draw', 'A film about']))} {name} " \
               f"{draw(st.sampled_from(['in the park', 'at night, 4k', 'dancing.', 'and friends']))}"
    elif where == "japanese":
        name = f"{draw(st.sampled_from(['森で', '夜の東京で', '雪の中、', 'アニメ風の']))}{name}" \
               f"{draw(st.sampled_from(['が走る', 'と猫が遊ぶ', 'の映画', 'が空を飛ぶ。']))}"
    elif where == "quoted":
        name = f"「{name}」みたいなキャラ"
    return entry.id, name


@PROPS
@given(variants())
def test_every_variant_of_a_registered_name_is_caught(case: tuple[str, str]) -> None:
    entry_id, prompt = case
    only = NameIndex([e for e in ENTRIES if e.id == entry_id])
    assert found(prompt, only) is not None, (prompt, fold(prompt))
    assert found(prompt) is not None


@pytest.mark.parametrize("prompt", ORDINARY)
def test_ordinary_prompts_are_not_refused(prompt: str) -> None:
    assert found(prompt) is None, (prompt, found(prompt))


def test_the_ordinary_list_is_a_real_mix() -> None:
    japanese = [p for p in ORDINARY if any(0x3040 <= ord(c) <= 0x9FFF for c in p)]
    assert len(ORDINARY) >= 40 and 12 <= len(japanese) <= len(ORDINARY) - 12
    # Registered short names really occur inside these prompts' words, so the boundary rule is tested.
    assert sum(n in fold(p) for p in ORDINARY for n in ("ash", "mario", "elsa", "pika", "gund")) >= 6


@PROPS
@given(st.text(max_size=40))
def test_fold_is_idempotent_and_matches_the_folded_text(text: str) -> None:
    assert fold(fold(text)) == fold(text)
    assert FoldedText.of(text).text == fold(text)


@pytest.mark.parametrize(("written", "folded"), [
    ("ピカチュウ", "ぴかちゅう"), ("ｶﾞﾝﾀﾞﾑ", "がんだむ"), ("ﾎﾟｹﾓﾝ", "ぽけもん"), ("カ゛ンダム", "がんだむ"),
    ("ＰＩＫＡＣＨＵ", "pikachu"), ("Pokémon", "pokemon"), ("「ピカ・チュウ」", "ぴかちゅう"),
    ("ピカーチュウ", "ぴかちゅう"), ("ﾋﾟｶﾁｭｰ", "ぴかちゅ"), ("ヷ", "わ\u3099"), ("Straße", "strasse"),
    ("テイラー・スウィフト", "ていらすうぃふと"), ("ⓅⒾⓀⒶ", "pika"), ("P\u200bi\u200dka", "pika"),
])
def test_fold_examples(written: str, folded: str) -> None:
    assert fold(written) == folded


def test_a_long_vowel_mark_is_not_the_vowel_it_stands_for() -> None:
    """Documented: ー is dropped, not spelled out, so ピカチュー is another spelling (an alias to register)."""
    assert found("ピカチュー") is None and found("ピカチュウ") is not None


def test_short_latin_names_match_whole_words_only() -> None:
    assert found("ash")
    assert found("Ash and his friends") and found("とAshが走る") and found("A.s.h at the gym")
    assert not found("washing") and not found("a shark") and not found("flashlight")
    assert found("Mario jumps") and not found("a marionette") and not found("scenario")
    # A registered name that is also a word is refused as that word: register distinctive names.
    assert found("volcanic ash at dusk")


def test_kana_names_match_inside_hiragana_text_as_documented() -> None:
    """The cost of catching ぴかちゅう in もりでぴかちゅうがはしる: the same sounds in ordinary
    hiragana are caught too (コナン in ここなんだ); hence the minimum alias lengths."""
    assert found("もりでぴかちゅうがはしる")
    assert found("ここなんだ")


def test_aliases_must_fold_to_enough_characters() -> None:
    assert alias_problem("ピカチュウ") is None and alias_problem("Al") is None and alias_problem("悟空") is None
    assert "at least 2" in alias_problem("・Ａ・")
    assert "kana-only" in alias_problem("ルイ")
    assert alias_problem("!!!")
