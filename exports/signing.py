"""Signed download URLs of the local destination: HMAC-SHA256 with an expiry.

A URL is ``/v1/logs/exports/{id}/files/{name}?expires=<unix seconds>&signature=<hex>``
where the signature is HMAC-SHA256(secret, "{id}/{name}:{expires}"). Tollgate serves
it without an API key: the signature is the credential. Changing the id, the file
name or the expiry breaks the signature (403); so does the time passing ``expires``.

The secret is ``TOLLGATE_EXPORT_SIGNING_SECRET``, or else a random one generated on
first use and kept in ``<data dir>/export-signing.key`` (mode 0600), so every process
sharing the data directory signs and checks alike, across restarts. The file is never
empty: it appears whole (written aside, then linked into place), and an empty one (left
by a process that died while writing it, before this was so) is refused rather than used
as a key anyone could sign with.
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
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a name of its own, then linked into place: the key file never exists
        # empty or half-written (a process reading it meanwhile would sign with that), and when two
        # processes race, the first link wins and both read it.
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode())
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes().strip()
    if not secret:  # an empty key would let anyone sign a URL for any export
        raise RuntimeError(f"{path} holds no export signing secret; delete it (a new one is made at the next "
                           "start; URLs signed so far stop working) or set TOLLGATE_EXPORT_SIGNING_SECRET")
    return secret


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
    # As bytes: compare_digest refuses str holding non-ASCII characters (a TypeError, a 500).
    if not hmac.compare_digest(_mac(secret, export_id, name, expires_at).encode(), signature.encode()):
        return "the URL's signature does not match"
    if (now if now is not None else time.time()) > expires_at:
        return "the URL has expired; ask GET /v1/logs/exports/{id}/download for a new one"
    return None
