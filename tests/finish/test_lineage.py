"""The C2PA ingredient chain of derived clips: original → remix → extension, through finish_clip.

Real c2pa-python, real MP4s from the finishing chain (watermark, H.264, signing), tiny frames.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from farm.finish import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    PARENT_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    ClipMeta,
    ParentSource,
    SignerConfig,
    WatermarkConfig,
    derived_actions,
    encode_mp4,
    ensure_dev_credentials,
    finish_clip,
    read_frames,
    sign_mp4,
    top_level_boxes,
    verify,
    verify_chain,
)
from farm.finish.provenance import ProvenanceInfo
from tests.finish import synth_frames

HEIGHT, WIDTH, FRAMES = 64, 96, 9
PROMPTS = {"original": "a lighthouse at dusk", "remix": "the lighthouse in a storm",
           "extend": "the storm passes over the lighthouse"}


def _digest(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode()).hexdigest().encode()


@dataclass(frozen=True)
class Chain:
    state_dir: Path
    ca_pem: str
    original: Path
    remix: Path
    extension: Path


def _finish(state_dir: Path, out: Path, name: str, seed: int, parent: ParentSource | None = None) -> Path:
    meta = ClipMeta(title=name, model_id="tiny-wan-test", seed=seed, steps=2, prompt=PROMPTS.get(name, name),
                    job_id=f"video_{name}")
    frames = synth_frames(count=FRAMES, height=HEIGHT, width=WIDTH, seed=seed)
    clip = finish_clip(frames, 24, out / name, meta, WatermarkConfig(), SignerConfig(), state_dir, parent=parent)
    return clip.video


def _parent(path: Path, action: str, video_id: str | None) -> ParentSource:
    return ParentSource(path=path, action=action, video_id=video_id, title=f"{video_id or 'upload'}.mp4")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    root = tmp_path_factory.mktemp("lineage")
    state = root / "state"
    original = _finish(state, root, "original", 1)
    remix = _finish(state, root, "remix", 2, _parent(original, "remix", "video_original"))
    extension = _finish(state, root, "extend", 3, _parent(remix, "extend", "video_remix"))
    ca_pem = (state / "c2pa" / "dev-root-ca.pem").read_text()
    return Chain(state, ca_pem, original, remix, extension)


def _flip_mdat_byte(src: Path, dst: Path) -> Path:
    boxes = {kind: (offset, size) for kind, offset, size in top_level_boxes(src)}
    offset, size = boxes["mdat"]
    data = bytearray(src.read_bytes())
    data[offset + 8 + (size - 8) // 2] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def _alter_once(src: Path, dst: Path, needle: bytes) -> Path:
    """Change one hex digit of ``needle``, which must occur exactly once in ``src``."""
    data = src.read_bytes()
    assert data.count(needle) == 1, f"{needle!r} occurs {data.count(needle)} times"
    at = data.index(needle)
    swapped = b"0" if data[at:at + 1] != b"0" else b"1"
    dst.write_bytes(data[:at] + swapped + data[at + 1:])
    return dst


def _actions(manifest: dict) -> list[dict]:
    return [action for assertion in manifest["assertions"] if assertion["label"].startswith("c2pa.actions")
            for action in assertion["data"]["actions"]]


def _generation(manifest: dict) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == "com.videofarm.generation")


# ---------------------------------------------------------------- the chain validates


def test_extension_validates_trusted_down_to_the_original(chain: Chain) -> None:
    assert verify(chain.extension, chain.ca_pem).state == "Trusted"
    report = verify_chain(chain.extension, chain.ca_pem)
    assert report.state == "Trusted", report.lines()
    assert [(link.depth, link.relationship, link.state) for link in report.links] == [
        (0, None, "Trusted"), (1, "parentOf", "Trusted"), (2, "parentOf", "Trusted")
    ]
    assert [link.title for link in report.links] == ["extend", "video_remix.mp4", "video_original.mp4"]
    assert report.broken == ()
    # Each link is a distinct manifest, the original's the one that was created from nothing.
    assert len({link.manifest for link in report.links}) == 3
    assert [link.actions for link in report.links] == [
        ("c2pa.opened", "c2pa.edited"), ("c2pa.opened", "c2pa.edited"), ("c2pa.created",)
    ]


def test_the_ingredient_keeps_the_sources_own_manifest(chain: Chain) -> None:
    """The remix's manifest, as read from the remix file, is the same manifest inside the extension."""
    remix_alone = verify(chain.remix, chain.ca_pem)
    inside = verify(chain.extension, chain.ca_pem)
    label = remix_alone.manifest["active_manifest"]
    ingredient = inside.active_manifest["ingredients"][0]
    assert ingredient["relationship"] == "parentOf" and ingredient["active_manifest"] == label
    assert inside.manifest["manifests"][label]["signature_info"] == remix_alone.active_manifest["signature_info"]
    assert _generation(inside.manifest["manifests"][label]) == _generation(remix_alone.active_manifest)


def test_actions_per_derivation(chain: Chain) -> None:
    remix = verify(chain.remix, chain.ca_pem).active_manifest
    extension = verify(chain.extension, chain.ca_pem).active_manifest
    for manifest, source_type, action in ((remix, TRAINED_ALGORITHMIC_MEDIA, "remix"),
                                          (extension, COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, "extend")):
        opened, edited = _actions(manifest)
        assert opened["action"] == "c2pa.opened"
        # c2pa.opened references the parentOf ingredient assertion by hashed URI.
        (reference,) = opened["parameters"]["ingredients"]
        (ingredient,) = manifest["ingredients"]
        assert ingredient["relationship"] == "parentOf"
        assert reference["url"] == f"self#jumbf=c2pa.assertions/{ingredient['label']}" and reference["hash"]
        assert edited["action"] == "c2pa.edited" and edited["digitalSourceType"] == source_type
        assert edited["softwareAgent"]["name"] == "tiny-wan-test"
        assert not any(a["action"] == "c2pa.created" for a in _actions(manifest))
        assert _generation(manifest)["derived_from_action"] == action
    assert _generation(remix)["derived_from_video_id"] == "video_original"
    assert _generation(extension)["derived_from_video_id"] == "video_remix"


def test_edit_records_what_a_remix_does_with_its_own_description() -> None:
    remix, edit = derived_actions("remix", "m"), derived_actions("edit", "m")
    assert [a["action"] for a in edit] == ["c2pa.opened", "c2pa.edited"]
    assert edit[0]["parameters"] == {"ingredientIds": [PARENT_LABEL]}
    assert edit[1]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert edit[1]["description"].startswith("edit:") and remix[1]["description"].startswith("remix:")
    with pytest.raises(ValueError, match="derived_from.action: 'crop'.*remix, edit, extend"):
        derived_actions("crop", "m")  # type: ignore[arg-type]


# ---------------------------------------------------------------- tampering breaks the chain, at its link


def test_a_tampered_source_is_recorded_and_breaks_the_chain_at_the_parent(chain: Chain, tmp_path: Path) -> None:
    """One flipped media byte in the source before it is derived from: the child is honestly signed
    (c2pa's own state for the file stays Trusted) but records the parent's failure, and the chain
    says where."""
    tampered = _flip_mdat_byte(chain.original, tmp_path / "original-tampered.mp4")
    assert verify(tampered, chain.ca_pem).state == "Invalid"
    child = _finish(chain.state_dir, tmp_path, "remix", 2, _parent(tampered, "remix", "video_original"))

    assert verify(child, chain.ca_pem).state == "Trusted"  # why the walk is needed
    report = verify_chain(child, chain.ca_pem)
    assert report.state == "Invalid"
    assert [link.state for link in report.links] == ["Trusted", "Invalid"]
    (broken,) = report.broken
    assert broken.depth == 1 and broken.title == "video_original.mp4"
    assert any(f.startswith("assertion.bmffHash.mismatch") for f in broken.failures), broken.failures
    assert "ingredient 'video_original.mp4' at depth 1" == broken.where


@pytest.mark.parametrize(("whose", "depth"), [("remix", 1), ("original", 2)])
def test_an_altered_ancestor_manifest_breaks_the_chain_at_that_link(
    chain: Chain, tmp_path: Path, whose: str, depth: int
) -> None:
    """One hex digit of an ancestor's prompt hash (inside its generation assertion, as the
    extension file carries it) changed."""
    tampered = _alter_once(chain.extension, tmp_path / "tampered.mp4", _digest(PROMPTS[whose]))
    # The media is untouched; only the manifest store changed.
    np.testing.assert_array_equal(read_frames(tampered), read_frames(chain.extension))

    assert verify(tampered, chain.ca_pem).state == "Invalid"
    report = verify_chain(tampered, chain.ca_pem)
    assert report.state == "Invalid"
    assert [link.depth for link in report.broken] == [depth]
    assert report.links[0].state == "Trusted"  # the extension's own claim and media are intact
    failures = report.broken[0].failures
    assert any(f.startswith("ingredient.manifest.mismatch") for f in failures), failures


def test_tampered_child_media_breaks_the_top_link(chain: Chain, tmp_path: Path) -> None:
    tampered = _flip_mdat_byte(chain.extension, tmp_path / "extension-tampered.mp4")
    report = verify_chain(tampered, chain.ca_pem)
    assert report.state == "Invalid"
    assert [link.depth for link in report.broken] == [0]
    assert report.broken[0].where == "the file itself"
    assert any(f.startswith("assertion.bmffHash.mismatch") for f in report.broken[0].failures)
    assert [link.state for link in report.links[1:]] == ["Trusted", "Trusted"]


# ---------------------------------------------------------------- uploaded sources, other signers


def test_an_uploaded_source_without_a_manifest_is_an_ingredient_without_one(chain: Chain, tmp_path: Path) -> None:
    upload = encode_mp4(synth_frames(count=FRAMES, height=HEIGHT, width=WIDTH, seed=9), 24, tmp_path / "upload.mp4")
    assert verify(upload).state == "Unsigned"
    child = _finish(chain.state_dir, tmp_path, "edit", 4, _parent(upload, "edit", None))

    result = verify(child, chain.ca_pem)
    assert result.state == "Trusted", result.failures
    (ingredient,) = result.active_manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and "active_manifest" not in ingredient
    assert "derived_from_video_id" not in _generation(result.active_manifest)
    report = verify_chain(child, chain.ca_pem)
    assert [(link.state, link.manifest) for link in report.links[1:]] == [("Unsigned", None)]
    assert report.state == "Trusted"
    assert "(no manifest)" in report.lines()[1]


def test_an_uploaded_source_signed_by_another_ca_is_valid_not_trusted(chain: Chain, tmp_path: Path) -> None:
    other = ensure_dev_credentials(tmp_path / "other-ca")
    unsigned = encode_mp4(synth_frames(count=FRAMES, height=HEIGHT, width=WIDTH, seed=5), 24, tmp_path / "u.mp4")
    foreign = sign_mp4(unsigned, tmp_path / "foreign.mp4", ProvenanceInfo(title="elsewhere", model_id="cam"), other)
    child = _finish(chain.state_dir, tmp_path, "edit", 4, _parent(foreign, "edit", None))

    report = verify_chain(child, chain.ca_pem)
    assert [link.state for link in report.links] == ["Trusted", "Valid"]
    assert report.state == "Valid" and report.broken == ()
    assert any("untrusted" in f for f in report.links[1].failures)
    # Trusting both roots makes every link Trusted.
    both = verify_chain(child, chain.ca_pem + other.ca_cert.read_text())
    assert both.state == "Trusted", both.lines()


def test_without_our_root_no_link_is_trusted(chain: Chain, tmp_path: Path) -> None:
    stranger = ensure_dev_credentials(tmp_path / "stranger").ca_cert.read_text()
    for anchors in (None, stranger):
        report = verify_chain(chain.extension, anchors)
        assert [link.state for link in report.links] == ["Valid", "Valid", "Valid"], anchors is None
        assert report.state == "Valid"


def test_a_plain_clip_is_a_chain_of_one_and_an_unsigned_file_is_unsigned(chain: Chain, tmp_path: Path) -> None:
    report = verify_chain(chain.original, chain.ca_pem)
    assert [(link.depth, link.state, link.actions) for link in report.links] == [(0, "Trusted", ("c2pa.created",))]
    plain = encode_mp4(synth_frames(count=FRAMES, height=HEIGHT, width=WIDTH), 24, tmp_path / "plain.mp4")
    assert verify_chain(plain, chain.ca_pem).state == "Unsigned"


def test_a_missing_parent_file_fails_and_leaves_nothing(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="parent"):
        _finish(chain.state_dir, out, "remix", 2, _parent(tmp_path / "gone.mp4", "remix", "video_gone"))
    assert [p.name for p in (out / "remix").iterdir() if not p.name.startswith(".")] == []


# ---------------------------------------------------------------- farm verify


def test_farm_verify_prints_the_chain_and_says_where_it_breaks(
    chain: Chain, tmp_path: Path, monkeypatch, capsys
) -> None:
    from farm.cli import main

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    anchors = tmp_path / "ca.pem"
    anchors.write_text(chain.ca_pem)

    assert main(["verify", str(chain.extension), "--trust-anchors", str(anchors)]) == 0
    out = capsys.readouterr().out
    assert "c2pa:  Trusted" in out and "chain: Trusted, 3 links" in out
    assert "  parentOf video_remix.mp4: Trusted  [c2pa.opened, c2pa.edited]" in out
    assert "    parentOf video_original.mp4: Trusted  [c2pa.created]" in out
    assert "broken:" not in out

    tampered = _alter_once(chain.extension, tmp_path / "tampered.mp4", _digest(PROMPTS["remix"]))
    assert main(["verify", str(tampered), "--trust-anchors", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "chain: Invalid, 3 links" in out
    assert "broken: ingredient 'video_remix.mp4' at depth 1" in out
