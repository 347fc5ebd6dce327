"""Finding registered names in a prompt, and the registry cached for the hot path.

``NameIndex`` holds every folded spelling of every entry, keyed by its first two characters (an
alias folds to at least two, ``farm.policy.normalize``): a prompt is scanned once, each position
looking up the spellings that start with its two characters, so a create costs one pass over its
prompt however many names are registered.

``RegistryCache`` keeps a ``NameIndex`` per process. At most once per ``refresh_s`` it reads the
registry's version (one primary-key row); only when that moved does it load the entries again.
So a name registered through any gateway is enforced by every gateway and the batch runner within
``refresh_s`` (plus the reload), and by the gateway that registered it at once (``invalidate``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from farm.policy.normalize import FoldedText, fold, needs_word_boundaries
from farm.policy.registry import PolicyStore, ProtectedEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NameMatch:
    """A registered entry found in a prompt, and the folded spelling that matched."""

    entry: ProtectedEntry
    spelling: str
    start: int  # in the folded prompt


@dataclass(frozen=True)
class _Spelling:
    text: str
    bounded: bool  # must start and end on word boundaries of the prompt
    entry: ProtectedEntry


class NameIndex:
    """The folded spellings of ``entries``; ``find`` reports the first one a prompt contains."""

    def __init__(self, entries: Iterable[ProtectedEntry]) -> None:
        self._by_prefix: dict[str, list[_Spelling]] = defaultdict(list)
        self.entries = 0
        for entry in entries:
            self.entries += 1
            for spelling in {fold(s) for s in entry.spellings()}:
                if len(spelling) >= 2:  # shorter ones cannot be registered; an old row is skipped, not fatal
                    self._by_prefix[spelling[:2]].append(_Spelling(spelling, needs_word_boundaries(spelling), entry))
        for spellings in self._by_prefix.values():
            spellings.sort(key=lambda s: -len(s.text))  # the longest spelling at a position reports first

    def find(self, prompt: FoldedText, kinds: Collection[str]) -> NameMatch | None:
        """The first (leftmost, then longest) spelling of an entry of one of ``kinds`` in ``prompt``."""
        text, bounds = prompt.text, prompt.boundaries
        for i in range(len(text) - 1):
            for s in self._by_prefix.get(text[i:i + 2], ()):
                if s.entry.kind not in kinds or not text.startswith(s.text, i):
                    continue
                if s.bounded and (i not in bounds or i + len(s.text) not in bounds):
                    continue
                return NameMatch(s.entry, s.text, i)
        return None


class RegistryCache:
    """A process's view of the registry, at most ``refresh_s`` behind it (thread-safe)."""

    def __init__(self, store: PolicyStore, *, refresh_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0, got {refresh_s}")
        self.store, self.refresh_s, self._clock = store, refresh_s, clock
        self._lock = threading.Lock()
        self._index: NameIndex | None = None
        self._version: int | None = None
        self._checked_at = float("-inf")
        self.loads = 0  # how many times the entries were read (the hot path should rarely add one)

    def index(self) -> NameIndex:
        with self._lock:
            now = self._clock()
            if self._index is not None and now - self._checked_at < self.refresh_s:
                return self._index
            try:
                version = self.store.version()
                if version != self._version or self._index is None:
                    version, entries = self.store.all_entries()
                    self._index, self._version = NameIndex(entries), version
                    self.loads += 1
            except Exception:
                if self._index is None:
                    raise
                # The database hiccuped: go on with the names we have; the next call tries again.
                log.warning("could not read the protected-name registry; using version %s", self._version,
                            exc_info=True)
                return self._index
            self._checked_at = now
            return self._index

    def invalidate(self) -> None:
        """Read the version on the next check (this process changed the registry)."""
        with self._lock:
            self._checked_at = float("-inf")
