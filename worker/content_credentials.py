"""C2PA Content Credentials: a signed manifest in every image, saying it was created by a trained model, and which.

The manifest holds a `c2pa.actions` assertion with one `c2pa.created` action (IPTC's digital source type
`trainedAlgorithmicMedia`, the engine and model as its software agent) and the generation data the image
itself carries (without the prompt when the task is private). It is signed with the certificate chain and key
from --c2pa-cert and --c2pa-key; without them the worker makes a local certificate authority and a signing
certificate on first start, keeps them in --c2pa-dir, and says loudly that its credentials are self-signed:
C2PA readers then report the manifest as valid (bound to the pixels, signature intact) but its signer as not
on their trust list. Signing runs in the result writer, off the generation thread; c2pa's native library
releases the GIL while it hashes and signs.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mflux_server import __version__
from mflux_server.store import capabilities_of
from mflux_server.worker.generation_data import DIGITAL_SOURCE_TYPE, GenerationData

log = logging.getLogger("mflux-worker")
CERTIFICATE, KEY = "signer-chain.pem", "signer-key.pem"
LABEL = "org.mflux-server.generation"  # our assertion: the generation data, as the image's XMP holds it


@dataclass(frozen=True)
class SignerFiles:
    """A PEM certificate chain (signer first) and its PEM private key, and whether they were made here."""

    chain: bytes
    key: bytes
    self_signed: bool


def default_folder(db: str) -> Path:
    """Where a worker keeps its own credentials: beside the SQLite file, else in the user's data folder.

    Never the working directory: a worker started from a checkout wrote its private key there, where `git add`
    or a container build picks it up (one was committed once), and every copy would then sign with that key.
    """
    if capabilities_of(db).local_file:
        return Path(db).expanduser().resolve().parent / "mflux-server-c2pa"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "mflux-server" / "c2pa"


def signer_files(cert: str | None, key: str | None, folder: Path) -> SignerFiles:
    """The configured chain and key, else the ones made here earlier, else new ones made now (and kept)."""
    if cert or key:
        if not (cert and key):
            raise ValueError("give both --c2pa-cert and --c2pa-key, or neither (a local certificate is made)")
        return SignerFiles(Path(cert).expanduser().read_bytes(), Path(key).expanduser().read_bytes(), False)
    chain_path, key_path = folder / CERTIFICATE, folder / KEY
    if not (chain_path.is_file() and key_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        chain, private = local_certificate()
        key_path.touch(mode=0o600)
        key_path.write_bytes(private)
        chain_path.write_bytes(chain)
    return SignerFiles(chain_path.read_bytes(), key_path.read_bytes(), True)


def local_certificate() -> tuple[bytes, bytes]:
    """A new local CA and an ES256 signing certificate it issued: (PEM chain, signer first; PEM private key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mflux-server (self-signed)")])

    def usage(sign_certificates: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=not sign_certificates, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=sign_certificates,
                             crl_sign=sign_certificates, encipher_only=False, decipher_only=False)

    def certificate(subject: str, public: Any, issuer: x509.Name, ca: bool) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
                .add_extension(usage(ca), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))

    ca_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    authority = certificate("mflux-server local CA", ca_key.public_key(), name("mflux-server local CA"), True)
    authority_cert = authority.sign(ca_key, hashes.SHA256())
    signer = (certificate("mflux-server signer", signer_key.public_key(), authority_cert.subject, False)
              # C2PA signers need an extended key usage such as email protection (c2pa-rs's certificate profile)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = signer.public_bytes(pem) + authority_cert.public_bytes(pem)
    return chain, signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class ContentCredentials:
    """Signs encoded images with a C2PA manifest; one per worker, used from its result writer's thread."""

    def __init__(self, files: SignerFiles):
        import c2pa

        self.self_signed = files.self_signed
        info = c2pa.C2paSignerInfo(alg=b"es256", sign_cert=files.chain, private_key=files.key, ta_url=None)
        self._signer = c2pa.Signer.from_info(info)
        # No claim thumbnail: it would copy the image into itself (about 30 KB a 256² PNG; 6 KB without).
        self._context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))

    @classmethod
    def from_settings(cls, enabled: bool, cert: str | None, key: str | None, folder: str | None,
                      db: str) -> ContentCredentials | None:
        """The worker's signer, or None with --c2pa false; says loudly when the credentials are self-signed."""
        if not enabled:
            log.warning("C2PA Content Credentials are off (--c2pa false): images carry only their XMP marking")
            return None
        where = Path(folder).expanduser() if folder else default_folder(db)
        credentials = cls(signer_files(cert, key, where))
        if credentials.self_signed:
            log.warning("=" * 72)
            log.warning("C2PA CONTENT CREDENTIALS ARE SELF-SIGNED (a local CA in %s):", where)
            log.warning("readers verify them as bound to the pixels, but not as signed by anyone they trust.")
            log.warning("Give --c2pa-cert and --c2pa-key to sign with your organisation's certificate.")
            log.warning("=" * 72)
        return credentials

    def sign(self, data: bytes, mime: str, generation: GenerationData) -> bytes:
        """The encoded image with its signed manifest embedded."""
        import c2pa

        builder = c2pa.Builder(json.dumps(manifest(generation, mime)), context=self._context)
        out = io.BytesIO()
        builder.sign(self._signer, mime, io.BytesIO(data), out)
        return out.getvalue()


def manifest(generation: GenerationData, mime: str) -> dict[str, Any]:
    """The manifest definition: who made it (this server), how (c2pa.created by a trained model) and with what."""
    return {
        "claim_generator_info": [{"name": "mflux-server", "version": __version__}],
        "title": f"{generation.model} seed {generation.seed}",
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": {"name": generation.software, "version": __version__}}]}},
            {"label": LABEL, "data": json.loads(generation.as_json())},
        ],
    }
