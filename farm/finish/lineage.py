"""Walk a clip's C2PA ingredient chain: every manifest from the file down to the original.

c2pa-rs validates a whole manifest store when it reads a file, but its one ``validation_state``
is about the active manifest; the ingredients' outcomes are spread over two places, and this
module puts them back on the link they belong to:

- each ingredient assertion carries ``validation_results``: how the signer's c2pa found the
  ingredient when it added it (a source whose media had been altered is caught here: only the
  signer had its bytes, and the result is signed into the child);
- the reader's ``validation_results.ingredientDeltas``, keyed by the ingredient assertion's URI,
  says what differs now: a manifest altered inside the child (``ingredient.manifest.mismatch``,
  ``claimSignature.mismatch``) or a signer these trust anchors do not trust.

A link is ``Invalid`` with any failure from either, ``Unsigned`` when the ingredient has no
manifest (an uploaded clip without one: the provenance starts there), ``Trusted`` when its
signer chains to the given anchors, else ``Valid``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import c2pa

from farm.finish.provenance import ACTIONS_LABEL, reader_settings

LinkState = Literal["Trusted", "Valid", "Invalid", "Unsigned"]

_TRUSTED, _UNTRUSTED = "signingCredential.trusted", "signingCredential.untrusted"
# A loop of manifests cannot be signed honestly, but a crafted file could claim one; and a walk
# this deep is not a provenance chain anyone made.
_MAX_DEPTH = 64


@dataclass(frozen=True)
class ChainLink:
    """One manifest (or manifest-less ingredient) in a clip's provenance chain."""

    depth: int  # 0: the file itself; n: an ingredient n steps down
    title: str
    relationship: str | None  # the ingredient's relationship to the link above; None for the file
    manifest: str | None  # the manifest's label; None for an ingredient without a manifest
    state: LinkState
    failures: tuple[str, ...]  # "code: explanation" for each failure found at this link
    actions: tuple[str, ...]  # the manifest's actions, in order

    @property
    def where(self) -> str:
        return "the file itself" if self.depth == 0 else f"ingredient {self.title!r} at depth {self.depth}"


@dataclass(frozen=True)
class ChainReport:
    """Every link from the file down; ``state`` is the chain's worst signed link."""

    links: tuple[ChainLink, ...]

    @property
    def state(self) -> LinkState:
        if not self.links or self.links[0].state == "Unsigned":
            return "Unsigned"
        states = {link.state for link in self.links}
        for worst in ("Invalid", "Valid"):
            if worst in states:
                return worst  # type: ignore[return-value]
        # An ingredient without a manifest does not weaken the chain: it says where it starts.
        return "Trusted"

    @property
    def broken(self) -> tuple[ChainLink, ...]:
        """The links that failed validation, top first."""
        return tuple(link for link in self.links if link.state == "Invalid")

    def lines(self) -> list[str]:
        """A human-readable tree, one line per link and one per failure."""
        out = []
        for link in self.links:
            pad = "  " * link.depth
            head = link.title if link.relationship is None else f"{link.relationship} {link.title}"
            actions = f"  [{', '.join(link.actions)}]" if link.actions else ""
            note = "  (no manifest)" if link.state == "Unsigned" and link.depth else ""
            out.append(f"{pad}{head}: {link.state}{actions}{note}")
            out.extend(f"{pad}    {failure}" for failure in link.failures)
        return out


def verify_chain(path: Path, trust_anchors_pem: str | None = None) -> ChainReport:
    """Read ``path`` and validate each manifest of its ingredient chain, recursively.

    With ``trust_anchors_pem`` a link whose signer chains to one of those roots is
    ``Trusted``; without it ``Valid`` is the best a link can be.
    """
    path = Path(path)
    with c2pa.Context.from_dict(reader_settings(trust_anchors_pem)) as context:
        try:
            with open(path, "rb") as stream, c2pa.Reader("video/mp4", stream, None, context) as reader:
                store = json.loads(reader.json())
        except c2pa.C2paError.ManifestNotFound:
            return ChainReport((ChainLink(0, path.name, None, None, "Unsigned", (), ()),))
    return ChainReport(tuple(_walk(store, trust_anchors_pem is not None)))


def _walk(store: dict[str, Any], anchored: bool) -> list[ChainLink]:
    manifests: dict[str, Any] = store.get("manifests") or {}
    results = store.get("validation_results") or {}
    deltas = {
        delta.get("ingredientAssertionURI"): delta.get("validationDeltas") or {}
        for delta in results.get("ingredientDeltas") or []
    }
    active = store.get("active_manifest")
    links: list[ChainLink] = []
    if active not in manifests:
        return [ChainLink(0, "(no active manifest)", None, active, "Invalid",
                          ("manifest.missing: the store names no readable active manifest",), ())]

    own = results.get("activeManifest") or {}
    failures = _failures(own)
    if not own and store.get("validation_status"):  # readers that report only a flat list
        failures = [_status(item) for item in store["validation_status"] if item.get("code") != _TRUSTED]
    trusted = store.get("validation_state") == "Trusted" or _has(own.get("success"), _TRUSTED)
    top = manifests[active]
    links.append(_link(0, top.get("title") or "(untitled)", None, active, failures, trusted, anchored, top))

    # Depth first, so the printed tree reads top to bottom; each entry knows its ancestors, so a
    # manifest reached twice by different paths is fine and only one below itself is a loop.
    stack: list[tuple[int, tuple[str, ...], dict[str, Any]]] = [
        (1, (active,), ing) for ing in reversed(_ingredients(top))
    ]
    while stack:
        depth, ancestors, ingredient = stack.pop()
        owner = ancestors[-1]
        title = ingredient.get("title") or "(untitled)"
        relationship = ingredient.get("relationship") or "componentOf"
        label = ingredient.get("active_manifest")
        if label is None:
            links.append(ChainLink(depth, title, relationship, None, "Unsigned", (), ()))
            continue
        uri = f"self#jumbf=/c2pa/{owner}/c2pa.assertions/{ingredient.get('label', '')}"
        recorded = (ingredient.get("validation_results") or {}).get("activeManifest") or {}
        delta = deltas.get(uri, {})
        failures = _failures(recorded) + _failures(delta)
        # ingredient v2 assertions carry a flat status list instead of validation_results
        failures += [_status(item) for item in ingredient.get("validation_status") or []
                     if item.get("code") != _TRUSTED]
        # The delta is today's word on trust; where it is silent, the recorded result stands.
        if _has(delta.get("success"), _TRUSTED) or _has(delta.get("failure"), _UNTRUSTED):
            trusted = _has(delta.get("success"), _TRUSTED)
            failures = [f for f in failures if not (f.startswith(_UNTRUSTED) and trusted)]
        else:
            trusted = _has(recorded.get("success"), _TRUSTED)
        manifest = manifests.get(label)
        if manifest is None:
            failures.append(f"manifest.missing: ingredient names manifest {label}, which the store lacks")
        if label in ancestors:
            failures.append(f"ingredient.loop: manifest {label} appears again below itself")
            manifest = None
        elif depth > _MAX_DEPTH:
            failures.append(f"ingredient.tooDeep: the chain goes on past {_MAX_DEPTH} links; not walked further")
            manifest = None
        links.append(_link(depth, title, relationship, label, failures, trusted, anchored, manifest or {}))
        if manifest is not None:
            stack.extend((depth + 1, (*ancestors, label), ing) for ing in reversed(_ingredients(manifest)))
    return links


def _link(depth: int, title: str, relationship: str | None, label: str | None, failures: list[str],
          trusted: bool, anchored: bool, manifest: dict[str, Any]) -> ChainLink:
    # An untrusted signer is a trust outcome (Valid), not a broken link.
    hard = [f for f in failures if not f.startswith(_UNTRUSTED)]
    state: LinkState = "Invalid" if hard else ("Trusted" if anchored and trusted and not failures else "Valid")
    return ChainLink(depth, title, relationship, label, state, tuple(dict.fromkeys(failures)), _actions(manifest))


def _ingredients(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return list(manifest.get("ingredients") or [])


def _actions(manifest: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        action.get("action", "?")
        for assertion in manifest.get("assertions") or []
        if assertion.get("label") in (ACTIONS_LABEL, "c2pa.actions")
        for action in (assertion.get("data") or {}).get("actions") or []
    )


def _failures(results: dict[str, Any]) -> list[str]:
    return [_status(item) for item in results.get("failure") or []]


def _status(item: dict[str, Any]) -> str:
    return f"{item.get('code')}: {item.get('explanation', '')}"


def _has(items: list[dict[str, Any]] | None, code: str) -> bool:
    return any(item.get("code") == code for item in items or [])
