"""Folding text for name matching: one pure function, ``fold``, and what matching needs around it.

A protected name and a prompt are both folded, then the name is looked for as a substring of the
folded prompt. Folding removes the differences that cost an evader nothing and change no name:

1. the spacing sound marks ゛ ゜ become the combining ones, so ``カ゛`` composes like ``ガ``;
2. Unicode NFKC: full/half width (``ＰＩＫＡ`` → ``PIKA``, half-width ``ｶﾞ`` → ``ガ``), circled and
   other compatibility forms, ligatures;
3. case folding (``casefold``: ``ß`` → ``ss`` as well as ``A`` → ``a``);
4. accents off (``Pokémon`` → ``pokemon``): every combining mark (Unicode category Mn, in any
   script) is dropped, except the kana sound marks U+3099/U+309A, which make ``が`` a different
   syllable from ``か``;
5. katakana → hiragana, the one canonical kana (``ピカチュウ`` → ``ぴかちゅう``; ``ヷ`` → ``わ゙``);
6. long-vowel marks are dropped: ``ー`` (U+30FC, also half-width ``ｰ`` after NFKC), and the wave
   dashes and other dashes written for it (``〜`` ``～`` ``〰`` ``―`` ``－``) go with the punctuation
   below. So ``ピカチュー`` folds to ``ぴかちゅ``: it does *not* match ``ピカチュウ`` (a different
   spelling, which a holder registers as an alias), while ``ピカーチュウ`` does;
7. every separator, punctuation mark, symbol, control and format character is dropped: spaces of
   every width, ``・`` ``･`` ``·`` (middle dots), ``「」、。``, ``!?.,'-``, ``★♪``, emoji, zero-width
   spaces and joiners.

**Short Latin names.** Substring matching across removed spaces would find ``ash`` in ``washing``
and ``mario`` in ``marionette``. A folded alias with no kana or CJK ideographs (Latin, Cyrillic,
digits: scripts that put spaces between words) therefore matches only where it starts and ends on
a *word boundary* of the prompt: its start or end, a removed character, or a change between
kana/CJK and other characters (``とPikachuが``). The boundaries inside the match do not matter, so
``P.i.k.a.c.h.u`` and ``Pika chu`` are still found. An alias with kana or ideographs matches
anywhere (Japanese puts no spaces between words). The cost of that: a short kana alias also
matches the same sounds inside ordinary hiragana text (``コナン`` in ``ここなんだ``), which is why
an alias must fold to at least ``MIN_ALIAS_CHARS`` characters, and a kana-only one to
``MIN_KANA_ALIAS_CHARS``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MIN_ALIAS_CHARS = 2
MIN_KANA_ALIAS_CHARS = 3

_SPACING_MARKS = str.maketrans({"\u309b": "\u3099", "\u309c": "\u309a"})
_KANA_MARKS = frozenset("\u3099\u309a")
_LONG_VOWEL = frozenset("\u30fc")  # NFKC has already turned the half-width ｰ (U+FF70) into it
_DROPPED_CATEGORIES = ("P", "Z", "S", "C")


def _hiragana(ch: str) -> str:
    code = ord(ch)
    if 0x30A1 <= code <= 0x30F6 or 0x30FD <= code <= 0x30FE:  # katakana letters, iteration marks
        return chr(code - 0x60)
    return ch


def _kept(ch: str) -> bool:
    return ch not in _LONG_VOWEL and not unicodedata.category(ch).startswith(_DROPPED_CATEGORIES)


def _letters(text: str) -> str:
    """Steps 1-5 on ``text``: the folded characters, nothing dropped yet but the accents."""
    text = unicodedata.normalize("NFKC", text.translate(_SPACING_MARKS)).casefold()
    # Decomposed, an accent is its own character; kana are mapped here too so that ヷ (which has
    # no hiragana form) becomes わ + ゙ like its hiragana spelling.
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(_hiragana(ch) for ch in decomposed
                   if ch in _KANA_MARKS or unicodedata.category(ch) != "Mn")
    return unicodedata.normalize("NFC", kept)


def fold(text: str) -> str:
    """``text`` folded for matching (see the module docstring); pure and idempotent."""
    return "".join(ch for ch in _letters(text) if _kept(ch))


def is_unspaced(ch: str) -> bool:
    """Kana and CJK ideographs: scripts written without spaces between words."""
    code = ord(ch)
    return (0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0x3400 <= code <= 0x4DBF
            or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x3FFFF
            or ch in "々〆〇" or ch in _KANA_MARKS)


def is_kana_only(folded: str) -> bool:
    return bool(folded) and all(0x3040 <= ord(ch) <= 0x309F for ch in folded)


def needs_word_boundaries(folded_alias: str) -> bool:
    """True for an alias in scripts that space their words (no kana or ideograph in it)."""
    return not any(is_unspaced(ch) for ch in folded_alias)


def alias_problem(alias: str) -> str | None:
    """Why ``alias`` cannot be registered (None: it can): it must fold to enough characters to
    match only what it names."""
    folded = fold(alias)
    if len(folded) < MIN_ALIAS_CHARS:
        return (f"{alias!r} folds to {folded!r}; an alias must keep at least {MIN_ALIAS_CHARS} letters or digits "
                "once spaces, punctuation and symbols are removed")
    if is_kana_only(folded) and len(folded) < MIN_KANA_ALIAS_CHARS:
        return (f"{alias!r} folds to {folded!r}; a kana-only alias must keep at least {MIN_KANA_ALIAS_CHARS} "
                "kana (shorter ones match inside ordinary words)")
    return None


@dataclass(frozen=True)
class FoldedText:
    """A prompt, folded, with the positions in ``text`` that are word boundaries."""

    text: str
    boundaries: frozenset[int]

    @classmethod
    def of(cls, raw: str) -> FoldedText:
        out: list[str] = []
        bounds = {0}
        gap = False  # a dropped character since the last kept one
        for ch in _letters(raw):
            if not _kept(ch):
                gap = gap or ch not in _LONG_VOWEL  # a dropped ー is part of the word it lengthens
                continue
            if out and (gap or is_unspaced(out[-1]) != is_unspaced(ch)):
                bounds.add(len(out))
            out.append(ch)
            gap = False
        bounds.add(len(out))
        return cls("".join(out), frozenset(bounds))
