"""The moderation hook: one interface every video create passes through before anything is stored.

``POST /v1/videos``, ``POST /v1/videos/{id}/remix``, ``…/edits``, ``…/extensions`` and every line of a batch (so every run of a
schedule, which is a batch) build a ``ModerationRequest`` and ask the farm's ``Moderator``. The
default chain (``default_chain``) is the rights-holder opt-out rule, then the public-figure rule,
then (given a cameo store) the cameo-consent rule;
an operator adds a classifier of their own by import path (``policy.moderators``) or by handing the
gateway any object with ``check(request) -> Decision``. The first refusal wins; the gateway turns
it into a 4xx (``farm.api.video_requests.moderate``; 400 ``content_policy_violation`` unless the
decision names its own status and code, as the cameo rule's 403 ``cameo_consent_required``) and
creates nothing. ``check`` may block (a registry refresh reads the database): callers run it off the
event loop. An exception from a moderator is not a refusal: the gateway answers 503 and the batch
runner retries the line's step on its next turn.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from farm.policy.normalize import FoldedText

if TYPE_CHECKING:
    from farm.policy.cameos import Character, CharacterStore
    from farm.policy.index import NameMatch, RegistryCache
    from farm.policy.settings import PolicySettings

CreatePath = Literal["create", "remix", "edit", "extend", "batch"]


@dataclass(frozen=True)
class ModerationRequest:
    """What a create asks for, as far as policy is concerned."""

    prompt: str
    account_id: str | None  # None: a gateway without accounts (embedding, tests)
    model: str
    path: CreatePath
    source_video_id: str | None = None  # remix, edit, extend: the video it starts from (None for an upload)
    characters: tuple[str, ...] = ()  # cameo ids the body lists (``@name`` mentions are in the prompt)

    @cached_property
    def folded(self) -> FoldedText:
        """The prompt folded once for every rule that matches names."""
        return FoldedText.of(self.prompt)


@dataclass(frozen=True)
class Decision:
    """A moderator's answer: allowed, or refused by ``rule`` with a message for the caller."""

    allowed: bool
    rule: str = ""  # opt_out, public_figure, or an operator classifier's name (a metric label)
    kind: str = ""  # what was found: work, character, public_figure, or the classifier's category
    message: str = ""  # shown to the caller: it says what to change, never more than they may know
    entry_id: str | None = field(default=None, compare=False)  # the registry entry, for logs
    status: int = 400  # the HTTP status of the refusal
    code: str = "content_policy_violation"
    param: str | None = "prompt"

    @classmethod
    def allow(cls) -> Decision:
        return cls(True)

    @classmethod
    def refuse(cls, rule: str, kind: str, message: str, entry_id: str | None = None, *, status: int = 400,
               code: str = "content_policy_violation", param: str | None = "prompt") -> Decision:
        return cls(False, rule, kind, message, entry_id, status, code, param)


@runtime_checkable
class Moderator(Protocol):
    def check(self, request: ModerationRequest) -> Decision: ...


class OptOutRule:
    """Refuses a prompt that names a registered work or character. The message names the entry (a
    published work's name: the caller wrote it, and can only rephrase once they know which)."""

    name = "opt_out"

    def __init__(self, registry: RegistryCache) -> None:
        self.registry = registry

    def check(self, request: ModerationRequest) -> Decision:
        found = self.registry.index().find(request.folded, ("work", "character"))
        if found is None:
            return Decision.allow()
        entry = found.entry
        whose = f" by its rights holder ({entry.holder})" if entry.holder else " by its rights holder"
        return Decision.refuse(self.name, entry.kind, (
            f"prompt: refused by the content policy (rights-holder opt-out): it names {entry.name!r}, a "
            f"{entry.kind} withdrawn from use{whose}; nothing was created"), entry.id)


class CameoConsent(Protocol):
    """Whether a request may show a protected person because that person consented (a cameo)."""

    def allows(self, request: ModerationRequest, figure: NameMatch) -> bool: ...


class PublicFigureRule:
    """Refuses a prompt that names a protected public figure.

    Such a prompt is allowed when it uses a cameo of that person that the caller may use
    (``consent``, a ``StoreCameoConsent``: the operator links a cameo to the person's entry). Without
    ``consent`` every such prompt is refused. The message does not name the person: it would
    confirm, one probe at a time, who is on the list.
    """

    name = "public_figure"

    def __init__(self, registry: RegistryCache, consent: CameoConsent | None = None) -> None:
        self.registry, self.consent = registry, consent

    def check(self, request: ModerationRequest) -> Decision:
        found = self.registry.index().find(request.folded, ("public_figure",))
        if found is None or (self.consent is not None and self.consent.allows(request, found)):
            return Decision.allow()
        return Decision.refuse(self.name, "public_figure", (
            "prompt: refused by the content policy (public figures): it names a person on this farm's "
            "protected list; nothing was created"), found.entry.id)


class StoreCameoConsent:
    """The public-figure rule's consent: the request uses a cameo the operator linked to that
    person's entry (``POST /v1/admin/characters/{id}``), and the caller may use it."""

    def __init__(self, characters: CharacterStore) -> None:
        self.characters = characters

    def allows(self, request: ModerationRequest, figure: NameMatch) -> bool:
        from farm.policy.cameos import CameoRefused

        try:
            used = self.characters.resolve(request.prompt, request.characters)
        except CameoRefused:
            return False  # the cameo rule refuses it, by name
        return any(c.public_figure_id == figure.entry.id and self.characters.may_use(c, request.account_id)
                   for c in used)


class CameoConsentRule:
    """Refuses a request that uses a cameo (``@name`` or ``characters``) without its owner's consent
    (403 ``cameo_consent_required``) or names one that does not exist (400 ``character_not_found``).
    Batch lines cannot use cameos (their jobs render from text only): 400 ``unsupported_parameter``.
    The create path checks consent once more in the job's insert transaction (``CharacterStore.admit``)."""

    name = "cameo_consent"

    def __init__(self, characters: CharacterStore) -> None:
        self.characters = characters

    def check(self, request: ModerationRequest) -> Decision:
        from farm.policy.cameos import CameoRefused

        try:
            used: list[Character] = self.characters.resolve(request.prompt, request.characters)
            self.characters.check_use(used, request.account_id)
            if used and request.path == "batch":
                raise CameoRefused("prompt: batch lines cannot use cameos (their jobs render from text only); "
                                   "create cameo videos with POST /v1/videos", param="prompt",
                                   code="unsupported_parameter")
        except CameoRefused as exc:
            return Decision.refuse(self.name, exc.code, exc.message, status=exc.status, code=exc.code,
                                   param=exc.param)
        return Decision.allow()


class ModerationChain:
    """Asks each moderator in order; the first refusal is the answer."""

    def __init__(self, moderators: Sequence[Moderator]) -> None:
        self.moderators = list(moderators)

    def check(self, request: ModerationRequest) -> Decision:
        for moderator in self.moderators:
            decision = moderator.check(request)
            if not decision.allowed:
                return decision
        return Decision.allow()


def default_chain(registry: RegistryCache, characters: CharacterStore | None = None) -> ModerationChain:
    if characters is None:
        return ModerationChain([OptOutRule(registry), PublicFigureRule(registry)])
    return ModerationChain([OptOutRule(registry), PublicFigureRule(registry, StoreCameoConsent(characters)),
                            CameoConsentRule(characters)])


def load_moderator(path: str) -> Moderator:
    """``package.module:attribute``: a class or factory called with no arguments, returning a Moderator."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"policy.moderators: {path!r} is not an import path; write package.module:attribute")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"policy.moderators: cannot import {path!r}: {exc}") from None
    moderator = target()
    if not isinstance(moderator, Moderator):
        raise ValueError(f"policy.moderators: {path!r} made a {type(moderator).__name__}, which has no "
                         "check(request) method")
    return moderator


def build_moderator(settings: PolicySettings, registry: RegistryCache,
                    characters: CharacterStore | None = None) -> ModerationChain:
    """The configured chain: the enabled built-in rules, then the operator's moderators, in order.
    Without ``characters`` the cameo rule is left out and public figures are never allowed."""
    consent = StoreCameoConsent(characters) if characters is not None else None
    rules = {"opt_out": lambda: OptOutRule(registry), "public_figure": lambda: PublicFigureRule(registry, consent),
             "cameo_consent": lambda: CameoConsentRule(characters) if characters is not None else None}
    chosen = [rules[r]() for r in settings.rules]
    return ModerationChain([r for r in chosen if r is not None] + [load_moderator(p) for p in settings.moderators])
