"""API keys: high-entropy random strings, known to the server only by their SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "mfx_"


def new_key() -> str:
    """A new key: the prefix and 256 random bits, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """What the database keeps of a key (SHA-256, hex): a 256-bit random key needs no slow hash."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


LINKS_SECRET = "links"  # the name of the kept secret that signs image links


def new_link_secret() -> str:
    """A new secret for signing image links."""
    return secrets.token_hex(32)


def link_signature(secret: str, task_id: str, index: int, delete: bool | None = None) -> str:
    """The signature that lets an image link be fetched without a key (webhook receivers, OpenAI url clients).

    It covers whether the fetch consumes the image, so a keep link (delete=false) cannot be turned into one that
    removes the task. delete=None is the form links had before, which still opens them without deleting."""
    signed = f"{task_id}:{index}" + ("" if delete is None else f":{'consume' if delete else 'keep'}")
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()[:32]
