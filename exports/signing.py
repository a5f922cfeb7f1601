"""Signed download URLs of the local destination: HMAC-SHA256 with an expiry.

A URL is ``/v1/logs/exports/{id}/files/{name}?expires=<unix seconds>&signature=<hex>``
where the signature is HMAC-SHA256(secret, "{id}/{name}:{expires}"). Tollgate serves
it without an API key: the signature is the credential. Changing the id, the file
name or the expiry breaks the signature (403); so does the time passing ``expires``.

The secret is ``TOLLGATE_EXPORT_SIGNING_SECRET``, or else a random one generated on
first use and kept in ``<data dir>/export-signing.key`` (mode 0600), so every process
sharing the data directory signs and checks alike, across restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from tollgate.settings import Settings

KEY_FILE = "export-signing.key"


def signing_secret(settings: Settings) -> bytes:
    if settings.export_signing_secret:
        return settings.export_signing_secret.encode()
    path = Path(settings.data_dir) / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    try:  # O_EXCL: when two processes race, the first file wins and both read it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
    except FileExistsError:
        pass
    return path.read_bytes().strip()


def _mac(secret: bytes, export_id: str, name: str, expires: int) -> str:
    return hmac.new(secret, f"{export_id}/{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, export_id: str, name: str, ttl_seconds: int, now: float | None = None) -> tuple[int, str]:
    """(expires, signature) of a URL valid for ``ttl_seconds``."""
    expires = int((now if now is not None else time.time()) + ttl_seconds)
    return expires, _mac(secret, export_id, name, expires)


def verify(secret: bytes, export_id: str, name: str, expires: str | None, signature: str | None,
           now: float | None = None) -> str | None:
    """None when valid, else why not (the route answers 403 with it)."""
    if not expires or not signature:
        return "the URL is not signed (expires and signature are required)"
    try:
        expires_at = int(expires)
    except ValueError:
        return "the URL's expiry is not a number"
    if not hmac.compare_digest(_mac(secret, export_id, name, expires_at), signature):
        return "the URL's signature does not match"
    if (now if now is not None else time.time()) > expires_at:
        return "the URL has expired; ask GET /v1/logs/exports/{id}/download for a new one"
    return None
