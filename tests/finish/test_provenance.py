"""C2PA: dev credentials, signing, trust, tamper detection, and the whole finishing chain."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

import farm
from farm.finish import (
    TRAINED_ALGORITHMIC_MEDIA,
    ClipMeta,
    ProvenanceInfo,
    SignerConfig,
    WatermarkConfig,
    encode_mp4,
    ensure_dev_credentials,
    finish_clip,
    probe_mp4,
    read_frames,
    resolve_signer,
    sign_mp4,
    top_level_boxes,
    verify,
    watermark_box,
)
from tests.finish import box_diff_per_frame, synth_frames

PROMPT = "a secret prompt about a red fox in the snow"
INFO = ProvenanceInfo(
    title="fox.mp4",
    model_id="tiny-wan-test",
    seed=1234,
    steps=4,
    prompt_sha256=hashlib.sha256(PROMPT.encode()).hexdigest(),
    parameters={"guidance_scale": 5.0},
)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(unsigned mp4, signed mp4, dev CA PEM), built once for the module."""
    root = tmp_path_factory.mktemp("prov")
    creds = ensure_dev_credentials(root / "c2pa")
    unsigned = encode_mp4(synth_frames(count=13, height=96, width=128), 24, root / "unsigned.mp4")
    dst = sign_mp4(unsigned, root / "signed.mp4", INFO, creds)
    return unsigned, dst, creds.ca_cert.read_text()


def _flip_mdat_byte(src: Path, dst: Path) -> None:
    boxes = {kind: (offset, size) for kind, offset, size in top_level_boxes(src)}
    offset, size = boxes["mdat"]
    data = bytearray(src.read_bytes())
    data[offset + 8 + (size - 8) // 2] ^= 0x01  # one bit of one media byte, past the header
    dst.write_bytes(bytes(data))


def _actions(manifest: dict) -> list[dict]:
    return [
        action
        for assertion in manifest["assertions"]
        if assertion["label"].startswith("c2pa.actions")
        for action in assertion["data"]["actions"]
    ]


# ---------------------------------------------------------------- credentials


def test_dev_credentials_shape(tmp_path: Path) -> None:
    creds = ensure_dev_credentials(tmp_path / "c2pa")
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    chain = x509.load_pem_x509_certificates(creds.chain.read_bytes())
    leaf = chain[0]

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    # The signer is issued by the CA, not self-signed.
    assert leaf.issuer == ca.subject and leaf.subject != leaf.issuer
    leaf.verify_directly_issued_by(ca)
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.content_commitment
    eku = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"

    assert stat.S_IMODE(creds.key.stat().st_mode) == 0o600


def test_dev_credentials_are_reused(tmp_path: Path) -> None:
    first = ensure_dev_credentials(tmp_path / "c2pa")
    snapshot = [p.read_bytes() for p in (first.ca_cert, first.chain, first.key)]
    second = ensure_dev_credentials(tmp_path / "c2pa")
    assert second == first
    assert [p.read_bytes() for p in (second.ca_cert, second.chain, second.key)] == snapshot


def test_signer_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="together"):
        SignerConfig(cert_chain_path=tmp_path / "chain.pem")
    with pytest.raises(ValidationError):
        SignerConfig(algorithm="md5")
    with pytest.raises(ValueError, match="ps256"):
        resolve_signer(SignerConfig(algorithm="ps256"), tmp_path)
    for name, info in SignerConfig.model_fields.items():
        assert info.description, f"SignerConfig.{name} has no description"


# ---------------------------------------------------------------- sign and verify


def test_trusted_with_dev_ca(signed: tuple[Path, Path, str]) -> None:
    _, path, ca_pem = signed
    result = verify(path, ca_pem)
    assert result.state == "Trusted", result.failures
    assert result.failures == []


def test_untrusted_anchor_is_only_valid(signed: tuple[Path, Path, str], tmp_path: Path) -> None:
    _, path, _ = signed
    assert verify(path).state == "Valid"
    other_ca = ensure_dev_credentials(tmp_path / "other").ca_cert.read_text()
    result = verify(path, other_ca)
    assert result.state == "Valid"
    assert any("untrusted" in failure for failure in result.failures), result.failures


def test_one_flipped_mdat_byte_is_invalid(signed: tuple[Path, Path, str], tmp_path: Path) -> None:
    _, path, ca_pem = signed
    tampered = tmp_path / "tampered.mp4"
    _flip_mdat_byte(path, tampered)
    assert tampered.read_bytes() != path.read_bytes()
    result = verify(tampered, ca_pem)
    assert result.state == "Invalid"
    assert result.failures


def test_unsigned_file_is_reported(signed: tuple[Path, Path, str]) -> None:
    unsigned, _, ca_pem = signed
    assert verify(unsigned, ca_pem).state == "Unsigned"


def test_manifest_declares_ai_generation(signed: tuple[Path, Path, str]) -> None:
    _, path, ca_pem = signed
    manifest = verify(path, ca_pem).active_manifest
    assert manifest is not None
    assert manifest["title"] == "fox.mp4"
    generator = manifest["claim_generator_info"][0]
    assert generator["name"] == farm.GENERATOR_NAME == "videofarm"
    assert generator["version"] == farm.__version__

    created = [a for a in _actions(manifest) if a["action"] == "c2pa.created"]
    assert len(created) == 1
    assert created[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created[0]["softwareAgent"]["name"] == "tiny-wan-test"

    generation = next(a["data"] for a in manifest["assertions"] if a["label"] == "com.videofarm.generation")
    assert generation["model_id"] == "tiny-wan-test"
    assert generation["seed"] == 1234 and generation["steps"] == 4
    assert generation["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()


def test_signed_file_is_still_a_faststart_video(signed: tuple[Path, Path, str]) -> None:
    unsigned, path, _ = signed
    kinds = [kind for kind, _, _ in top_level_boxes(path)]
    assert kinds.index("moov") < kinds.index("mdat"), kinds
    info = probe_mp4(path)
    assert (info.frames, info.width, info.height, info.codec) == (13, 128, 96, "h264")
    np.testing.assert_array_equal(read_frames(path), read_frames(unsigned))


def test_failed_signing_leaves_nothing(tmp_path: Path) -> None:
    creds = ensure_dev_credentials(tmp_path / "c2pa")
    src = tmp_path / "not-video.mp4"
    src.write_bytes(b"this is not an mp4 file" * 10)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception):
        sign_mp4(src, out / "signed.mp4", INFO, creds)
    assert list(out.iterdir()) == []


def test_sign_requires_credentials(signed: tuple[Path, Path, str], tmp_path: Path) -> None:
    unsigned, _, _ = signed
    with pytest.raises(ValueError, match="cert_chain_path"):
        sign_mp4(unsigned, tmp_path / "x.mp4", INFO, SignerConfig())


# ---------------------------------------------------------------- the whole chain


def test_finish_clip_end_to_end(tmp_path: Path) -> None:
    height, width = 96, 128
    frames = synth_frames(count=13, height=height, width=width, seed=7)
    meta = ClipMeta(title="fox", model_id="tiny-wan-test", seed=7, steps=4, prompt=PROMPT, job_id="video_123")
    cfg = WatermarkConfig()
    out = tmp_path / "out"
    clip = finish_clip(frames, 24, out, meta, cfg, SignerConfig(), state_dir=tmp_path / "state")

    assert sorted(p.name for p in out.iterdir()) == ["spritesheet.jpg", "thumbnail.webp", "video.mp4"]
    assert clip.video_bytes == clip.video.stat().st_size > 0
    assert clip.thumbnail_bytes == clip.thumbnail.stat().st_size > 0
    assert clip.spritesheet_bytes == clip.spritesheet.stat().st_size > 0

    ca_pem = (tmp_path / "state" / "c2pa" / "dev-root-ca.pem").read_text()
    result = verify(clip.video, ca_pem)
    assert result.state == "Trusted", result.failures
    # Private prompts stay private: only their hash is in the file.
    assert PROMPT.encode() not in clip.video.read_bytes()
    generation = next(
        a["data"] for a in result.active_manifest["assertions"] if a["label"] == "com.videofarm.generation"
    )
    assert generation["job_id"] == "video_123" and generation["num_frames"] == 13

    info = probe_mp4(clip.video)
    assert (info.frames, info.width, info.height, info.fps, info.pix_fmt) == (13, width, height, 24, "yuv420p")
    # The visible watermark is in the delivered pixels of every frame.
    plain = read_frames(encode_mp4(frames, 24, tmp_path / "plain.mp4"))
    per_frame = box_diff_per_frame(plain, read_frames(clip.video), watermark_box(height, width, cfg))
    assert (per_frame > 8).all(), per_frame
