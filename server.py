"""session-audit: the entry point, the CLI and the app factory.

    python server.py [serve] [--config PATH]
    python server.py adduser NAME [--admin] [--password-stdin]
    python server.py passwd NAME [--password-stdin]
    python server.py disable NAME | enable NAME | users
    python server.py status | verify | drain | retry-dead
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import errno
import fcntl
import getpass
import hmac
import inspect
import json
import logging
import math
import os
import resource
import secrets
import signal
import socket
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from audit import queries
from audit.config import (
    Config,
    ConfigError,
    load_config,
    open_window,
    path_text,
    resolve_config_path,
    sink_identity,
    sink_where,
)
from audit.engine import AuditEngine
from audit.logthrottle import FailingPass, LogThrottle, more
from audit.logwriter import BackgroundStderr
from audit.middleware import PUBLIC, TRUSTED_PROXIES, client_ip, session_middleware
from audit.rollback import catch_up_security_chain
from audit.runtime import tune_gc
from audit.sharing import check_shared_key
from audit.spool import (
    AuditKeyMismatch,
    SpoolUnavailable,
    app_bytes,
    connect,
    damage,
    key_check,
    loose_dir,
    make_private_dirs,
    open_lock,
    prepare,
    stored_key_check,
    unsafe_dir,
    used_bytes,
    without_text,
)
from audit.tokens import MIN_KEY_BYTES, TokenService
from audit.verify import spool_anchor, verify_sink
from handlers import routes
from handlers.ai import create_provider
from handlers.auth import (
    MAX_PASSWORD_CHARS,
    REVOKE_CHECK_SECONDS,
    THROTTLE,
    Accounts,
    LastAdmin,
    LoginThrottle,
    UserExists,
    add_user_sync,
    change_user_sync,
    hash_password,
    is_utf8,
    password_chars,
    valid_username,
)
from handlers.chat import UserTurns
from handlers.errors import error_middleware, install_parser_error_answer, security_headers
from handlers.inflight import IN_FLIGHT, InFlight, requests_ctx
from handlers.keys import (
    ACCOUNTS,
    AI,
    CHAT_SLOTS,
    CHAT_TURNS,
    CLIENT,
    CONFIG,
    ENGINE,
    REGISTRY,
    TOKENS,
)
from handlers.ops import COUNTS, CUT, DURATIONS, REQUESTS, SharedCounts, new_registry
from handlers.requests import CLIENT_MAX_SIZE, transfer_seconds
from handlers.streaming import StreamedJson
from sinks import QueryNotSupported, Sink, SinkError, create_sink

log = logging.getLogger("session_audit")

JWT_SECRET_ENV = "SESSION_AUDIT_JWT_SECRET"
AUDIT_KEY_ENV = "SESSION_AUDIT_AUDIT_KEY"
ADMIN_PASSWORD_ENV = "SESSION_AUDIT_ADMIN_PASSWORD"
SHUTDOWN_FLUSH_SECONDS = 2.0
SINK_OPEN_WAIT = 1.0  # start to ready stays well under 3 s even when the sink hangs
CHAT_CONCURRENCY = 16  # chats holding their document (<= 1 MiB) at once; the others queue
# One user's chats that may hold or wait for one of those slots at once; the
# user's others wait behind them. Without it one user's many chats at once (a
# script on 200 connections, a provider taking 3 s) filled the slots and their
# queue: every other user's chat waited 30 s (10 times as long), or got ai_busy.
CHAT_PER_USER = 4


class AccessLog(AbstractAccessLogger):
    """One line a request: address, method, path, status, bytes, seconds.

    The path without its query string: a client that puts a token or a
    password in the URL (``?access_token=``) must not have it in the log.
    """

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # else aiohttp need not call log()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # The client's address as the audit records it: behind a trusted proxy
        # (server.trusted_proxies) the one X-Forwarded-For names, not the
        # proxy's, which was every line's.
        try:
            remote = client_ip(request)  # type: ignore[arg-type]
        except (AssertionError, AttributeError):  # a request no route saw: the parser's 400
            remote = request.remote
        self.logger.info('%s "%s %s" %s %s %.6f', remote, request.method,
                         request.path, response.status, response.body_length, time)


class StartupError(Exception):
    """A problem an operator must fix before the server can start."""


# -- secrets -------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600; never overwrite an existing file.
    Durable once it returns: the file, and its entry in the directory (a
    power cut must not take away a key the spool's chains were then made
    with: every later start would be refused, and no chain verified)."""
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        # On a full disk (or past RLIMIT_FSIZE) the write fails after the
        # file was made: "serve: [Errno 28] No space left on device" named
        # no file, and the empty file left behind was taken, at the next
        # start, for one a crash had left half made. The file is this
        # call's own (O_EXCL): it goes, and the error names it.
        with contextlib.suppress(OSError):
            path.unlink()
        raise StartupError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _key_made(path: Path) -> bool:
    """Whether ``path`` holds a key. An empty file holds none: it is what a
    crash (kill -9) between creating the file and writing its key leaves,
    and such a key was never used (it is written and fsynced before it is
    read). Taken for a key, it stopped every later start ("must be at least
    32 bytes") until someone deleted the file."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def load_secret(env: str, path: Path) -> bytes:
    """A key from the environment, else from ``path`` (created, 0600)."""
    value = os.environ.get(env)
    if value:
        # The variable's bytes, whatever the locale: Python decodes the
        # environment in the locale's encoding, so under a Latin-1 one an
        # "ü" in the key was re-encoded into other bytes than the server's
        # (verify: "the audit key is not the one the server's spool uses"),
        # and under LC_ALL=C PYTHONUTF8=0 it was refused as not UTF-8.
        key = os.fsencode(value)
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:  # (the error would quote them)
            raise StartupError(f"{env} is not UTF-8 text") from None
    else:
        if not _key_made(path):
            if path.exists():
                log.warning("%s is empty (a crash while it was made): making it anew",
                            path.name)
                path.unlink()
            with contextlib.suppress(FileExistsError):  # another process was first
                _write_private(path, secrets.token_urlsafe(48) + "\n")
        try:
            key = path.read_text(encoding="utf-8").strip().encode("utf-8")
        except UnicodeDecodeError:
            raise StartupError(f"{path} is not UTF-8 text (a key made by this server,"
                               " or one set in " + env + ", is)") from None
    if len(key) < MIN_KEY_BYTES:
        raise StartupError(f"{env} (or {path.name}) must be at least {MIN_KEY_BYTES} bytes")
    return key


def ensure_data_dir(config: Config) -> None:
    """The data directory holds keys, hashes and the audit trail: owner only."""
    path = config.data_dir
    try:
        make_private_dirs(path)
    except OSError as exc:
        raise StartupError(f"server.data_dir: cannot create {path}: {exc.strerror}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"server.data_dir: {path} is not a writable directory")
    unsafe = unsafe_dir(path)
    if unsafe is not None:  # another user could plant its own jwt.key or spool
        raise StartupError(f"server.data_dir: {unsafe}")
    if path in _WARNED_DIRS:  # serve checks before and in create_app: one warning
        return
    _WARNED_DIRS.add(path)
    loose = loose_dir(path)
    if loose is not None:
        log.warning("server.data_dir: %s", loose)
    elif path.stat().st_mode & 0o077:
        log.warning("server.data_dir %s is open to other users (mode %o): it holds keys,"
                    " password hashes and the audit trail; chmod 700 it", path,
                    path.stat().st_mode & 0o777)


_WARNED_DIRS: set[Path] = set()


def jwt_key(config: Config) -> bytes:
    return load_secret(JWT_SECRET_ENV, config.data_dir / "jwt.key")


def audit_key(config: Config) -> bytes:
    path = config.data_dir / "audit.key"
    if not os.environ.get(AUDIT_KEY_ENV) and not _key_made(path) and _spool_key_check(config):
        # A key made anew would chain on where the lost one left off.
        raise StartupError(
            f"no audit key: {AUDIT_KEY_ENV} is not set and {path} does not exist (or is"
            f" empty), but the spool {config.spool_path} holds chains made with a key:"
            " restore that key"
            " (the file, or the variable it came from)")
    return load_secret(AUDIT_KEY_ENV, path)


def _spool_key_check(config: Config) -> str | None:
    """The spool's record of its audit key, if there is a spool with one."""
    if not config.spool_path.exists():
        return None
    conn = connect(config.spool_path, config.audit.synchronous, readonly=True)
    try:
        return stored_key_check(conn)
    finally:
        conn.close()


def existing_audit_key(config: Config) -> bytes:
    """For the commands beside the server: its audit key, never a new one
    (under a new key every stored event would look changed, and the server
    would chain under it)."""
    path = config.data_dir / "audit.key"
    if not os.environ.get(AUDIT_KEY_ENV) and not _key_made(path):
        raise StartupError(f"no audit key: {AUDIT_KEY_ENV} is not set and {path} does not"
                           " exist or is empty (is this the server's --config?)")
    return audit_key(config)


def _existing(what: str, path: Path) -> None:
    """Commands beside the server read its files; they do not make new ones."""
    if not path.exists():
        raise StartupError(f"no {what} at {path} (is this the server's --config?)")


# -- the app -------------------------------------------------------------------


def admin_password_from_env(min_chars: int) -> str | None:
    """``SESSION_AUDIT_ADMIN_PASSWORD`` if set, within adduser's limits
    (``auth.min_password_chars``; a longer one would make every login
    slower); else :class:`StartupError`."""
    password = os.environ.get(ADMIN_PASSWORD_ENV)
    if password:
        password = utf8_first(os.fsencode(password), password)
        if not is_utf8(password):  # no login could send it (nor could it be hashed)
            raise StartupError(f"{ADMIN_PASSWORD_ENV} is not UTF-8 text")
        if password_chars(password) < min_chars:  # normalised, as it is hashed
            raise StartupError(
                f"{ADMIN_PASSWORD_ENV} must have at least {min_chars} characters")
        if len(password) > MAX_PASSWORD_CHARS:
            raise StartupError(
                f"{ADMIN_PASSWORD_ENV} must have at most {MAX_PASSWORD_CHARS} characters")
    return password or None


def _no_first_admin(existing: str) -> StartupError:
    if existing == "admin":
        return StartupError(
            "no user has the admin role, and the name 'admin' belongs to a user without it:"
            " add an admin with `server.py adduser NAME --admin`")
    # adduser refuses such a pair: the two would read alike in the trail.
    return StartupError(
        f"no user has the admin role, and the user {existing!r} would read alike the"
        " 'admin' a first start makes: add an admin with `server.py adduser NAME --admin`")


async def _ensure_admin(app: web.Application) -> None:
    accounts = app[ACCOUNTS]
    if await accounts.has_admin():
        return
    existing = await accounts.alike("admin")
    if existing is not None:
        raise _no_first_admin(existing)
    password = admin_password_from_env(app[CONFIG].auth.min_password_chars)
    path = None
    if not password:
        # 24 characters, or auth.min_password_chars if more (passwd keeps to it)
        need = app[CONFIG].auth.min_password_chars
        password = secrets.token_urlsafe(max(18, -(-need * 3 // 4)))
        path = app[CONFIG].data_dir / "initial_admin_password"
        path.unlink(missing_ok=True)
        _write_private(path, password + "\n")
    # Checked again in the insert's transaction: `adduser` may have added an
    # admin, or a user alike 'admin', since (beside this start).
    try:
        made = await accounts.create_first_admin("admin", password)
    except BaseException as exc:
        # Not the password of any user; unless cancelled (a signal during the
        # start) while the insert waited for its commit, which goes on: then
        # it may be the admin's, and a start that finds no admin replaces it.
        if path is not None and not isinstance(exc, asyncio.CancelledError):
            path.unlink(missing_ok=True)
        if isinstance(exc, UserExists):
            raise _no_first_admin(exc.existing) from None
        raise
    if not made:
        if path is not None:
            path.unlink(missing_ok=True)
        log.info("an admin was added beside this first start: no user 'admin' created")
    elif path is None:
        log.info("created user 'admin' with the password from %s", ADMIN_PASSWORD_ENV)
    else:
        log.info("created user 'admin'; its password is in %s (mode 0600)", path)


async def _first_sink_attempt(engine: AuditEngine, wait: float = SINK_OPEN_WAIT) -> None:
    """Serve once the flusher has tried to open the sink (bounded).

    The flusher opens the sink on its first step; until then the admin API
    cannot query it and /audit/status reports it unhealthy. Waiting for that
    first attempt (success or a recorded error) removes the start-up window;
    a sink that is down does not hold the server back beyond ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    flusher = engine.flusher
    while not (flusher.sink_open or flusher.last_error or engine.task_failure):
        if time.monotonic() >= deadline:
            log.warning("the %s sink is not open yet; serving anyway", engine.sink.type)
            return
        await asyncio.sleep(0.01)


# Read as bytes: a text that is not UTF-8 (a flipped byte) is damaged as one
# that is not JSON is, not an error quoting it from SQLite.
SINK_STATUS_SQL = "SELECT CAST(value AS BLOB) FROM meta WHERE key = 'sink_status'"


def saved_sink_status(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    """The sink's state a server last saved in the spool's ``meta`` (for
    ``status``), or None: none saved, or a row the spool holds damaged (not
    UTF-8, not JSON, not an object). Only a display: such a row stopped
    every start and ``status`` with a traceback (the flusher reads its own
    rows so)."""
    if row is None:
        return None
    try:
        saved = json.loads(row[0])
    except (TypeError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


async def _sink_switched(engine: AuditEngine) -> None:
    """Warn when the spool was last flushed to another sink type."""
    row = await engine.spool.read(
        lambda c: c.execute(SINK_STATUS_SQL).fetchone())
    saved = saved_sink_status(row)
    if saved is None:
        return
    where = engine.sink_where()
    if (saved.get("type"), saved.get("where", where)) != (engine.sink.type, where):
        log.warning("the sink changed from %s (%s) to %s (%s): parts already stored stay in"
                    " the old one, so sessions may be split across both, and verify on"
                    " either reports the other's parts as missing (README: Switching sinks)",
                    saved.get("type"), saved.get("where", "?"), engine.sink.type, where)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    await engine.open(interrupted=False)  # (below, once the security chain caught up)
    shared: asyncio.Task[list[str]] | None = None
    try:
        await _sink_switched(engine)
        await _ensure_admin(app)
        await _first_sink_attempt(engine)
        if engine.flusher.sink_open:  # (before any request can append a security event)
            await catch_up_security_chain(engine.spool, engine.sink, engine.spool.key)
            # Only a warning, of up to 21 queries of the sink: while it serves.
            shared = asyncio.create_task(check_shared_key(engine.sink, engine.spool.key),
                                         name="shared-key-check")
        await engine.record_interrupted()
        yield
    finally:
        if shared is not None:
            shared.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await shared
        log.info("shutting down: sending what the sink takes within %.0f s; the rest"
                 " stays in the spool for the next start", SHUTDOWN_FLUSH_SECONDS)
        await engine.close(flush_window=SHUTDOWN_FLUSH_SECONDS)
        log.info("stopped")


async def _revocation_pass(accounts: Accounts, said: FailingPass, recorded: FailingPass) -> None:
    if accounts.record_changes:
        try:
            await accounts.record_account_changes()
        except Exception as exc:  # the rows wait for the next pass
            recorded.failed(exc)
        else:
            recorded.succeeded()
    try:
        await accounts.end_revoked_sessions()
    except Exception as exc:  # a stopped check would leave revoked sessions open: go on
        said.failed(exc)  # (each second while a damaged spool lasts: not in full)
    else:
        said.succeeded()


async def _end_revoked_sessions(accounts: Accounts, said: FailingPass,
                                recorded: FailingPass) -> None:
    """For as long as the server runs: record the changes of accounts the
    command line made beside it (``audit.record_account_changes``), and end
    the sessions of users that ``passwd`` or ``disable`` changed, within
    about a second."""
    while True:
        await _revocation_pass(accounts, said, recorded)
        await asyncio.sleep(REVOKE_CHECK_SECONDS)


async def _accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    # Sessions revoked while the server was down end before it serves: the
    # task below races the first requests (a disabled user's token worked).
    # Changes of accounts made meanwhile are recorded first: after the
    # engine's start, which caught the security chain up.
    said = FailingPass(log, "looking for sessions of disabled or changed users")
    recorded = FailingPass(log, "recording the changes of accounts")
    await _revocation_pass(app[ACCOUNTS], said, recorded)  # (failed: the task tries again)
    task = asyncio.create_task(_end_revoked_sessions(app[ACCOUNTS], said, recorded),
                               name="revocations")
    # The unknown users' hash, made while the server already serves.
    dummy = asyncio.create_task(app[ACCOUNTS].prepare(), name="dummy-hash")
    try:
        yield
    finally:
        for t in (task, dummy):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await app[ACCOUNTS].stop_rehashing()


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    app[CLIENT] = client
    try:
        yield
    finally:
        await client.close()


# The methods counted under their own name in /metrics; any other is "other".
# aiohttp's C parser knows a fixed list, but its pure-Python one (no C
# extension, AIOHTTP_NO_EXTENSIONS) takes any token up to the request line's
# 16 KiB: a label each would let any client grow /metrics without bound.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                            "TRACE", "CONNECT"})


def _metrics_middleware(app: web.Application) -> Middleware:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        resp = await handler(request)
        route = request.match_info.route
        name = (route.name if route is not None else None) or "unmatched"
        method = request.method if request.method in METRIC_METHODS else "other"
        app[REQUESTS].labels(method, name, str(resp.status)).inc()
        app[DURATIONS].labels(name).observe(time.perf_counter() - started)
        return resp

    return middleware


# An answer must have been sent this long after it was made, plus a second
# for every MIN_BYTES_PER_SECOND of it (a large answer over a slow link is
# given the time it needs). aiohttp waits for ever for a client to read what
# it was sent: one that never read its answers held the connection and the
# answers' bytes in the server's memory for as long as it liked (200
# connections asking for a 1 MiB document 4 times each: 49 MB of RSS to
# 786 MB, for good); its connection is dropped.
SEND_SECONDS = 75.0
_SEND_LOG = LogThrottle()


@web.middleware
async def send_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Send the answer here, within :data:`SEND_SECONDS` and a second for
    every ``MIN_BYTES_PER_SECOND`` of it (aiohttp's own send of it then
    finds it sent), else drop the connection: what was not sent is let go.
    Outermost, so that every answer goes this way; the action and its
    record are done by then."""
    resp = await handler(request)
    allowed = transfer_seconds(SEND_SECONDS, resp.content_length or 0)
    try:
        async with asyncio.timeout(allowed) as deadline:
            if isinstance(resp, StreamedJson):
                # Of unknown length: the same allowance, for what is sent so far.
                started = asyncio.get_running_loop().time()
                resp.on_sent = lambda sent: deadline.reschedule(
                    started + transfer_seconds(SEND_SECONDS, sent))
            await resp.prepare(request)
            await resp.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        left_out = _SEND_LOG.allow("send")
        if left_out is not None:
            log.warning("dropped a connection that had not read its answer %.0f s after it"
                        " was made (%s %s, %d)%s", allowed, request.method,
                        request.path[:256], resp.status, more(left_out))
    except ConnectionError:
        # The client is gone (aiohttp's own send finds that out again), or the
        # answer was cut short, which the request count took for its 200.
        if isinstance(resp, StreamedJson) and resp.cut:
            route = request.match_info.route
            request.app[CUT].labels((route.name if route is not None else None)
                                    or "unmatched").inc()
    finally:
        if isinstance(resp, StreamedJson):
            # Its callback holds the deadline, which holds this task, whose
            # result is the answer: a cycle, kept until a full collection
            # (rare: audit.runtime), with the answer's generator in it.
            resp.on_sent = None
    return resp


MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_FIELD = 32 * 1024
MIN_BCRYPT_ROUNDS = 10  # below it, serve warns (tests run with 4)


def create_app(
    config: Config,
    *,
    sink: Sink | None = None,
    engine: AuditEngine | None = None,
) -> web.Application:
    """The whole server as an aiohttp app; nothing is opened until it starts."""
    ensure_data_dir(config)
    if engine is None:
        engine = AuditEngine(config, sink or create_sink(config), audit_key(config))
    tokens = TokenService(jwt_key(config), config.auth.token_ttl_seconds)
    # Header and request-line limits above aiohttp's 8190 bytes: a long junk
    # token or document id is then refused by our code (401 invalid_token,
    # 404), recorded, in the API's error format; past these limits aiohttp
    # still refuses with 400 before any of our code runs, in the API's
    # format with our headers (install_parser_error_answer).
    install_parser_error_answer()
    routes.install_expect_handler()
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, handler_args={
        "max_line_size": MAX_REQUEST_LINE, "max_field_size": MAX_HEADER_FIELD})
    app[CONFIG] = config
    app[ENGINE] = engine
    app[TOKENS] = tokens
    app[ACCOUNTS] = Accounts(engine, config.auth.bcrypt_rounds,
                             record_changes=config.audit.record_account_changes)
    engine.before_reap.append(app[ACCOUNTS].end_revoked_sessions)
    app[THROTTLE] = LoginThrottle(config.auth.login_max_failures,
                                  config.auth.login_window_seconds)
    app[REGISTRY], app[REQUESTS], app[DURATIONS], app[CUT] = new_registry()
    app[PUBLIC] = routes.PUBLIC_ROUTES
    app[TRUSTED_PROXIES] = proxies = config.server.proxy_networks()
    if any(net.prefixlen == 0 for net in proxies):
        log.warning("server.trusted_proxies trusts every address: any client can then"
                    " choose the address recorded for it and counted by the login throttle")
    if config.auth.bcrypt_rounds < MIN_BCRYPT_ROUNDS:
        log.warning("auth.bcrypt_rounds = %d: password hashes this cheap are quick to guess"
                    " from a copy of the spool (OWASP ASVS 2.4.4 asks for at least %d;"
                    " the default is 12); meant for tests only",
                    config.auth.bcrypt_rounds, MIN_BCRYPT_ROUNDS)
    app[AI] = create_provider(config, app)
    app[CHAT_SLOTS] = asyncio.Semaphore(CHAT_CONCURRENCY)
    app[CHAT_TURNS] = UserTurns(CHAT_PER_USER)
    app[COUNTS] = SharedCounts(engine)
    app[IN_FLIGHT] = in_flight = InFlight()
    app.on_shutdown.append(in_flight.on_shutdown)
    app.middlewares.extend(
        [in_flight.middleware, send_middleware, _metrics_middleware(app), error_middleware,
         session_middleware(engine, tokens)]
    )
    app.on_response_prepare.append(security_headers)
    routes.setup(app)
    app.cleanup_ctx.append(_client_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_accounts_ctx)  # after the engine opens, before it closes
    # Torn down first: requests still running (their clients gone) end
    # before the engine closes, within the time the others get.
    app.cleanup_ctx.append(requests_ctx(config.server.shutdown_grace_seconds))
    return app


# -- logging -------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages never carry secrets or tokens.

    ``ascii_only`` for a stream that cannot take every character (stderr
    under a locale that is not UTF-8): its encoder wrote what it could not
    encode as ``\\xfc``, no JSON escape, and a log shipper could not read
    the line (a client's path with an ``ü`` in the access log)."""

    def __init__(self, ascii_only: bool = False) -> None:
        super().__init__()
        self.ascii_only = ascii_only

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # Readable UTF-8, but C1 controls (0x80-0x9f: 8-bit terminal escapes
        # from a client's path or header) as \u escapes, like C0 ones; so
        # are the line and paragraph separators (a line break to str.splitlines
        # and older JavaScript) and the bidirectional controls, which make a
        # line read as something else than it holds (Trojan Source).
        return json.dumps(out, ensure_ascii=self.ascii_only).translate(_LOG_ESCAPES)


_LOG_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x061C, 0x200E, 0x200F,
                                           *range(0x2028, 0x202F), *range(0x2066, 0x206A))}
# For plain text on a terminal (a command's report): the C0 controls and DEL
# too, which JSON escapes by itself.
_TERMINAL_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}, **_LOG_ESCAPES}


def printable(text: str) -> str:
    """``text`` for a terminal: what a sink holds is printed as it is, but
    its controls escaped (a session id in the sink with ``ESC [1A`` and
    ``ESC [8m`` would move the cursor over verify's report and hide it)."""
    return text.translate(_TERMINAL_ESCAPES)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it could not parse (a bad request line, a header
    over its limits: scanners send them all day) at error level with a
    traceback. One warning line naming the kind of problem is what an
    operator needs; the exception's text is left out, as it quotes the
    request (a header line, which may carry a token). Any client can send
    them as fast as it likes: one line per kind, then one a minute saying
    how many like it were left out (each has its 400 in the access log).

    So is a body that cannot be read (a gzip body that does not inflate, a
    broken chunked framing) of a request answered without reading it (a
    401, a GET, ``/healthz``): aiohttp reads what is left of it after the
    answer, and logged that read's failure as an "Unhandled exception" with
    a traceback (it then closes the connection, as it should)."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = LogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            kind = type(exc).__name__
            left_out = self.throttle.allow(f"{exc.code} {kind}")  # (a bounded set of keys)
            if left_out is None:
                return False
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed HTTP request refused with %s: %s%s"
            record.args = (exc.code, kind, more(left_out))
            record.exc_info = record.exc_text = None
        elif isinstance(exc, RequestPayloadError):
            kind = type(exc.__cause__ if exc.__cause__ is not None else exc).__name__
            left_out = self.throttle.allow(f"body {kind}")
            if left_out is None:
                return False
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed HTTP request body dropped after its answer: %s%s"
            record.args = (kind, more(left_out))
            record.exc_info = record.exc_text = None
        return True


_MALFORMED = MalformedRequestFilter()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr, each on a line of its own: a progress bar that
    ``drain`` keeps redrawing there (``\r``, no newline) is ended first."""

    progress_showing = False

    def emit(self, record: logging.LogRecord) -> None:
        if StderrHandler.progress_showing:
            StderrHandler.progress_showing = False
            with contextlib.suppress(OSError):  # (as a failed log line is: not raised)
                self.stream.write("\n")
        super().emit(record)


def setup_logging(*, background: bool = False) -> None:
    """Log lines as JSON on stderr; with ``background`` (``serve``), written
    by a thread of their own (audit.logwriter: a stalled reader of stderr
    must not stop the event loop)."""
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)  # once, however often called
    handler: logging.Handler = (BackgroundStderr(sys.stderr) if background
                                else StderrHandler(sys.stderr))
    handler.setFormatter(JsonFormatter(ascii_only=not _utf8_stream(sys.stderr)))
    level = os.environ.get("SESSION_AUDIT_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise ConfigError(f"SESSION_AUDIT_LOG_LEVEL: {level.lower()!r} is not one of"
                          f" {', '.join(name.lower() for name in LOG_LEVELS)}")
    root = logging.getLogger()
    for old in root.handlers:  # (a thread of an earlier call's)
        if isinstance(old, BackgroundStderr):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Their DEBUG lines carry whole statements and documents (audit records,
    # usernames tried, captured chat text): never, whatever the level.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def _utf8_stream(stream: Any) -> bool:
    """Whether ``stream`` encodes every character (None: closed at start)."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name == "utf-8"
    except LookupError:
        return False


def _for_terminal(exc: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler for a command's output: a file name's bytes
    that are not text in the locale (held as lone surrogates) go out as they
    are, as Python's own handler for stdout under the C locale does; any
    other character the locale's encoding lacks is escaped (``\\xfc``)."""
    try:
        return codecs.lookup_error("surrogateescape")(exc)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(exc)


codecs.register_error("session_audit.terminal", _for_terminal)


def setup_output() -> None:
    """Standard output under a locale that is not UTF-8 (LC_ALL=C with
    PYTHONUTF8=0, a Latin-1 one) takes every character, escaped where it
    must be: what verify prints of the sink (a session id, a detail) is
    anyone's text, and an ``ë`` in it made verify die with a
    UnicodeEncodeError traceback before the rest of its report. (So does a
    strict UTF-8 one, PYTHONIOENCODING=utf-8, for a file name's bytes.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (not _utf8_stream(sys.stdout)
                                    or getattr(sys.stdout, "errors", "strict") == "strict"):
        reconfigure(errors="session_audit.terminal")


QUIET_LOGGERS = ("aiosqlite", "pymongo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- commands ------------------------------------------------------------------


async def _tune_gc(app: web.Application) -> None:
    """Once started (:func:`audit.runtime.tune_gc`)."""
    tune_gc()


def _handle_signals(app: web.Application) -> None:
    """SIGINT/SIGTERM/SIGHUP: the first starts the graceful shutdown (aiohttp's
    ``GracefulExit``); once it has begun, for whatever reason, later ones are
    logged and ignored. aiohttp's own handlers raise on every signal: a second
    one during the shutdown (a double Ctrl-C, ``timeout`` signalling the
    process group too) cancelled the engine's close half way, and an unclosed
    sink connection's thread kept the process from ever exiting."""
    stopping = False
    grace = app[CONFIG].server.shutdown_grace_seconds

    def on_signal(name: str) -> None:
        nonlocal stopping
        if stopping:
            log.warning("%s: already shutting down (requests in flight get up to %g s,"
                        " then the flush window %g s); kill -9 is safe for the audit"
                        " trail if it must be now", name, grace,
                        SHUTDOWN_FLUSH_SECONDS)
            return
        stopping = True
        log.info("%s: shutting down: no new connections; requests in flight get up to"
                 " %g s", name, grace)
        raise web.GracefulExit()

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        # SIGHUP too: a closed terminal (`make run` in an ssh session) killed
        # the server at once, without its shutdown (found by a CLI hunt).
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # `nohup`: asked to outlive the terminal, as it did
            loop.add_signal_handler(sig, on_signal, sig.name)

    async def shutting_down(app: web.Application) -> None:
        nonlocal stopping  # a failed start's cleanup is a shutdown too
        stopping = True

    app.on_startup.insert(0, install)  # before the engine opens: a signal then is graceful
    app.on_shutdown.insert(0, shutting_down)


def serve_lock(config: Config) -> tuple[int, int]:
    """Hold the data directory for this server: open descriptors with an
    exclusive ``flock`` on the directory itself and on
    ``<spool>.serve-lock`` (which names the pid), released when the process
    ends however it ends (``kill -9`` too).

    Two servers on one spool would each keep its own cache of the open
    sessions' chain heads, the next row ids and the security chain, and
    append over each other: forked chains, commits refused. The commands
    meant to run beside a server (``drain``, ``adduser``, ``status``...) do
    not take this lock.

    The directory's lock is what keeps a second server out: a lock held
    only on the file held nothing once the file was deleted (a clean-up of
    the data directory while the server ran): the next ``serve`` made a
    new file, locked it, and served on the same spool. The file's lock is
    kept for a server of an earlier release, which takes only that one.
    """
    path = config.spool_path.with_name(config.spool_path.name + ".serve-lock")
    dfd = os.open(config.spool_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    fd = -1
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fd = open_lock(path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        for d in (fd, dfd):
            if d >= 0:
                os.close(d)
        if not isinstance(exc, BlockingIOError):
            raise
        holder = _lock_holder(path)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise StartupError(f"another server is running on {config.spool_path}{pid}:"
                           " stop it first, or give this one another server.data_dir"
                           ) from None
    # The pid is for the message above only: a lock file that cannot take it
    # (a full disk: the file new or empty, so the write needs a block) must
    # not stop a server that can otherwise start and say why it cannot
    # record (readyz 503), nor leave another server's stale pid in it.
    mine = f"{os.getpid()}\n".encode("ascii")
    try:
        if os.pwrite(fd, mine, 0) != len(mine):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.ftruncate(fd, len(mine))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # (frees; needs no space)
        log.warning("%s: the server's pid could not be written (%s); serving without it",
                    path, exc.strerror or exc)
    return dfd, fd


def _lock_holder(path: Path) -> str:
    """What the serve lock's file says (the pid), or "" (the file is gone)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            return os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    return ""


def mongodb_uri_set(config: Config) -> None:
    """The mongodb sink's URI variable is set (else :class:`StartupError`): it
    cannot appear later, and a server (or a drain) would retry for ever a
    sink it can never open."""
    uri_env = config.sink.mongodb.uri_env
    if config.sink.type == "mongodb" and not os.environ.get(uri_env):
        raise StartupError(f"sink.mongodb.uri_env: the environment variable {uri_env}"
                           " (the MongoDB URI) is not set")


def ai_credentials_single(config: Config) -> None:
    """ai.openai.base_url with a user and password, or a user alone (a
    gateway's token: ``https://TOKEN@host``), sent as Basic auth, and an API
    key set (sent as a Bearer token) both make the Authorization header:
    aiohttp refuses such a request, and every chat got 502 (else
    :class:`StartupError`, naming neither secret)."""
    ai = config.ai.openai
    if config.ai.provider != "openai" or not ai.api_key_env:
        return
    try:
        parts = urlsplit(ai.base_url)
        userinfo = bool(parts.username) or parts.password is not None
    except ValueError:
        return  # (the config's own check says what is wrong with it)
    if userinfo and (os.environ.get(ai.api_key_env) or "").strip():
        raise StartupError(f"ai.openai.base_url holds a user or password (sent as Basic auth)"
                           f" and {ai.api_key_env} is set (sent as a Bearer token): both would"
                           " be the Authorization header; use one (ai.openai.api_key_env ="
                           " \"\" sends no key)")


# The soft descriptor limit is raised to the hard one up to this (an
# "unlimited" hard limit is not one the kernel takes for descriptors).
MAX_NOFILE = 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one, as Go's
    runtime does, and return it. Every connection holds one until it is
    closed, an idle one for up to aiohttp's keep-alive timeout (75 s) from
    its start; at the limit, libuv closes every new connection at once.
    Under the usual soft limit of 1024, a few hundred connections that sent
    nothing locked every other client out (an idle connection costs the
    server ≈ 3 kB, so a limit in the hundreds of thousands is affordable)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_NOFILE if hard == resource.RLIM_INFINITY else min(hard, MAX_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # (above the kernel's nr_open)
            log.warning("could not raise the open file limit from %d to %d: %s",
                        soft, want, exc)
    return soft


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    import uvloop

    nofile = raise_nofile_limit()
    if nofile < 4096:
        log.warning("the open file limit is %d (ulimit -n; LimitNOFILE= under systemd):"
                    " that many connections at once, idle ones included, lock every other"
                    " client out; raise the hard limit", nofile)
    mongodb_uri_set(config)
    ai_credentials_single(config)
    if not config.spool_path.exists():  # a first start: fail before anything is made
        admin_password_from_env(config.auth.min_password_chars)
    ensure_data_dir(config)
    lock = serve_lock(config)
    source = resolve_config_path(getattr(args, "config", None))
    log.info("config: %s; data directory: %s",
             source if source.is_file() else f"the defaults ({source} not found)",
             config.data_dir.resolve())
    try:
        return _serve(config, uvloop.new_event_loop())
    finally:
        for fd in lock:
            os.close(fd)


def serving_url(host: str, port: int) -> str:
    """The URL a client uses: an IPv6 address in brackets (``http://[::1]:8080``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# run_app's default: connections a start queues until it serves.
LISTEN_BACKLOG = 128


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (every address the host resolves to) as asyncio's
    ``create_server`` would, and listen, before anything else is opened: a
    port in use, or a host that is not this machine's, then stops the start
    with the spool untouched. Bound after the spool and sink were opened
    (run_app's order), such a start had already cut parts to new limits,
    sent pending parts to the sink for up to 3 s and made the first admin
    before it failed.

    Listening at once holds the port: under SO_REUSEADDR (set, as asyncio
    does, for a restart beside the last run's TIME_WAIT connections) a port
    bound but not yet listening can be bound again. A second server started
    meanwhile then bound it too, the first to listen served, and the other,
    on uvloop, said it served while it listened on nothing. Connections that
    come while the start goes on wait in the backlog until it serves."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # (asyncio's too: one family a socket)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                    sock.listen(LISTEN_BACKLOG)
                except OSError as exc:
                    raise OSError(exc.errno, f"error while attempting to bind on address"
                                  f" {addr!r}: {(exc.strerror or '').lower()}") from None
        except BaseException:
            for sock in socks:
                sock.close()
            raise
    except (OSError, UnicodeError) as exc:
        # A host that does not resolve or is not ours, a port in use or not
        # allowed; a name that is none (a label over 63 characters: the IDNA
        # codec's UnicodeError, a traceback).
        raise StartupError(f"server.host / server.port: cannot listen on"
                           f" {host}:{port}: {exc}") from None
    return socks


def _serve(config: Config, loop: asyncio.AbstractEventLoop) -> int:
    socks = listening_sockets(config.server.host, config.server.port)
    try:
        app = create_app(config)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    app.on_startup.append(_tune_gc)
    _handle_signals(app)

    def serving(_banner: str) -> None:
        # run_app's banner, printed once the socket listens (not on_startup,
        # which runs before the bind and would announce a port in use).
        log.info("serving on %s with the %s sink",
                 serving_url(config.server.host, config.server.port), config.sink.type)

    try:
        web.run_app(
            app,
            sock=socks,
            loop=loop,
            access_log_class=AccessLog,
            print=serving,
            # aiohttp's: it waits this long for requests in flight, then cuts
            # off what they still read (a body still arriving) and tells them
            # to stop (a chat waiting on its provider does not hear that); at
            # the grace's end requests_ctx cancels them (a cancelled chat is
            # recorded).
            shutdown_timeout=config.server.shutdown_grace_seconds / 2,
            handle_signals=False,  # _handle_signals
        )
    finally:
        for sock in socks:
            sock.close()
    return 0


def _spool_conn(config: Config) -> sqlite3.Connection:
    path = config.spool_path
    ensure_data_dir(config)  # adduser before the first start creates it: owner only
    conn = connect(path, config.audit.synchronous)
    try:
        prepare(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def utf8_first(raw: bytes, text: str) -> str:
    """A password given as bytes (the environment, a pipe) is their UTF-8
    text, which is what a login sends, if they are UTF-8; else ``text``,
    what the locale reads in them (a Latin-1 terminal's 'ä'). Python reads
    both in the locale's encoding: under a Latin-1 one, the UTF-8 of
    'pässwort' became 'pÃ¤sswort', a password no login could give, and
    under LC_ALL=C PYTHONUTF8=0 it was refused as not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


def _stdin_line() -> str:
    """The first line of standard input (see :func:`utf8_first`)."""
    stdin = sys.stdin
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # (text already)
        return stdin.readline()
    line: bytes = raw.readline()
    return utf8_first(line, line.decode(stdin.encoding, stdin.errors or "strict"))


def _read_password(command: str, name: str, from_stdin: bool, min_chars: int) -> str | None:
    """A new password from stdin's first line or asked twice on the terminal;
    None (after saying why on stderr) if there is none fit to use (shorter
    than ``min_chars``: ``auth.min_password_chars``)."""
    if sys.stdin is None:  # started with 0<&- (an AttributeError traceback)
        print(f"{command}: standard input is closed: give the password on it with"
              " --password-stdin", file=sys.stderr)
        return None
    if from_stdin:
        try:
            password = _stdin_line().rstrip("\r\n")
        except UnicodeDecodeError:  # (a locale whose stdin is strict)
            print(f"{command}: the password is not UTF-8 text", file=sys.stderr)
            return None
    elif not sys.stdin.isatty():  # getpass would read the pipe, warning it may echo
        print(f"{command}: no terminal to ask on: give the password on stdin with"
              " --password-stdin", file=sys.stderr)
        return None
    else:
        try:
            password = getpass.getpass(f"password for {name}: ")
            again = getpass.getpass("again: ")
        except EOFError:
            print(f"{command}: no password given (without a terminal, use --password-stdin)",
                  file=sys.stderr)
            return None
        if again != password:
            print(f"{command}: the passwords differ", file=sys.stderr)
            return None
    if not is_utf8(password):  # login could never send it
        print(f"{command}: the password is not UTF-8 text", file=sys.stderr)
        return None
    if password_chars(password) < min_chars:  # normalised, as it is hashed
        print(f"{command}: the password must have at least {min_chars} characters",
              file=sys.stderr)
        return None
    if len(password) > MAX_PASSWORD_CHARS:  # login refuses longer ones
        print(f"{command}: the password must have at most {MAX_PASSWORD_CHARS} characters",
              file=sys.stderr)
        return None
    return password


def cmd_adduser(config: Config, args: argparse.Namespace) -> int:
    name = args.name
    if not valid_username(name):
        print("adduser: names are 1-64 characters of A-Z a-z 0-9 . _ @ -", file=sys.stderr)
        return 2
    password = _read_password("adduser", name, args.password_stdin,
                              config.auth.min_password_chars)
    if password is None:
        return 2
    conn = _spool_conn(config)
    try:
        add_user_sync(conn, name, password, "admin" if args.admin else "user",
                      config.auth.bcrypt_rounds)
    except UserExists as exc:
        alike = "" if exc.existing == name else (
            f" as {exc.existing!r} (names that differ only in case read alike in the"
            " audit trail)")
        print(f"adduser: user {name!r} exists already{alike}", file=sys.stderr)
        return 1
    except sqlite3.IntegrityError:  # added beside it a moment ago
        print(f"adduser: user {name!r} exists already", file=sys.stderr)
        return 1
    except sqlite3.OperationalError as exc:
        return _busy("adduser", exc)
    finally:
        conn.close()
    print(f"added {'admin' if args.admin else 'user'} {name}")
    return 0


# What passwd and disable say about the sessions they end.
SESSIONS_END = ("open sessions end within a few seconds (when the server starts, if it is"
                " not running)")


def _existing_user_conn(command: str, config: Config, name: str) -> sqlite3.Connection | None:
    """The spool, if it exists and holds user ``name`` (else None, said on stderr)."""
    if not config.spool_path.exists():
        print(f"{command}: no spool at {config.spool_path}", file=sys.stderr)
        return None
    conn = _spool_conn(config)
    if conn.execute("SELECT 1 FROM users WHERE username = ?", (name,)).fetchone() is None:
        conn.close()
        print(f"{command}: no user {name!r}", file=sys.stderr)
        return None
    return conn


def _busy(command: str, exc: sqlite3.OperationalError) -> int:
    """The spool did not take the change (locked for longer than the busy
    timeout, say by a server converting it at start): nothing changed."""
    print(f"{command}: the spool did not take the change ({exc}); nothing changed,"
          " try again", file=sys.stderr)
    return 1


def cmd_passwd(config: Config, args: argparse.Namespace) -> int:
    """Set a user's password: logins check the new one at once, and the
    user's open sessions end (the server sees it within about a second)."""
    name = args.name
    conn = _existing_user_conn("passwd", config, name)
    if conn is None:
        return 1
    try:
        password = _read_password("passwd", name, args.password_stdin,
                                  config.auth.min_password_chars)
        if password is None:
            return 2
        stored = hash_password(password, config.auth.bcrypt_rounds)
        changed = change_user_sync(conn, name, password_hash=stored)
    except sqlite3.OperationalError as exc:
        return _busy("passwd", exc)
    finally:
        conn.close()
    if not changed:
        print(f"passwd: no user {name!r}", file=sys.stderr)
        return 1
    print(f"changed the password of {name}; its {SESSIONS_END}")
    initial = config.data_dir / "initial_admin_password"
    if name == "admin" and initial.exists():
        initial.unlink()
        print(f"removed {initial}: it held the old password")
    return 0


def cmd_disable(config: Config, args: argparse.Namespace) -> int:
    """Disable a user (no login; its open sessions end) or enable it again.
    The last enabled admin cannot be disabled."""
    command, disable = args.command, args.command == "disable"
    name = args.name
    conn = _existing_user_conn(command, config, name)
    if conn is None:
        return 1
    try:
        changed = change_user_sync(conn, name, disabled=disable)
    except LastAdmin:
        print(f"{command}: {name!r} is the only enabled admin; add or enable another"
              " admin first", file=sys.stderr)
        return 1
    except sqlite3.OperationalError as exc:
        return _busy(command, exc)
    finally:
        conn.close()
    if not changed:
        print(f"{command}: no user {name!r}", file=sys.stderr)
        return 1
    if disable:
        print(f"disabled {name}: it cannot log in, and its {SESSIONS_END}")
    else:
        print(f"enabled {name}")
    return 0


def cmd_users(config: Config, args: argparse.Namespace) -> int:
    """List the users: name, role, enabled or disabled, created."""
    if not config.spool_path.exists():
        print(f"users: no spool at {config.spool_path}", file=sys.stderr)
        return 1
    conn = connect(config.spool_path, config.audit.synchronous, readonly=True)
    try:
        rows = conn.execute("SELECT username, role, disabled, created_at FROM users"
                            " ORDER BY username").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such column" not in str(exc):
            raise
        # a file of an earlier release, never served since
        print(f"users: {exc} (start the server once to bring the spool up to date)",
              file=sys.stderr)
        return 1
    finally:
        conn.close()
    for name, role, disabled, created in rows:
        print(f"{name}\t{role}\t{'disabled' if disabled else 'enabled'}\tcreated {created}")
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    if not config.spool_path.exists():
        print(json.dumps({"spool": "absent", "path": path_text(config.spool_path)}))
        return 1
    conn = connect(config.spool_path, config.audit.synchronous, readonly=True)
    try:
        out = queries.counts(conn, time.time())
        out["spool_bytes"] = max(0, used_bytes(conn) - app_bytes(conn))
        row = conn.execute(SINK_STATUS_SQL).fetchone()
    finally:
        conn.close()
    # The state a server last saved (with its saved_at): of the configured
    # sink only if the server used that one; after a switch, apart.
    saved = saved_sink_status(row)
    where = sink_where(config)
    if saved is not None and (saved.get("type"), saved.get("where", where)) \
            == (config.sink.type, where):
        out["sink"] = saved
    else:
        out["sink"] = {"type": config.sink.type, "where": where}
        if saved is not None:
            out["last_server_sink"] = saved
    print(json.dumps(out, indent=2))
    return 0


async def _verify(config: Config) -> int:
    key = existing_audit_key(config)
    if config.sink.type == "sqlite":
        _existing("sink database", config.sqlite_sink_path)
    elif config.sink.type == "jsonl":
        _existing("sink directory", config.jsonl_dir)
    anchor = None
    if config.spool_path.exists():  # read before the sink: see SpoolAnchor
        try:
            conn = connect(config.spool_path, config.audit.synchronous, readonly=True)
            try:
                check = stored_key_check(conn)
                if check is not None and not hmac.compare_digest(check, key_check(key)):
                    raise StartupError("the audit key is not the one the server's spool"
                                       " uses: every chain would look changed")
                anchor = spool_anchor(conn, key, sink_identity(config))
            finally:
                conn.close()
        except (sqlite3.Error, ValueError) as exc:  # (ValueError: a damaged text in it)
            print(f"verify: the spool cannot be read ({damage(exc) or exc}); the end of this"
                  " server's security chain is not checked", file=sys.stderr)
    sink = create_sink(config, readonly=True)
    try:
        await sink.open()
        report = await verify_sink(sink, key, anchor, overdue_after=open_window(config))
    except QueryNotSupported:
        print(f"verify: the {config.sink.type} sink cannot be read back; verify the"
              " receiver's copy with audit.verify.check_session", file=sys.stderr)
        return 2
    except SinkError as exc:
        print(printable(f"verify: the sink is unavailable: {exc}"), file=sys.stderr)
        return 2
    finally:
        await sink.close()
    for p in report.problems:
        # A problem of no one session (a line the sink cannot place) is the sink's.
        print(printable(f"{p.session_id or 'sink'}: {p.kind}: {p.detail}"))
    if report.other_key_sessions:
        print(f"verify: sessions of the sink not begun from this audit key's genesis value:"
              f" {report.other_key_sessions}; chained under another key (a server writing to"
              " this sink with another audit key: servers sharing a sink must share one;"
              " README: Several servers, one sink), or forged", file=sys.stderr)
    chains = (f" in {report.security_chains} chains (one per spool that wrote them)"
              if report.security_chains > 1 else "")
    print(f"verified {report.sessions} sessions, {report.parts} parts, {report.events} events,"
          f" {report.security_events} security events{chains}:"
          f" {'OK' if report.ok else _count(len(report.problems), 'problem')}")
    return 0 if report.ok else 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _progress(total: list[int]) -> Callable[[dict[str, Any]], None]:
    def show(c: dict[str, Any]) -> None:
        left = c["pending_parts"] + c["pending_security_events"]
        total[0] = max(total[0], left)
        done = total[0] - left
        width = 30
        filled = width * done // total[0] if total[0] else width
        # Only a display: stderr on a full disk (a log file, 2>/dev/full)
        # failed the drain at its first line, before anything was sent.
        with contextlib.suppress(OSError):
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total[0]}"
                             f" written, {c['dead_letter']} dead-lettered ")
            sys.stderr.flush()
        StderrHandler.progress_showing = True

    return show


def _end_progress() -> None:
    if StderrHandler.progress_showing:
        StderrHandler.progress_showing = False
        with contextlib.suppress(OSError):
            sys.stderr.write("\n")


async def _drain(config: Config, timeout: float | None = None) -> int:  # noqa: ASYNC109
    _existing("spool", config.spool_path)
    engine = AuditEngine(config, create_sink(config), existing_audit_key(config),
                         beside_server=True)
    await engine.open(background=False)
    finished = True
    try:
        show = _progress([0])
        # The total to drain is what is pending before the first write; the
        # flusher reports only after each step, when the first item is gone.
        counts = await engine.spool.read(lambda c: queries.counts(c, time.time()))
        if counts["pending_parts"] or counts["pending_security_events"]:
            mongodb_uri_set(config)  # (with nothing pending, no sink is needed)
        show(counts)
        try:
            async with asyncio.timeout(timeout):
                await engine.flusher.drain(show)
        except TimeoutError:
            finished = False
        status = await engine.status()
        # (the server records them, not a drain, which may run beside it)
        waiting = await engine.spool.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM account_changes").fetchone()[0]) \
            if config.audit.record_account_changes else 0
    finally:
        await engine.close(flush_window=0)
    _end_progress()
    left = status["pending_parts"] + status["pending_security_events"]
    if not finished:
        # No error yet: a write (or the sink's open) was still waiting for its
        # answer, or for the flush budget.
        error = status["sink"]["last_error"] or ("no error yet (a write was still under way"
                                                 " or waiting for max_writes_per_second)")
        print(printable(f"drain: gave up after {timeout:g} s; {left} still pending (kept in"
                        f" the spool), {status['dead_letter']} dead-lettered; the sink:"
                        f" {error}"), file=sys.stderr)
        return 1
    if left and status.get("spool_damaged"):
        # The flusher stops when it finds nothing it can send: with some
        # pending, what it cannot read (a damaged page of the spool's
        # security events). "drained", exit 0, told a script that all was in
        # the sink and the spool could go. (Pending without damage: a server
        # beside this drain recorded more since; drained as before.)
        print(printable(f"drain: stopped with {left} still pending (kept in the spool),"
                        f" {status['dead_letter']} dead-lettered: {status['spool_damaged']}"),
              file=sys.stderr)
        return 1
    print(f"drained; {status['dead_letter']} dead-lettered, "
          f"{status['active_sessions']} sessions still open"
          + (f", {waiting} changes of accounts still to record (at the server's next start:"
             " keep the spool)" if waiting else ""))
    return 0 if status["dead_letter"] == 0 else 1


async def _retry_dead(config: Config) -> int:
    _existing("spool", config.spool_path)
    engine = AuditEngine(config, create_sink(config), existing_audit_key(config),
                         beside_server=True)
    await engine.open(background=False)
    try:
        n = await engine.retry_dead_letters()
    finally:
        await engine.close(flush_window=0)
    print(f"{n} dead-lettered items are pending again")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


class Terminated(Exception):
    """A command stopped by SIGTERM (``kill``, a service manager), its
    cleanup done: :func:`main` says so and exits 143, as the signal's own
    action would have, but without leaving the sink's connection and the
    spool's files unclosed or a progress line unended."""


def _run_interruptible(command: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(command)``, Ctrl-C or SIGTERM cancelling it from the
    event loop.

    ``asyncio.run`` cancels the main task from a Python signal handler,
    which runs between any two bytecodes of the loop's own code: a Ctrl-C
    that landed while the loop was handing a thread's result to the future
    the task awaited cancelled that future half way through, and asyncio
    logged ``InvalidStateError`` with a traceback (seen about once in 300
    interrupted drains). Here the signal only wakes the loop, which cancels
    the task between callbacks; the command's cleanup runs as before, and
    KeyboardInterrupt (:class:`Terminated` for SIGTERM) is raised once it is
    done. A second signal gets its default action (KeyboardInterrupt, or
    the end of the process) at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(command)  # (signals are the main thread's)
    stopped_by: signal.Signals | None = None
    signals = (signal.SIGINT, signal.SIGTERM)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(sig: signal.Signals) -> None:
            nonlocal stopped_by
            stopped_by = sig
            for s in signals:  # the next one is Python's
                loop.remove_signal_handler(s)
            task.cancel()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await command
        except asyncio.CancelledError:
            if stopped_by is not None:
                return 128 + stopped_by  # (raised below, once the loop is closed)
            raise
        finally:
            if stopped_by is None:
                for sig in signals:
                    loop.remove_signal_handler(sig)

    code = asyncio.run(run())
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
    if stopped_by == signal.SIGTERM:
        raise Terminated
    return code


def hold_standard_descriptors() -> None:
    """Descriptors 0, 1 and 2 that the process was started without (``serve
    0<&- 1>&- 2>&-``, a daemon's wrapper) are opened on /dev/null, before
    anything else takes them. Else the next files opened took them: the data
    directory's lock, the serve lock, and uvloop's epoll descriptor, which
    libuv refuses to close ("uv__close: Assertion fd > STDERR_FILENO"): every
    shutdown ended in SIGABRT (exit -6, a core dump) after its clean stop;
    and a file of ours on 1 or 2 would take whatever is written there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # (the lowest free one: fd itself)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _description(doc: str | None) -> str:
    """The module's docstring as --help shows it: its title, then its usage
    lines indented under it. Python 3.13 strips a docstring's common
    indentation when it compiles it and 3.11 keeps it: as it was, the usage
    lines lost their indent on 3.13."""
    title, _, rest = inspect.cleandoc(doc or "").partition("\n")
    return title + "\n" + textwrap.indent(rest, "    ")


def main(argv: list[str] | None = None) -> int:
    hold_standard_descriptors()
    parser = argparse.ArgumentParser(prog="server.py", description=_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --config given before the command is not overwritten by
    # the command's default.
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default: $SESSION_AUDIT_CONFIG or ./config.toml)")
    sub.add_parser("serve", parents=[common], help="serve the API (default)")
    add = sub.add_parser("adduser", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="give the user the admin role")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    pw = sub.add_parser("passwd", parents=[common], help="set a user's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input")
    for command, help_text in (("disable", "disable a user: no login, its sessions end"),
                               ("enable", "enable a disabled user again")):
        sub.add_parser(command, parents=[common], help=help_text).add_argument("name")
    sub.add_parser("users", parents=[common], help="list the users")
    sub.add_parser("status", parents=[common], help="spool and sink state")
    sub.add_parser("verify", parents=[common], help="check every stored session's chain")
    drain = sub.add_parser(
        "drain", parents=[common], help="flush everything pending, then exit",
        description="Flush everything pending to the sink, then exit: 0 when all is"
        " written, 1 with dead letters, at --timeout or when a damaged spool keeps some"
        " from being read (what is left stays pending),"
        " 130 on Ctrl-C, 143 on SIGTERM (each after closing the sink and the spool).")
    drain.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS", default=None,
                       help="give up after this long (default: wait as long as it takes)")
    sub.add_parser("retry-dead", parents=[common], help="make dead-lettered items pending")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = args.command or "serve"
    config: Config | None = None
    try:
        setup_output()
        setup_logging(background=command == "serve")
        config = load_config(args.config)
        if command == "serve":
            return cmd_serve(config, args)
        if command == "adduser":
            return cmd_adduser(config, args)
        if command == "passwd":
            return cmd_passwd(config, args)
        if command in ("disable", "enable"):
            return cmd_disable(config, args)
        if command == "users":
            return cmd_users(config, args)
        if command == "status":
            return cmd_status(config, args)
        if command == "verify":
            return _run_interruptible(_verify(config))
        if command == "drain":
            return _run_interruptible(_drain(config, args.timeout))
        return _run_interruptible(_retry_dead(config))
    except (ConfigError, StartupError, AuditKeyMismatch) as exc:
        _say(f"session-audit: {exc}")
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        _end_progress()
        left = ("; what was not written stays pending in the spool"
                if command in ("drain", "retry-dead") else "")
        how = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped by SIGTERM"
        _say(f"session-audit: {command}: {how}{left}")
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader of the output went away (`server.py verify | head`):
        # stop quietly, as other tools do, and let nothing write there again
        # (Python flushes stdout at exit).
        log.debug("%s: its output was closed", command, exc_info=True)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (sqlite3.Error, OSError, SpoolUnavailable) as exc:
        # A spool or sink file that is not a database (or is damaged), a data
        # directory that cannot be written: one line, not a traceback.
        log.debug("%s failed", command, exc_info=True)
        where = (f" (in {config.data_dir})" if config is not None
                 and isinstance(exc, sqlite3.Error) and not isinstance(exc, SpoolUnavailable)
                 else "")
        _say(f"session-audit: {command}: {without_text(exc)}{where}"
             " (SESSION_AUDIT_LOG_LEVEL=debug logs where it happened)")
        return 1


def _say(line: str) -> None:
    """A command's last word on stderr, after the log lines before it (which
    ``serve`` writes from a thread of its own)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
