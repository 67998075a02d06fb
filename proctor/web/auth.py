"""Sessions, CSRF tokens, Origin checks and login rate limits for the pages, the JSON API and WebSockets.

A session is a signed cookie (HMAC-SHA256 with the server's secret key) carrying the user id, a CSRF
token, an expiry and a fingerprint of the password hash and the account's session epoch. Nothing else is
kept on the server, so every node that shares the secret key accepts the others' cookies; the user is read
from the store on each request, so a deactivated user, a changed password or a logout (which moves the
epoch on) ends every session of the account at once, on every device.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from proctor.appkeys import CONFIG_KEY, STORE_KEY
from proctor.config import ConfigError
from proctor.server import secrets_match
from proctor.storage.base import NotFound, StoreError, User
from proctor.storage.validate import MAX_USERNAME
from proctor.web.services import TOO_LARGE_UPLOAD

logger = logging.getLogger(__name__)

COOKIE_NAME = "proctor_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600  # long enough for the longest exam day, short enough that a lost laptop expires
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_api_path(path: str) -> bool:
    """Paths answered with JSON errors instead of redirects to the login page."""
    return path.startswith(("/api/", "/ws/"))


def _json_error(exc_class: type[web.HTTPException], message: str, **extra: Any) -> web.HTTPException:
    body = json.dumps({"error": message, **extra})
    return exc_class(text=body, content_type="application/json")


def unauthorized(message: str = "not logged in: log in first (POST /api/login)") -> web.HTTPException:
    return _json_error(web.HTTPUnauthorized, message)


def forbidden(message: str) -> web.HTTPException:
    return _json_error(web.HTTPForbidden, message)


# ---------------------------------------------------------------------------------------------- secret key


def load_secret_key(secret_key: str | None, data_dir: str) -> bytes:
    """The configured key, or a random one created once under data_dir/secret_key (mode 0600)."""
    if secret_key:
        if len(secret_key) < 16:
            raise ConfigError("invalid secret_key: at least 16 characters are needed to sign session cookies")
        return secret_key.encode()
    path = os.path.join(data_dir, "secret_key")
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
        if len(key) >= 32:
            return key
        logger.warning("secret key file %s is shorter than 32 bytes; making a new one", path)
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        # link() refuses an existing file: of two workers starting together, the second reads the first's key.
        os.link(tmp, path)
        logger.info("created a new session secret key in %s", path)
    except FileExistsError:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise RuntimeError(f"cannot write the session secret key file {path}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return key


# ----------------------------------------------------------------------------------------- signed cookies


@dataclass(frozen=True)
class Session:
    user_id: int | None
    csrf: str
    expires: float  # wall-clock epoch seconds: it must mean the same on every node, so not monotonic
    pw: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Signs and checks session cookies."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def session_fingerprint(self, user: User) -> str:
        """What a cookie must carry to stay valid: it changes with the password and when sessions end."""
        # Epoch 0 signs the password hash alone, as before the epoch existed: an upgrade logs nobody out.
        text = user.password_hash + (f"#{user.session_epoch}" if user.session_epoch else "")
        return hmac.new(self._key, b"pw:" + text.encode(), hashlib.sha256).hexdigest()[:16]

    def encode(self, session: Session) -> str:
        payload = _b64(json.dumps({"u": session.user_id, "c": session.csrf, "e": int(session.expires),
                                   "p": session.pw}, separators=(",", ":")).encode())
        mac = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return payload + "." + _b64(mac)

    def decode(self, value: str) -> Session | None:
        """The session in the cookie, or None when it is malformed, forged or expired."""
        try:
            payload, mac = value.split(".", 1)
            expected = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            data = json.loads(_unb64(payload))
            session = Session(user_id=data["u"], csrf=str(data["c"]), expires=float(data["e"]),
                              pw=str(data.get("p", "")))
        except (ValueError, KeyError, TypeError):
            return None
        if session.user_id is not None and not isinstance(session.user_id, int):
            return None
        if session.expires < time.time():
            return None
        return session


# ------------------------------------------------------------------------------------------- rate limiting


class LoginLimiter:
    """Failed-login counters per account and per client address, kept in memory (per node).

    A login reserves its attempt (`begin`) before it waits for the database and the password hash, and
    the attempt counts against its account until it ends: otherwise a burst of simultaneous logins
    would all pass the check before the first failure was counted. Logins in progress from one address
    are capped too, so one address cannot queue unbounded work in front of the hall's password checks.

    A node restart forgets them and each node counts on its own; that still caps guessing at a few
    attempts per minute per account, far below what an offline attack on argon2 hashes would need.
    """

    def __init__(self, per_account: int = 5, per_address: int = 300, window_s: float = 300.0,
                 pending_per_address: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_account = per_account
        # Higher for addresses: an exam hall behind one NAT address has hundreds of students typing.
        self.per_address = per_address
        self.window_s = window_s
        # About 10 s of password checks (one at a time, ~0.15 s each): a hall logging in at once through
        # one address gets "try again in a few seconds" beyond that rather than a minute-long wait.
        self.pending_per_address = pending_per_address
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}
        self._pending: collections.Counter[str] = collections.Counter()

    def _recent(self, key: str) -> collections.deque[float]:
        now = self._clock()
        times = self._failures.get(key)
        if times is None:
            return collections.deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def wait(self, username: str, address: str) -> tuple[float, str]:
        """(seconds until a login may be tried, why: "failures" or "busy" with logins in progress)."""
        now = self._clock()
        waits = [(0.0, "")]
        account = _account_key(username)
        failures = self._recent(account)
        if len(failures) >= self.per_account:
            waits.append((self.window_s - (now - failures[0]), "failures"))
        elif len(failures) + self._pending[account] >= self.per_account:
            waits.append((_PENDING_WAIT_S, "busy"))  # attempts still in progress may fail yet
        by_address = self._recent(_address_key(address))
        if len(by_address) >= self.per_address:
            waits.append((self.window_s - (now - by_address[0]), "failures"))
        if self._pending[_address_key(address)] >= self.pending_per_address:
            waits.append((_PENDING_WAIT_S, "busy"))
        return max(waits)

    def begin(self, username: str, address: str) -> tuple[float, str]:
        """Reserve a login attempt: (0, "") when it may go on (end it with `end`), else `wait`'s answer."""
        refused = self.wait(username, address)
        if refused[0] > 0:
            return refused
        self._pending[_account_key(username)] += 1
        self._pending[_address_key(address)] += 1
        return 0.0, ""

    def end(self, username: str, address: str, ok: bool | None) -> None:
        """The attempt reserved by `begin` is over: a failure counts, a success clears the account, None neither."""
        for key in (_account_key(username), _address_key(address)):
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]
        if ok:
            self.clear(username)
        elif ok is not None:
            self._failed(username, address)

    def clear(self, username: str) -> None:
        """Forget an account's failures (it logged in, or its password was reset)."""
        self._failures.pop(_account_key(username), None)

    def _failed(self, username: str, address: str) -> None:
        now = self._clock()
        for key in (_account_key(username), _address_key(address)):
            self._failures.setdefault(key, collections.deque()).append(now)
        if len(self._failures) > 100_000:  # bound memory under a spray of random usernames
            oldest = sorted(self._failures, key=lambda k: self._failures[k][-1])[:50_000]
            for key in oldest:
                del self._failures[key]


# What a login refused because of attempts in progress is told to wait: they end within seconds.
_PENDING_WAIT_S = 5.0


def _account_key(username: str) -> str:
    # No account's name is longer than MAX_USERNAME: longer ones share the key of their first characters, which
    # locks out nobody real, and a spray of megabyte names cannot fill the limiter's memory.
    return "u:" + username[:MAX_USERNAME + 1].lower()


def _address_key(address: str) -> str:
    return "a:" + address


# ------------------------------------------------------------------------------------------------ state


@dataclass
class WebState:
    codec: SessionCodec
    limiter: LoginLimiter = field(default_factory=LoginLimiter)


WEB_STATE_KEY = web.AppKey("web_state", WebState)
_SESSION: "web.RequestKey[Session | None]" = web.RequestKey("proctor_session")
_USER: "web.RequestKey[User | None]" = web.RequestKey("proctor_user")
_NEW_COOKIE: "web.RequestKey[Session]" = web.RequestKey("proctor_new_cookie")


def _state(request: web.Request) -> WebState:
    return request.app[WEB_STATE_KEY]


def client_address(request: web.Request) -> str:
    # server.forwarded_middleware has already put a trusted proxy's X-Forwarded-For into request.remote.
    return request.remote or "unknown"


def session_of(request: web.Request) -> Session | None:
    """The valid session cookie of this request (anonymous or not), or None."""
    if _SESSION not in request:
        raw = request.cookies.get(COOKIE_NAME)
        request[_SESSION] = _state(request).codec.decode(raw) if raw else None
    return request[_SESSION]


async def current_user(request: web.Request) -> User | None:
    """The logged-in, active user of this request's session cookie, or None."""
    if _USER in request:
        return request[_USER]
    user: User | None = None
    session = session_of(request)
    if session is not None and session.user_id is not None:
        try:
            found = await request.app[STORE_KEY].get_user(session.user_id)
        except NotFound:
            found = None
        codec = _state(request).codec
        if found is not None and found.active and hmac.compare_digest(
                codec.session_fingerprint(found), session.pw):
            user = found
    request[_USER] = user
    return user


async def require_user(request: web.Request, *roles: str) -> User:
    """The current user, whose role is one of `roles` (any role when none given).

    Raises 401/403 with a JSON message for /api/ and /ws/ paths; pages get a redirect to the login page
    (not logged in) or a 403 page (wrong role).
    """
    user = await current_user(request)
    api = is_api_path(request.path)
    if user is None:
        if api:
            raise unauthorized()
        raise web.HTTPFound("/login?next=" + quote(request.path_qs, safe=""))
    if roles and user.role not in roles:
        message = f"this needs the role {' or '.join(roles)}; you are logged in as a {user.role}"
        if api:
            raise forbidden(message)
        raise web.HTTPForbidden(text=message)
    return user


def csrf_token(request: web.Request) -> str:
    """The CSRF token of this request's session; makes an anonymous session when there is none."""
    session = session_of(request)
    if session is None:
        session = Session(user_id=None, csrf=secrets.token_urlsafe(24), expires=time.time() + SESSION_SECONDS)
        request[_SESSION] = session
        request[_NEW_COOKIE] = session
    return session.csrf


def start_session(request: web.Request, response: web.StreamResponse, user: User) -> Session:
    """Log `user` in: a fresh session (new CSRF token) in the cookie of `response`."""
    codec = _state(request).codec
    session = Session(user_id=user.id, csrf=secrets.token_urlsafe(24), expires=time.time() + SESSION_SECONDS,
                      pw=codec.session_fingerprint(user))
    request[_SESSION] = session
    request[_USER] = user
    request.pop(_NEW_COOKIE, None)
    _set_cookie(request, response, session)
    return session


async def log_out(request: web.Request, response: web.StreamResponse, user: User | None) -> None:
    """End every session of `user` (all devices and nodes; their open sockets close) and clear this cookie.

    A copy of the cookie (a shared computer, a proxy log) must not outlive the logout: the cookie is signed,
    not stored, so the account's session epoch moves on instead and no older cookie matches it any more.
    """
    if user is not None:
        store = request.app[STORE_KEY]
        await store.end_sessions(user.id)
        await store.audit(user.id, "logout", f"user:{user.id}", {})
    response.del_cookie(COOKIE_NAME, path="/")


def _set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(COOKIE_NAME, _state(request).codec.encode(session), max_age=SESSION_SECONDS,
                        path="/", httponly=True, samesite="Lax", secure=is_secure(request))


def is_secure(request: web.Request) -> bool:
    return request.secure or request.app[CONFIG_KEY].tls


# ------------------------------------------------------------------------------------------------ origin


def own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def origin_allowed(request: web.Request) -> bool:
    """True when the Origin header is this server's own origin or one of config.allowed_origins.

    A missing Origin is refused: every browser sends it on WebSocket handshakes, so its absence means a
    script, which must log in through the API and send its own origin.
    """
    origin = request.headers.get("Origin")
    if not origin:
        return False
    origin = origin.rstrip("/")
    return origin == own_origin(request) or origin in request.app[CONFIG_KEY].allowed_origins


# --------------------------------------------------------------------------------------------- middlewares


def _content_security_policy(request: web.Request) -> str:
    ws = ("wss://" if request.scheme == "https" else "ws://") + request.host
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self' {ws}; media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CSRF and Origin checks on unsafe requests; security headers and the session cookie on responses."""
    if request.method not in _SAFE_METHODS:
        await _check_unsafe_request(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _add_headers(request, exc)
        raise
    if not response.prepared:
        _add_headers(request, response)
    return response


def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", _content_security_policy(request))
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if is_secure(request):
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")
    new = request.get(_NEW_COOKIE)
    if new is not None:
        _set_cookie(request, response, new)


async def _check_unsafe_request(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    # Browsers send Origin on every cross-site POST; a foreign one is refused whatever the cookie says.
    if origin and origin != "null" and not origin_allowed(request):
        raise _refusal(request, f"request refused: Origin {origin!r} is not this server's origin "
                                f"({own_origin(request)})")
    if request.path.startswith("/ws/"):
        return
    session = session_of(request)
    if request.path.startswith("/api/"):
        # Without the session cookie there is nothing a forged cross-site request could ride on. Login
        # takes only application/json, which no cross-site form can send without a CORS preflight.
        if session is None or session.user_id is None or request.path == "/api/login":
            return
        token = request.headers.get(CSRF_HEADER, "")
        if not secrets_match(token, session.csrf):
            raise forbidden(f"CSRF check failed: send the csrf_token from POST /api/login or GET /api/me "
                            f"in the {CSRF_HEADER} header")
        return
    # Forms: the token must come in the posted body.
    token = ""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=request.content_length,
                                                text=TOO_LARGE_UPLOAD) from None
        except (ValueError, LookupError):  # multipart without a boundary, bytes that are not UTF-8, a bogus charset
            raise _bad_request(request, "the form's body could not be read; reload the page and try again") from None
        value = form.get(CSRF_FIELD, "")
        token = value if isinstance(value, str) else ""
    if session is None or not token or not secrets_match(token, session.csrf):
        raise _refusal(request, "form refused: its CSRF token is missing or out of date; reload the page and "
                                "try again")


def _refusal(request: web.Request, message: str) -> web.HTTPException:
    if is_api_path(request.path):
        return forbidden(message)
    return web.HTTPForbidden(text=message)


def _bad_request(request: web.Request, message: str) -> web.HTTPException:
    if is_api_path(request.path):
        return _json_error(web.HTTPBadRequest, message)
    return web.HTTPBadRequest(text=message)


def setup_auth(app: web.Application) -> None:
    """Create the session codec and login limiter and install the security middleware."""
    config = app[CONFIG_KEY]
    app[WEB_STATE_KEY] = WebState(codec=SessionCodec(load_secret_key(config.secret_key, config.data_dir)),
                                  limiter=LoginLimiter(per_address=config.login_failures_per_address))
    app.middlewares.append(security_middleware)
    app.cleanup_ctx.append(_forget_failures_on_reset)


async def _forget_failures_on_reset(app: web.Application) -> AsyncIterator[None]:
    """A password reset (through any node) lifts the account's failed-login wait on this node.

    A classmate can lock a student out with five wrong passwords; an admin resetting the student's
    password lets them in at once with the new one.
    """
    store = app[STORE_KEY]
    limiter = app[WEB_STATE_KEY].limiter

    async def on_notification(channel: str, payload: dict[str, Any]) -> None:
        if channel != "user" or not payload.get("password_reset"):
            return
        try:
            user = await store.get_user(int(payload["id"]))
        except (StoreError, KeyError, TypeError, ValueError):
            logger.warning("could not clear the failed logins of user %r after its password reset", payload.get("id"))
            return
        limiter.clear(user.username)

    await store.subscribe(on_notification)
    try:
        yield
    finally:
        await store.unsubscribe(on_notification)
