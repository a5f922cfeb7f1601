"""API keys: generation, hashing, and the FastAPI dependency that checks them.

Keys are sent in ``x-portkey-api-key``. Only their SHA-256 is stored (a key is 24
random bytes, so a fast hash is safe: 192 random bits leave nothing to brute-force). A verified
key is cached for ``TOLLGATE_AUTH_CACHE_SECONDS`` so revocation takes effect
within that time.

Missing or unknown key: 401. Valid key without the route's scope: 403. A resource
of another organisation (or, for a workspace key, another workspace) is 404 — the
routers filter by :class:`Principal.scope`, so such rows are never read.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from warehouse.queries import api_keys
from warehouse.queries.scope import TenantScope

KEY_PREFIX = "tg-"
HEADER = "x-portkey-api-key"

SCOPES: tuple[str, ...] = (
    "logs.read",
    "logs.write",
    "feedback.write",
    "analytics.read",
    "exports.read",
    "exports.write",
    "policies.read",
    "policies.write",
    "audit_logs.read",
    "api_keys.read",
    "api_keys.write",
)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(24)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; valid scopes: {', '.join(SCOPES)}")
    return list(dict.fromkeys(scopes))


@dataclass(frozen=True)
class Principal:
    key_id: str
    organisation_id: str
    workspace_slug: str | None  # None for an organisation key
    scopes: frozenset[str]

    @property
    def scope(self) -> TenantScope:
        return TenantScope(self.organisation_id, self.workspace_slug)

    def listed_workspace(self, workspace_id: str | None, what: str) -> str | None:
        """The workspace a list request covers (None: the whole organisation): ``workspace_id`` if
        given, else the key's own; a workspace key asking for another workspace is a 403."""
        if workspace_id is None:
            return self.workspace_slug
        if self.workspace_slug is not None and workspace_id != self.workspace_slug:
            raise HTTPException(403, f"a workspace key can only list {what} of its own workspace")
        return workspace_id


class KeyVerifier:
    def __init__(self, pool, cache_seconds: float):
        self.pool = pool
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def peek(self, key: str) -> Principal | None:
        """The principal of a verified key still in the cache, without touching the warehouse; None otherwise
        (not cached, expired, or an invalid key). Lets async routes skip a worker-thread hop."""
        with self._lock:
            hit = self._cache.get(hash_key(key))
        if hit and time.monotonic() - hit[0] < self.cache_seconds:
            return hit[1]
        return None

    def verify(self, key: str) -> Principal | None:
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit and now - hit[0] < self.cache_seconds:
            return hit[1]
        with self.pool.borrow() as client:
            row = api_keys.find_by_hash(client, digest)
        principal = None
        if row is not None and row.status == "active":
            principal = Principal(row.id, row.organisation_id, row.workspace_slug or None, frozenset(row.scopes))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal


def authenticate(request: Request) -> Principal:
    key = request.headers.get(HEADER)
    if not key:
        raise HTTPException(401, f"missing API key: send it in the `{HEADER}` header")
    principal = request.app.state.keys.verify(key)
    if principal is None:
        raise HTTPException(401, "invalid or revoked API key")
    request.state.principal = principal
    return principal


def require(scope: str):
    """Dependency: an authenticated principal holding ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope}")

    async def dependency(request: Request) -> Principal:
        # A key verified within TOLLGATE_AUTH_CACHE_SECONDS is checked on the event loop; only a
        # cache miss takes a worker thread (it may query the warehouse). Each hop to a worker
        # thread and back costs a request about half a millisecond on a busy 2-core machine.
        key = request.headers.get(HEADER)
        principal = request.app.state.keys.peek(key) if key else None
        if principal is None:
            principal = await run_in_threadpool(authenticate, request)
        request.state.principal = principal
        if scope not in principal.scopes:
            raise HTTPException(403, f"this API key lacks the `{scope}` scope")
        return principal

    return dependency
