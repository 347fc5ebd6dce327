"""C2PA provenance for finished clips: dev credentials, signing and verification.

Signing uses ``c2pa-python`` and always runs on a completely written MP4 (src) and
produces a new file (dst), so the manifest's hard binding covers every media byte.
Verification uses a per-call ``c2pa.Context`` whose settings carry the trust anchors;
the deprecated thread-local ``c2pa.load_settings`` is not used.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, model_validator

import farm

if TYPE_CHECKING:
    from farm.secrets import SharedSecrets

logger = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
ACTIONS_LABEL = "c2pa.actions.v2"
GENERATION_LABEL = "com.videofarm.generation"

# The ingredient label the derived clip's c2pa.opened action names; c2pa-rs turns it into a
# hashed-URI reference to the ingredient assertion when it signs.
PARENT_LABEL = "parent"
DerivationAction = Literal["remix", "edit", "extend"]

Algorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]
ValidationState = Literal["Trusted", "Valid", "Invalid", "Unsigned"]

_CA_FILE, _CHAIN_FILE, _KEY_FILE = "dev-root-ca.pem", "dev-signer-chain.pem", "dev-signer.key"
# Regenerate the dev signer this long before it expires, so a clip is never signed
# with a certificate about to lapse.
_RENEW_BEFORE = dt.timedelta(days=7)


class SignerConfig(BaseModel):
    """Which certificate and key sign the C2PA manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_chain_path: Path | None = Field(
        default=None,
        description="PEM chain: signer certificate first, then intermediates (no root). "
        "None with key_path None means: use generated dev credentials.",
    )
    key_path: Path | None = Field(
        default=None, description="PEM private key matching the signer certificate."
    )
    algorithm: Algorithm = Field(default="es256", description="C2PA signing algorithm of the key.")
    tsa_url: str | None = Field(
        default=None,
        description="RFC 3161 timestamp authority URL; None (default) signs without a timestamp.",
    )

    @model_validator(mode="after")
    def _paths_together(self) -> SignerConfig:
        if (self.cert_chain_path is None) != (self.key_path is None):
            raise ValueError(
                "cert_chain_path and key_path must be set together or both left unset, got "
                f"cert_chain_path={self.cert_chain_path} key_path={self.key_path}"
            )
        if self.tsa_url is not None and not self.tsa_url.startswith(("http://", "https://")):
            raise ValueError(f"tsa_url must be an http(s) URL, got {self.tsa_url!r}")
        return self

    @property
    def has_credentials(self) -> bool:
        return self.cert_chain_path is not None


@dataclass(frozen=True)
class DevCredentials:
    """Paths of the generated development root CA, signer chain and signer key."""

    ca_cert: Path
    chain: Path
    key: Path

    def signer_config(self, tsa_url: str | None = None) -> SignerConfig:
        return SignerConfig(cert_chain_path=self.chain, key_path=self.key, algorithm="es256", tsa_url=tsa_url)


class ProvenanceInfo(BaseModel):
    """What the manifest says about how a clip was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1, description="Human-readable title of the asset.")
    model_id: str = Field(min_length=1, description="Id of the generative model that rendered the clip.")
    seed: int | None = Field(default=None, description="Random seed of the generation.")
    steps: int | None = Field(default=None, ge=1, description="Number of denoising steps.")
    prompt_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the prompt; the prompt itself is never embedded.",
    )
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Further generation parameters (guidance scale, resolution, job id, ...).",
    )


@dataclass(frozen=True)
class ParentSource:
    """The clip a remix, edit or extension was made from, as its manifest records it.

    ``path`` is a local copy of the source MP4 exactly as stored (its own C2PA manifest, if it
    has one, becomes the ingredient's manifest); ``video_id`` is None for an uploaded source.
    """

    path: Path
    action: DerivationAction
    video_id: str | None
    title: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of reading and validating a file's C2PA manifest store."""

    state: ValidationState
    manifest: dict[str, Any] | None
    failures: list[str] = field(default_factory=list)

    @property
    def active_manifest(self) -> dict[str, Any] | None:
        if not self.manifest:
            return None
        return self.manifest.get("manifests", {}).get(self.manifest.get("active_manifest", ""))


# ---------------------------------------------------------------- dev credentials


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _still_valid(creds: DevCredentials) -> bool:
    if not all(p.is_file() for p in (creds.ca_cert, creds.chain, creds.key)):
        return False
    try:
        cert = x509.load_pem_x509_certificate(creds.chain.read_bytes())
    except ValueError:
        logger.warning("dev signer certificate %s is unreadable; regenerating", creds.chain)
        return False
    return cert.not_valid_after_utc - _RENEW_BEFORE > dt.datetime.now(dt.timezone.utc)


def _generate(creds: DevCredentials) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "videofarm development"),
        x509.NameAttribute(NameOID.COMMON_NAME, "videofarm dev root CA"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "videofarm development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "videofarm dev signer"),
        ]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # C2PA rejects serverAuth-only signers; emailProtection is on its allowed EKU list.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    # The CA key is deliberately not kept: it is only needed to issue this one signer.
    _write_private(creds.key, key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write_private(creds.ca_cert, ca_cert.public_bytes(pem), 0o644)
    # The chain holds the signer only: the root is the trust anchor and is not embedded.
    _write_private(creds.chain, cert.public_bytes(pem), 0o644)


def ensure_dev_credentials(directory: Path, shared: SharedSecrets | None = None) -> DevCredentials:
    """Return the dev root CA and signer under ``directory``, generating them on first use.

    Idempotent and safe across processes (an exclusive file lock guards generation).
    The signer is an EC P-256 end-entity certificate (digitalSignature, EKU
    emailProtection) issued by a self-signed dev root CA; trust that CA to get
    ``Trusted`` from :func:`verify`. For development only.

    With ``shared`` (the farm's :class:`~farm.secrets.SharedSecrets`), every node uses one set:
    the first to ask stores its own, the others write the stored one into ``directory``; one
    that finds the stored set near expiry renews it by compare-and-set.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds = DevCredentials(directory / _CA_FILE, directory / _CHAIN_FILE, directory / _KEY_FILE)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            stored = shared.get(_SHARED_NAME) if shared is not None else None
            if stored is not None:
                _unpack(stored, creds)
            if not _still_valid(creds):
                logger.info("generating C2PA dev credentials in %s", directory)
                _generate(creds)
            if shared is not None:
                mine = _pack(creds)
                if stored is None:
                    winner = shared.get_or_create(_SHARED_NAME, lambda: mine)
                else:
                    winner = stored if stored == mine else shared.replace(_SHARED_NAME, stored, mine)
                if winner != mine:
                    _unpack(winner, creds)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return creds


_SHARED_NAME = "c2pa_dev_credentials"


def _pack(creds: DevCredentials) -> bytes:
    return json.dumps({"ca": creds.ca_cert.read_text(), "chain": creds.chain.read_text(),
                       "key": creds.key.read_text()}).encode()


def _unpack(value: bytes, creds: DevCredentials) -> None:
    files = json.loads(value)
    for path, text, mode in ((creds.ca_cert, files["ca"], 0o644), (creds.chain, files["chain"], 0o644),
                             (creds.key, files["key"], 0o600)):
        if not path.is_file() or path.read_text() != text:
            _write_private(path, text.encode(), mode)


# ---------------------------------------------------------------- signing


# Why each derivation records what it does (C2PA 2.x actions): a clip with a parentOf ingredient
# opens it first (c2pa.opened, referencing that ingredient; c2pa.created would claim it was made
# from nothing). Then one c2pa.edited by the model: for a remix and an edit every output frame is
# the model's (the source's frames condition it, none is copied), so its digital source type is
# trainedAlgorithmicMedia; an extension keeps the source's frames and appends the model's, so it
# is compositeWithTrainedAlgorithmicMedia.
_DERIVED_EDITS: dict[str, tuple[str, str]] = {
    "remix": (TRAINED_ALGORITHMIC_MEDIA,
              "remix: every frame re-rendered by the model from the source's frames and a new prompt"),
    "edit": (TRAINED_ALGORITHMIC_MEDIA,
             "edit: every frame re-rendered by the model from the source's frames and an edit prompt"),
    "extend": (COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
               "extend: the source's frames followed by new frames the model rendered continuing them"),
}


def derived_actions(action: DerivationAction, model_id: str) -> list[dict[str, Any]]:
    """The actions of a clip derived from a parent by ``action`` (remix, edit, extend)."""
    if action not in _DERIVED_EDITS:
        raise ValueError(f"derived_from.action: {action!r} is not known; allowed: remix, edit, extend")
    source_type, description = _DERIVED_EDITS[action]
    return [
        # c2pa-rs resolves ingredientIds (the ingredient's label) to a hashed URI at signing.
        {"action": "c2pa.opened", "parameters": {"ingredientIds": [PARENT_LABEL]}},
        {
            "action": "c2pa.edited",
            "digitalSourceType": source_type,
            "softwareAgent": {"name": model_id},
            "description": description,
            "parameters": {"model_id": model_id},
        },
    ]


def build_manifest(info: ProvenanceInfo, parent: ParentSource | None = None) -> dict[str, Any]:
    """The manifest definition for an AI-generated clip; with ``parent``, for one derived from it.

    The parent ingredient itself is added by :func:`sign_mp4` (it needs the source's bytes).
    """
    generation: dict[str, Any] = {"model_id": info.model_id, "generator": farm.GENERATOR_NAME}
    if info.seed is not None:
        generation["seed"] = info.seed
    if info.steps is not None:
        generation["steps"] = info.steps
    if info.prompt_sha256 is not None:
        generation["prompt_sha256"] = info.prompt_sha256
    generation.update(info.parameters)

    if parent is None:
        actions = [
            {
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                # The model is the agent that made the pixels; videofarm is
                # the claim generator that ran it.
                "softwareAgent": {"name": info.model_id},
                "parameters": {"model_id": info.model_id},
            }
        ]
    else:
        actions = derived_actions(parent.action, info.model_id)
        generation["derived_from_action"] = parent.action
        if parent.video_id is not None:
            generation["derived_from_video_id"] = parent.video_id

    return {
        "title": info.title,
        "format": "video/mp4",
        "claim_generator_info": [{"name": farm.GENERATOR_NAME, "version": farm.__version__}],
        "assertions": [
            {"label": ACTIONS_LABEL, "data": {"actions": actions}},
            {"label": GENERATION_LABEL, "data": generation},
        ],
    }


def _load_signer(signer: SignerConfig | DevCredentials) -> c2pa.Signer:
    if isinstance(signer, DevCredentials):
        signer = signer.signer_config()
    if signer.cert_chain_path is None or signer.key_path is None:
        raise ValueError(
            "SignerConfig has no cert_chain_path/key_path; pass ensure_dev_credentials(dir) "
            "or an operator certificate and key"
        )
    try:
        chain, key = signer.cert_chain_path.read_bytes(), signer.key_path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read signing credentials: {exc}") from exc
    info = c2pa.C2paSignerInfo(signer.algorithm, chain, key, signer.tsa_url)
    return c2pa.Signer.from_info(info)


def sign_mp4(
    src: Path,
    dst: Path,
    info: ProvenanceInfo,
    signer: SignerConfig | DevCredentials,
    parent: ParentSource | None = None,
    trust_anchors_pem: str | None = None,
) -> Path:
    """Embed a signed C2PA manifest for ``info`` into the finished MP4 ``src``, writing ``dst``.

    ``src`` must be completely written: the manifest hashes its media bytes. ``dst`` is
    written to a temporary file beside it and renamed into place, so readers never see
    a half-signed clip. Returns ``dst``.

    With ``parent``, the source MP4 becomes the manifest's ``parentOf`` ingredient: c2pa-rs
    validates it (its signature and hard binding, and trust against ``trust_anchors_pem`` when
    given) and keeps its manifest store, so the new manifest records the source's validation
    results as of signing and the chain can be walked down to the original. A source without
    a manifest becomes an ingredient without one.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"cannot sign {src}: no such file")
    if src.resolve() == dst.resolve():
        raise ValueError(f"sign_mp4 needs distinct src and dst, got {src} for both")
    if parent is not None and not Path(parent.path).is_file():
        raise FileNotFoundError(f"cannot sign {src}: its parent {parent.path} does not exist")
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    manifest = build_manifest(info, parent)
    try:
        with (
            _load_signer(signer) as c2pa_signer,
            c2pa.Context.from_dict(reader_settings(trust_anchors_pem)) as context,
            c2pa.Builder(manifest, context=context) as builder,
            open(src, "rb") as source,
            open(tmp, "w+b") as dest,
        ):
            if parent is not None:
                ingredient = {"title": parent.title, "relationship": "parentOf", "label": PARENT_LABEL}
                with open(parent.path, "rb") as parent_stream:
                    builder.add_ingredient(ingredient, "video/mp4", parent_stream)
            builder.sign(c2pa_signer, "video/mp4", source, dest)
            dest.flush()
            os.fsync(dest.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("signed %s -> %s (%s%s)", src, dst, info.model_id,
                 f", {parent.action} of {parent.title}" if parent is not None else "")
    return dst


# ---------------------------------------------------------------- verification


def reader_settings(trust_anchors_pem: str | None) -> dict[str, Any]:
    """c2pa Context settings for validating: trust checked against the given PEM roots, nothing fetched."""
    # No network here or in most deployments: never fetch OCSP or remote manifests.
    settings: dict[str, Any] = {
        "verify": {
            "verify_after_reading": True,
            "verify_trust": trust_anchors_pem is not None,
            "ocsp_fetch": False,
            "remote_manifest_fetch": False,
        }
    }
    if trust_anchors_pem is not None:
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    return settings


def verify(path: Path, trust_anchors_pem: str | None = None) -> VerifyResult:
    """Read and validate the C2PA manifest store of ``path``.

    With ``trust_anchors_pem`` (PEM roots), a valid manifest whose signer chains to one
    of them is ``Trusted``; without it, ``Valid`` is the best outcome. Tampered media
    gives ``Invalid``; a file without a manifest gives ``Unsigned``.
    """
    path = Path(path)
    with c2pa.Context.from_dict(reader_settings(trust_anchors_pem)) as context:
        try:
            with open(path, "rb") as stream, c2pa.Reader("video/mp4", stream, None, context) as reader:
                store = json.loads(reader.json())
        except c2pa.C2paError.ManifestNotFound:
            return VerifyResult(state="Unsigned", manifest=None)
    state = store.get("validation_state", "Invalid")
    failures = [
        f"{item.get('code')}: {item.get('explanation', '')}"
        for item in store.get("validation_status", []) or []
    ]
    if state not in ("Trusted", "Valid", "Invalid"):
        raise ValueError(f"unexpected C2PA validation_state {state!r} for {path}")
    return VerifyResult(state=state, manifest=store, failures=failures)
