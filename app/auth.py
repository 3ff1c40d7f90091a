"""API keys: random tokens stored as sha256 hashes, with read / write / admin scopes.

A request authenticates with ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``.
Scopes nest: ``admin`` implies ``write``, which implies ``read``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from app.db.models import ApiKey, Scope, utcnow
from app.settings import Settings, weak_key_reason

TOKEN_PREFIX = "mwt_"
_IMPLIED = {
    Scope.read: {Scope.read},
    Scope.write: {Scope.read, Scope.write},
    Scope.admin: {Scope.read, Scope.write, Scope.admin},
}
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def effective_scopes(scopes: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in scopes:
        try:
            out |= {x.value for x in _IMPLIED[Scope(s)]}
        except ValueError:
            continue
    return frozenset(out)


def normalise_scopes(scopes: Iterable[str]) -> list[str]:
    """Validate scope names; raises ValueError naming the bad one."""
    out = []
    for s in scopes:
        try:
            out.append(Scope(s).value)
        except ValueError:
            raise ValueError(f"unknown scope {s!r}; use read, write or admin") from None
    if not out:
        raise ValueError("give at least one scope: read, write or admin")
    return sorted(set(out))


def create_key(
    session: Session, name: str, scopes: Iterable[str], token: str | None = None
) -> tuple[ApiKey, str]:
    """Insert a key (not committed) and return it with its plaintext token (shown once)."""
    token = token or generate_token()
    key = ApiKey(
        name=name, prefix=token[:12], key_hash=hash_token(token), scopes=normalise_scopes(scopes)
    )
    session.add(key)
    session.flush()
    return key, token


def ensure_admin_key(factory: sessionmaker[Session], settings: Settings) -> str | None:
    """Create the first admin key when no active key exists; return its token (else None).

    The token is ``settings.bootstrap_admin_key`` when set, otherwise a random one.
    Only its hash is stored, so the caller must show it now: it cannot be recovered.
    """
    with factory() as session:
        active = session.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))
        )
        if active:
            return None
        token = settings.bootstrap_admin_key
        if token and (reason := weak_key_reason(token)):
            raise ValueError(f"MWT_BOOTSTRAP_ADMIN_KEY is refused: {reason}")
        if token:
            existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(token)))
            if existing is not None:  # revoked earlier: do not resurrect it silently
                return None
        _, token = create_key(session, "admin (bootstrap)", ["admin"], token=token)
        session.commit()
        return token


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes


class KeyCache:
    """Short-lived cache of verified keys, so hot read paths do not hit the DB per request."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl = ttl_s
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, Principal]] = {}
        self._last_used: dict[int, float] = {}

    def get(self, key_hash: str) -> Principal | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            item = self._items.get(key_hash)
            if item is None or item[0] < time.monotonic():
                self._items.pop(key_hash, None)
                return None
            return item[1]

    def put(self, key_hash: str, principal: Principal) -> None:
        if self.ttl > 0:
            with self._lock:
                if len(self._items) > 10_000:
                    self._items.clear()
                self._items[key_hash] = (time.monotonic() + self.ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def touch_due(self, key_id: int) -> bool:
        """Whether the key's ``last_used_at`` is due an update (read-only: see should_touch)."""
        last = self._last_used.get(key_id)
        return last is None or time.monotonic() - last >= LAST_USED_RESOLUTION.total_seconds()

    def should_touch(self, key_id: int) -> bool:
        """``touch_due``, and if so record the touch (one caller writes the stamp)."""
        with self._lock:
            if not self.touch_due(key_id):
                return False
            self._last_used[key_id] = time.monotonic()
            return True


def _token_from(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def cached_principal(request: Request) -> Principal | None:
    """The caller's principal when it needs no database (verified by the middleware, or a
    cached key whose last-use stamp is not due); ``None`` sends the caller to ``authenticate``.

    Hot read paths thus verify a key without a worker-thread hop or a query."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    token = _token_from(request)
    if not token:
        return None
    cache: KeyCache = request.app.state.key_cache
    principal = cache.get(hash_token(token))
    if principal is None or cache.touch_due(principal.key_id):
        return None
    return principal


async def current_principal(request: Request) -> Principal:
    """``authenticate`` as an async dependency: the cached path runs on the event loop."""
    principal = cached_principal(request)
    if principal is None:
        principal = await anyio.to_thread.run_sync(authenticate, request)
    return principal


def authenticate(request: Request) -> Principal:
    """The caller's key (401 if missing, unknown or revoked); verified once per request."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):  # verified by KeyFirstMiddleware before the body was read
        return known
    token = _token_from(request)
    if not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_token(token)
    cache: KeyCache = request.app.state.key_cache
    principal = cache.get(digest)
    if principal is None:
        factory: sessionmaker[Session] = request.app.state.sessionmaker
        with factory() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if key is None or key.revoked_at is not None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "invalid or revoked API key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            principal = Principal(key.id, key.name, effective_scopes(key.scopes))
        cache.put(digest, principal)
    if cache.should_touch(principal.key_id):
        factory = request.app.state.sessionmaker
        with factory() as session:
            session.execute(
                update(ApiKey).where(ApiKey.id == principal.key_id).values(last_used_at=utcnow())
            )
            session.commit()
    return principal


# The scope each dependency made by ``require`` checks, so that the scopes a route needs can
# be read from its dependencies before the route runs (KeyFirstMiddleware).
_REQUIRED_SCOPE: dict[Callable[..., Any], str] = {}


def _scope_denied(principal: Principal, needed: str) -> HTTPException | None:
    """The 403 for a key without ``needed`` (None: the key holds it)."""
    if principal.has(needed):
        return None
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"this API key lacks the '{needed}' scope (it has: {', '.join(sorted(principal.scopes)) or 'none'})",
    )


def require(scope: Scope | str) -> Callable[..., Awaitable[Principal]]:
    """Dependency factory: the caller's key must hold ``scope`` (or a scope implying it)."""
    needed = Scope(scope).value

    async def dependency(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if (denied := _scope_denied(principal, needed)) is not None:
            raise denied
        return principal

    dependency.__name__ = f"require_{needed}"
    _REQUIRED_SCOPE[dependency] = needed
    return dependency


def route_scopes(route: BaseRoute) -> frozenset[str]:
    """The scopes that the ``require`` dependencies of ``route`` (nested ones included) check."""
    found: set[str] = set()
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        try:
            needed = _REQUIRED_SCOPE.get(dependant.call)
        except TypeError:  # an unhashable callable is no scope check
            needed = None
        if needed is not None:
            found.add(needed)
        pending.extend(dependant.dependencies)
    return frozenset(found)


def ensure_owner(principal: Principal, owner_key_id: int | None, what: str) -> None:
    """A write key changes only what it created; an admin key changes anything (else 403)."""
    if principal.has(Scope.admin.value) or (
        owner_key_id is not None and owner_key_id == principal.key_id
    ):
        return
    raise HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"{what} was created by another API key; only that key or an admin key may change it",
    )


def _sees_only_own(principal: Principal, settings: Settings) -> bool:
    return settings.private_listing and not principal.has(Scope.admin.value)


def visible_to(stmt: Select[Any], owner_column: Any, principal: Principal, settings: Settings) -> Select[Any]:
    """Filter a listing to the caller's own rows when MWT_PRIVATE_LISTING is on (admins see all).

    By default the registry is shared: every read key lists everything.
    """
    if _sees_only_own(principal, settings):
        return stmt.where(owner_column == principal.key_id)
    return stmt


def can_see(principal: Principal, owner_key_id: int | None, settings: Settings) -> bool:
    """Whether one row created by ``owner_key_id`` is there for this key: the rule of
    ``visible_to`` for a row fetched by id."""
    return not _sees_only_own(principal, settings) or owner_key_id == principal.key_id


ReadKey = Annotated[Principal, Depends(require(Scope.read))]
WriteKey = Annotated[Principal, Depends(require(Scope.write))]
AdminKey = Annotated[Principal, Depends(require(Scope.admin))]


class KeyFirstMiddleware:
    """Verify the API key of every API request (under ``API_PREFIX``) before the app reads its body.

    FastAPI parses a multipart body before it runs the route's dependencies, so an upload
    route's key check alone would run only after the whole (up to MWT_MAX_UPLOAD_MB) body
    arrived: anyone could hold a temporary file and a worker thread open. Here a request
    without a valid key is answered 401 from its headers, and one with a body whose key
    lacks a scope the route requires 403; the principal is kept in the request state for
    the route's own checks (``authenticate`` reuses it).
    """

    def __init__(self, app: ASGIApp, prefix: str, open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.prefix = prefix
        self.open_paths = frozenset(open_paths)  # served without a key (health probes)
        self._route_scopes: dict[int, frozenset[str]] = {}  # by id(route): routes live as long as the app

    def _needed(self, route: BaseRoute) -> frozenset[str]:
        needed = self._route_scopes.get(id(route))
        if needed is None:
            needed = self._route_scopes.setdefault(id(route), route_scopes(route))
        return needed

    def _scope_checked(self, scope: AsgiScope, receive: Receive, principal: Principal) -> Receive:
        """``receive``, checking first that the key holds every scope the route requires.

        FastAPI reads and parses a request's body (JSON or multipart) before it runs the
        route's dependencies, so a read key's upload to a write route would otherwise be
        received whole before its 403. The router has picked the route (``scope["route"]``)
        by the time anything asks for the body: the first ask raises the 403 instead."""
        checked = False

        async def checked_receive() -> Message:
            nonlocal checked
            if not checked:
                checked = True
                route = scope.get("route")
                for name in sorted(self._needed(route)) if isinstance(route, BaseRoute) else ():
                    if (denied := _scope_denied(principal, name)) is not None:
                        raise denied
            return await receive()

        return checked_receive

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(self.prefix + "/")
            or scope["path"] in self.open_paths
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            principal = await current_principal(request)
        except HTTPException as exc:
            response: Response = JSONResponse(
                {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
            await response(scope, receive, send)
            return
        except OperationalError:
            response = JSONResponse(
                {"detail": "the registry database is unavailable; retry shortly"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        if _has_body(scope):
            receive = self._scope_checked(scope, receive, principal)
        await self.app(scope, receive, send)


def _has_body(scope: AsgiScope) -> bool:
    """Whether the request declares a body (a length above zero, or chunked framing)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False
