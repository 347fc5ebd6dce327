"""``@name`` mentions of cameos in a prompt.

A cameo's name is a handle: 1 to 40 ASCII letters, digits, ``_``, ``.`` and ``-``, starting and
ending with a letter, digit or ``_`` (so ``@alice.`` at the end of a sentence names ``alice``).
A mention is ``@`` + a name where the ``@`` does not follow an ASCII letter, digit, ``_``, ``.`` or
``@`` (so ``bob@example.com`` mentions nobody). Any other text may touch it: Japanese, Chinese
and other scripts without spaces (``東京で@alice_kが歩く`` mentions ``alice_k``), punctuation,
line breaks. Names compare case-insensitively (``@Alice`` is ``@alice``).
"""

from __future__ import annotations

import re

NAME_PATTERN = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,38}[A-Za-z0-9_])?"
MAX_NAME_CHARS = 40
_NAME = re.compile(NAME_PATTERN)
_MENTION = re.compile(r"(?<![A-Za-z0-9_.@])@(" + NAME_PATTERN + r")(?![A-Za-z0-9_])")


def name_key(name: str) -> str:
    """How names compare: case-folded."""
    return name.casefold()


def is_name(text: str) -> bool:
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def mentions(prompt: str) -> list[str]:
    """The names ``prompt`` mentions, in order of first mention, each once (as written first)."""
    seen: dict[str, str] = {}
    for match in _MENTION.finditer(prompt):
        seen.setdefault(name_key(match.group(1)), match.group(1))
    return list(seen.values())
