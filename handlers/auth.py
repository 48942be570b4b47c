"""Login, logout and ``/me``: accounts, bcrypt off the event loop, throttling."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import enum
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sqlite3
import time
import unicodedata
import urllib.parse
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import bcrypt
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from audit.engine import AuditEngine
from audit.events import USER_ACTIONS, Draft, Source, format_ts, new_id
from audit.logthrottle import LogThrottle, more
from audit.middleware import anonymous_source, client_ip
from audit.ratelimit import client_key
from audit.store import OpenSession, Writer

from .errors import ApiError, bad_request, json_response
from .keys import ACCOUNTS, CONFIG, CTX, ENGINE, TOKENS
from .requests import (
    audited_input,
    body_deadline,
    read_body,
    read_json,
    send_continue,
    too_large,
)

log = logging.getLogger("session_audit.accounts")

USERNAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
# The longest password a login takes, and so adduser, passwd and
# SESSION_AUDIT_ADMIN_PASSWORD: counted on the text as given, not as
# normalised (NFKC can make a character up to 18): it bounds what a client
# may send and have processed, and set and login count alike, so that any
# password set logs in when typed as it was set. (The shortest, which only
# setting checks, is counted as normalised: see password_chars.)
MAX_PASSWORD_CHARS = 1024
# Login and logout bodies hold a few short strings: 64 KiB is ample, and keeps
# an anonymous client from having 8 MiB parsed on the event loop per request.
LOGIN_BODY_MAX = 64 * 1024
# How long a login held back only by checks of the same name and address
# still running waits for them to be decided (LoginThrottle.admit).
ADMIT_PATIENCE_SECONDS = 5.0
PREFIX = "bcrypt-sha256$"
ROLES = ("user", "admin")


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes (bcrypt 5 raises beyond that) and stops at
    # NUL: hashing first gives every password, however long, its full weight.
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def normalise_password(password: str) -> str:
    """The password as it is hashed: NFKC (NIST SP 800-63B 5.1.1.2), so that
    the same password typed as NFD ('cafe' + U+0301, as macOS and some
    keyboards give it) or as NFC ('caf' + U+00E9) is the same password."""
    return unicodedata.normalize("NFKC", password)


def password_chars(password: str) -> int:
    """The length ``auth.min_password_chars`` is checked on: that of the
    normalised text, what is hashed and guessed, so that a password's forms
    all pass or all fail it (NFD 'café...' has one code point more than NFC
    'café...': counted as given, a password one character short passed
    typed as NFD and failed typed as NFC)."""
    return len(normalise_password(password))


def hash_password(password: str, rounds: int) -> str:
    digest = bcrypt.hashpw(_prehash(normalise_password(password)), bcrypt.gensalt(rounds))
    return PREFIX + digest.decode("ascii")


class Match(enum.IntEnum):
    """How a password matched a stored hash: false when it did not."""

    NONE = 0
    NORMAL = 1  # its normalised form: the hash is of an NFKC text
    RAW = 2  # only as given: a hash made before passwords were normalised


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (:func:`match_password`)."""
    return bool(match_password(password, stored))


def match_password(password: str, stored: str) -> Match:
    """Whether (and how) ``password`` is the one ``stored`` was made from.

    Hashes made before passwords were normalised are of the text as given:
    a password whose normalised form differs and fails is tried as given
    too. That can only match such a hash: a hash made since is of an NFKC
    text, which a text that is not NFKC never equals. The unknown user's
    check (against the dummy hash, which fails) runs here too, and so takes
    the same second try as a known user's wrong password does."""
    if not stored.startswith(PREFIX):
        return Match.NONE
    digest = stored[len(PREFIX):].encode("ascii")
    normal = normalise_password(password)
    if bcrypt.checkpw(_prehash(normal), digest):
        return Match.NORMAL
    if normal != password and bcrypt.checkpw(_prehash(password), digest):
        return Match.RAW
    return Match.NONE


def hash_rounds(stored: str) -> int | None:
    """The bcrypt cost of a stored hash (``bcrypt-sha256$$2b$12$...``), or None."""
    fields = stored[len(PREFIX):].split("$") if stored.startswith(PREFIX) else []
    if len(fields) < 4 or not (fields[2].isascii() and fields[2].isdigit()):
        return None
    rounds = int(fields[2])
    return rounds if 4 <= rounds <= 31 else None


def valid_username(name: str) -> bool:
    return bool(USERNAME_RE.fullmatch(name))


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    role: str
    password_hash: str = field(repr=False)
    disabled: bool
    # The password matched a hash of another cost than ``auth.bcrypt_rounds``,
    # or only as given (a hash made before passwords were normalised): a
    # successful login hashes it anew (:meth:`Accounts.rehash_later`).
    stale: bool = field(default=False, repr=False)


class LastAdmin(Exception):
    """Disabling this user would leave no enabled admin."""


class AccountChanged(Exception):
    """The account's password was changed, or it was disabled, while a login
    of it was being checked: the login is refused."""


# How often the server looks for sessions revoked beside it (passwd,
# disable): one read of the revocations table, empty nearly always.
REVOKE_CHECK_SECONDS = 1.0
CAUSES = ("password_changed", "user_disabled")


def os_user() -> str | None:
    """The OS account running this process (its effective uid's name, not
    the environment's ``USER``: the audit trail's ``actor.user`` of a
    command-line change); ``uid:N`` for a uid without a name; None where
    there are no uids."""
    try:
        import pwd  # (POSIX)
    except ImportError:  # pragma: no cover - other systems
        return None
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # (a container's uid with no passwd entry)
        return f"uid:{uid}"


def note_account_change(conn: sqlite3.Connection, action: str, username: str,
                        details: dict[str, Any], *, actor_user: str | None,
                        actor_role: str = "cli") -> None:
    """Name a change of ``username``'s account in ``account_changes``, in the
    caller's transaction (that of the change): the server records it as a
    security event (:meth:`Accounts.record_account_changes`). Nothing of a
    password goes in."""
    if action not in USER_ACTIONS:
        raise ValueError(f"{action!r} is not an account change")
    conn.execute(
        "INSERT INTO account_changes (action, username, actor_user, actor_role,"
        " details, created_ts) VALUES (?, ?, ?, ?, ?, ?)",
        (action, username, actor_user, actor_role, json.dumps(details), time.time()))


def _change_recorder(row: tuple[Any, ...]) -> Callable[[Writer], bool]:
    """The job recording one row of ``account_changes``: its security event
    and the deletion of its row commit together, so each change is recorded
    once (a failure leaves the row for the next pass; a row another pass
    took meanwhile records nothing). The event's ``ts`` is the server's, as
    every event in the chain; ``details.changed_at`` is when the change
    committed."""
    rid, action, username, actor_user, actor_role, details, created = row
    try:
        extra = json.loads(details)
    except (TypeError, ValueError):
        extra = None
    draft = Draft(
        str(action), outcome="success", target={"type": "user", "id": str(username)},
        details={**(extra if isinstance(extra, dict) else {}),
                 "changed_at": format_ts(float(created))},
        source=Source(user=None if actor_user is None else str(actor_user),
                      role=str(actor_role)),
        event_id=new_id())  # (once: the event and its row's deletion are one commit)

    def record(w: Writer) -> bool:
        if not w.conn.execute("DELETE FROM account_changes WHERE id = ?", (rid,)).rowcount:
            return False
        w.append_security(draft, None)
        return True
    return record


def _revoker(
    session_id: str, cause: str, revoked_at: float,
    ended: Callable[[OpenSession, float], tuple[str, float] | None],
) -> Callable[[Writer], bool]:
    """The job ending one revoked session: its seal and the deletion of its
    revocation commit together (a failure leaves the row for next time). It
    ends as it did at ``revoked_at`` (when ``passwd`` or ``disable`` ran, the
    server up or down): a session past a deadline by then with that
    deadline's reason and time, any other revoked then, as a logout with the
    cause. (Judged at the time of the check instead, a session revoked while
    the server was down, and idle by the next start, lost its cause.)"""
    def revoke(w: Writer) -> bool:
        w.conn.execute("DELETE FROM revocations WHERE session_id = ?", (session_id,))
        s = w.sessions.get(session_id)
        if s is None:
            return False  # ended meanwhile (logout, expiry)
        source = Source(user=s.user, role=s.role)
        at = min(revoked_at, w.clock())
        past = ended(s, at)
        if past is not None:
            reason, when = past
            w.seal(session_id, reason,
                   Draft("session.end", source=source, details={"reason": reason}), at=when)
        else:
            w.seal(session_id, "logout", Draft("session.end", source=source,
                                               details={"reason": "logout", "cause": cause}),
                   at=at)
        return True
    return revoke


MAX_WAITING_PER_SLOT = 32


class LoginBusy(Exception):
    """Too many password checks are waiting for a slot: refused at once."""


class Accounts:
    """Users in the spool database; password checks on worker threads."""

    def __init__(self, engine: AuditEngine, rounds: int, concurrency: int = 2,
                 max_waiting: int | None = None, *, record_changes: bool = False) -> None:
        self.engine = engine
        self.rounds = rounds
        self.record_changes = record_changes  # audit.record_account_changes
        self._slots = asyncio.Semaphore(concurrency)
        # Password checks waiting for a slot: past this, a login is refused at
        # once (429) rather than queued for seconds behind a flood from many
        # addresses (each within its own throttle budget).
        self.max_waiting = MAX_WAITING_PER_SLOT * concurrency if max_waiting is None \
            else max_waiting
        self._waiting = 0
        self._dummy: str | None = None
        self._dummy_lock = asyncio.Lock()
        self._revoking = asyncio.Lock()
        # Revoked sessions that cannot be ended (the spool cannot commit) are
        # tried again twice a second: said once a minute, not once a session.
        self._revoke_log = LogThrottle()
        self._record_log = LogThrottle()  # (changes of accounts, likewise)
        # Hashes renewed at login (rehash_later): the users being renewed
        # now, the tasks doing it, and each user's last renewal as (the hash
        # checked, its renewal), written by the writer thread in the renewal's
        # transaction and read there by unchanged().
        self._rehashing: set[str] = set()
        self._rehash_tasks: set[asyncio.Task[bool]] = set()
        self._rehashed: dict[str, tuple[str, str]] = {}
        self._rehash_log = LogThrottle()

    async def _dummy_hash(self) -> str:
        """A hash to check unknown users against, made once (in a bcrypt slot);
        :meth:`prepare` makes it at start, so that the first unknown user's
        login takes no longer than the others. Its cost is the users' own
        (:meth:`_users_rounds`), not ``bcrypt_rounds``: a hash keeps the cost
        it was made with, and after a change of the setting an unknown name
        took twice (or half) as long per round changed as a user's."""
        async with self._dummy_lock:
            if self._dummy is None:
                rounds = await self._users_rounds()
                async with self._slots:
                    self._dummy = await asyncio.to_thread(hash_password, "dummy", rounds)
            return self._dummy

    async def _users_rounds(self) -> int:
        """The cost most users' password hashes have; ``bcrypt_rounds`` if none."""
        rows = await self.engine.spool.read(
            lambda c: c.execute("SELECT password_hash FROM users").fetchall())
        costs = Counter(r for (stored,) in rows if (r := hash_rounds(stored)) is not None)
        return costs.most_common(1)[0][0] if costs else self.rounds

    async def prepare(self) -> None:
        await self._dummy_hash()

    async def _hash_check(self, password: str, stored: str) -> Match:
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise LoginBusy()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.to_thread(match_password, password, stored)
        finally:
            self._slots.release()

    async def verify(self, username: str, password: str) -> Account | None:
        """The account when the password is right; same cost for unknown users.
        A disabled account is returned too (the caller refuses it)."""
        row = None
        if valid_username(username):
            row = await self.engine.spool.read(
                lambda c: c.execute(
                    "SELECT username, password_hash, role, disabled FROM users"
                    " WHERE username = ?",
                    (username,),
                ).fetchone()
            )
        if row is None:
            await self._hash_check(password, await self._dummy_hash())
            return None
        match = await self._hash_check(password, row[1])
        if not match:
            return None
        stale = match == Match.RAW or hash_rounds(row[1]) != self.rounds
        return Account(row[0], row[2], row[1], bool(row[3]), stale)

    def rehash_later(self, account: Account, password: str) -> None:
        """After a successful login of a :attr:`Account.stale` hash: hash the
        password anew (:meth:`rehash`) in a task of its own, so that the
        login's answer does not wait for it. One at a time per user."""
        user = account.user
        if user in self._rehashing:
            return
        self._rehashing.add(user)
        task = asyncio.create_task(self.rehash(account, password), name="rehash")
        self._rehash_tasks.add(task)

        def done(t: asyncio.Task[bool]) -> None:
            self._rehash_tasks.discard(t)
            self._rehashing.discard(user)
        task.add_done_callback(done)

    async def rehash(self, account: Account, password: str) -> bool:
        """Store a hash of ``password`` (normalised) at ``auth.bcrypt_rounds``
        for ``account``, whose password it is: True when stored. Made in a
        bcrypt slot, only if one is free now (else left for a later login:
        logins do not wait behind renewals); stored only if the hash is still the one the password
        was checked against (compare-and-set in one write transaction: a
        ``passwd`` or another renewal meanwhile wins).

        Not a change of password: no revocation, no ``user.password_change``,
        no event; the sessions of the user stay open, and a login checked
        against the hash before goes through (:meth:`unchanged`). A failure
        (a full or failing spool) is logged, at most once a minute, and the
        next login tries again."""
        user, old = account.user, account.password_hash
        rehashed = self._rehashed
        if self._slots.locked():
            # Every slot busy, or logins waiting for one: a renewal queued
            # with them took the next free slot ahead of the logins behind
            # it (a burst after a change of the cost: more of them 429), and
            # held the plaintext meanwhile. Left for a later login.
            return False
        try:
            async with self._slots:  # (free: taken at once, ahead of no login)
                new = await asyncio.to_thread(hash_password, password, self.rounds)

            def store(w: Writer) -> bool:
                if not w.conn.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                    (new, user, old),
                ).rowcount:
                    return False  # changed meanwhile: that change stands
                rehashed[user] = (old, new)
                return True

            stored: bool = await self.engine.spool.submit(store)
        except Exception as exc:
            left_out = self._rehash_log.allow("rehash")
            if left_out is not None:
                log.warning("could not store a new hash of %s's password (of bcrypt cost %s,"
                            " now %d; tried again at a later login): %s%s", user,
                            hash_rounds(old), self.rounds, str(exc) or type(exc).__name__,
                            more(left_out))
            return False
        if stored:
            log.info("hashed %s's password anew at bcrypt cost %d (was %s%s)", user,
                     self.rounds, hash_rounds(old),
                     ", of the text as given" if account.stale and hash_rounds(old)
                     == self.rounds else "")
        return stored

    async def stop_rehashing(self) -> None:
        """Cancel the renewals still running (at shutdown): the next login
        of each user tries again."""
        tasks = list(self._rehash_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def end_revoked_sessions(self) -> int:
        """End the sessions that the command line revoked beside the running
        server (``passwd``, ``disable``: :func:`change_user_sync` names the
        user's open sessions in ``revocations``). Each is sealed as
        ``logout`` with ``details.cause`` ``password_changed`` or
        ``user_disabled``, in one group commit; its token then gets 401
        ``session_ended``. Returns how many sessions it ended.
        """
        spool = self.engine.spool
        if spool.failure is not None:
            return 0  # the spool reports itself; the rows wait for a restart
        async with self._revoking:  # one pass at a time: each row is ended once
            rows = await spool.read(lambda c: c.execute(
                "SELECT session_id, cause, created_ts FROM revocations"
                " ORDER BY created_ts").fetchall())
            if not rows:
                return 0
            futs = [spool.submit_nowait(_revoker(str(sid), cause if cause in CAUSES
                                                 else "revoked", float(at), self.engine.ended),
                                        needs_space=False)
                    for sid, cause, at in rows]
            results = await asyncio.gather(*futs, return_exceptions=True)
        ended = 0
        failed: list[tuple[str, BaseException]] = []
        for (sid, cause, _), result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                failed.append((str(sid), result))
            elif result:
                ended += 1
                # (A cause this release does not know is any text the spool
                # file holds: the log says what the trail does.)
                said = cause if cause in CAUSES else "revoked"
                log.info("ended session %s: %s", sid, said.replace("_", " "))
        if failed:
            left_out = self._revoke_log.allow("revoke")
            if left_out is not None:
                sid, exc = failed[0]
                log.error("%d revoked sessions not ended yet (tried again within a second;"
                          " %s first: %s)%s", len(failed), sid, exc, more(left_out))
        # (A pass that ends every one does not start the minute over: passes
        # failing and passing by turns, on a nearly full disk, logged a line each.)
        return ended

    async def record_account_changes(self) -> int:
        """Record the changes of accounts named in ``account_changes`` (by
        the command line, beside the server or while it was down) as
        security events, oldest first; returns how many. Each is recorded
        once: its event and the deletion of its row are one transaction.
        Taken by a full spool: the change happened."""
        spool = self.engine.spool
        if spool.failure is not None:
            return 0  # the spool reports itself; the rows wait for a restart
        rows = await spool.read(lambda c: c.execute(
            "SELECT id, action, username, actor_user, actor_role, details,"
            " created_ts FROM account_changes ORDER BY id").fetchall())
        if not rows:
            return 0
        futs = []
        failed: list[object] = []
        for row in rows:
            try:
                job = _change_recorder(tuple(row))
            except (ValueError, TypeError, OverflowError, OSError) as exc:
                # A damaged row is left, and said (named, not quoted): the
                # others go on. (Raised here, it stopped the pass at each
                # try, and every change after it waited for good.)
                failed.append(f"row {row[0]}: its created_ts is not a time"
                              f" ({type(exc).__name__})")
                continue
            futs.append(spool.submit_nowait(job, needs_space=False))
        results = await asyncio.gather(*futs, return_exceptions=True)
        recorded = sum(1 for r in results if r is True)
        failed += [r for r in results if isinstance(r, BaseException)]
        if failed:
            left_out = self._record_log.allow("record")
            if left_out is not None:
                log.error("%d changes of accounts not recorded yet (tried again within a"
                          " second; first: %s)%s", len(failed), failed[0], more(left_out))
        # (Nor here: see end_revoked_sessions.)
        return recorded

    def unchanged(self, account: Account) -> Callable[[sqlite3.Connection], None]:
        """A check for :meth:`AuditEngine.start_session`: the account is still
        as its password was checked (no ``passwd`` or ``disable`` meanwhile:
        the check of a login takes a bcrypt hash's time). A hash this server
        renewed meanwhile (:meth:`rehash`, another login's) is the same
        password: the login goes on."""
        rehashed = self._rehashed

        def check(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT password_hash, disabled FROM users WHERE username = ?",
                               (account.user,)).fetchone()
            if row is None or row[1]:
                raise AccountChanged(account.user)
            if hmac.compare_digest(row[0], account.password_hash):
                return
            renewed = rehashed.get(account.user)
            if renewed is None or not (hmac.compare_digest(renewed[0], account.password_hash)
                                       and hmac.compare_digest(renewed[1], row[0])):
                raise AccountChanged(account.user)
        return check

    async def create(self, username: str, password: str, role: str) -> None:
        stored = await asyncio.to_thread(hash_password, password, self.rounds)
        now = format_ts(time.time())

        def insert(w: Any) -> None:
            w.conn.execute(
                "INSERT INTO users (username, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
                (username, stored, role, now),
            )

        await self.engine.spool.submit(insert, needs_space=False)

    async def create_first_admin(self, username: str, password: str) -> bool:
        """Add ``username`` as an admin unless a user has the admin role by
        then (False). A user whose name is ``username`` or differs from it
        only in case raises :class:`UserExists`. The checks and the insert
        are one transaction: ``adduser admin --admin`` beside a first start
        had, between the start's check and its insert, the insert fail
        (the start stopped on "UNIQUE constraint failed"), and ``adduser
        Admin --admin`` left two admins whose names read alike."""
        stored = await asyncio.to_thread(hash_password, password, self.rounds)
        now = format_ts(time.time())

        def insert(w: Any) -> bool:
            c = w.conn
            if c.execute("SELECT 1 FROM users WHERE role = 'admin' LIMIT 1").fetchone():
                return False
            row = c.execute("SELECT username FROM users WHERE lower(username) = lower(?)"
                            " ORDER BY username = ? DESC LIMIT 1",
                            (username, username)).fetchone()
            if row is not None:
                raise UserExists(row[0])
            c.execute("INSERT INTO users (username, password_hash, role, created_at)"
                      " VALUES (?, ?, 'admin', ?)", (username, stored, now))
            # Recorded as the command line's additions are (user.create,
            # under audit.record_account_changes), by the OS account that ran
            # the server: an admin made at a first start was not in the trail.
            note_account_change(c, "user.create", username,
                                {"role": "admin", "first_start": True},
                                actor_user=os_user(), actor_role="server")
            return True

        made: bool = await self.engine.spool.submit(insert, needs_space=False)
        return made

    async def alike(self, username: str) -> str | None:
        """The user of that name, or of one that differs only in case (which
        :func:`add_user_sync` refuses to add beside it), or None."""
        row = await self.engine.spool.read(
            lambda c: c.execute("SELECT username FROM users WHERE lower(username) = lower(?)"
                                " ORDER BY username = ? DESC LIMIT 1",
                                (username, username)).fetchone()
        )
        return str(row[0]) if row is not None else None

    async def has_admin(self) -> bool:
        row = await self.engine.spool.read(
            lambda c: c.execute("SELECT 1 FROM users WHERE role = 'admin' LIMIT 1").fetchone()
        )
        return row is not None


class UserExists(Exception):
    """A user of that name, or of one that differs only in case, exists."""

    def __init__(self, existing: str) -> None:
        super().__init__(existing)
        self.existing = existing


def add_user_sync(conn: sqlite3.Connection, username: str, password: str, role: str,
                  rounds: int) -> None:
    """For the CLI: works on the spool file while the server runs.

    A name that differs from an existing one only in case (``Admin`` beside
    ``admin``) is refused like the same name: the two would read alike in
    the audit trail. Logins still match names exactly.

    The check and the insert are one write transaction, the password hashed
    before it: ``adduser Bob`` and ``adduser bob`` run at once each found
    no alike name while the other hashed (a quarter of a second at the
    default cost, with no lock held) and both were added. The insert is
    named in ``account_changes`` in the same transaction, for the server to
    record as ``user.create`` (:func:`note_account_change`)."""
    stored = hash_password(password, rounds)
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT username FROM users WHERE lower(username) = lower(?)",
                           (username,)).fetchone()
        if row is not None:
            raise UserExists(row[0])
        conn.execute(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
            (username, stored, role, format_ts(time.time())),
        )
        note_account_change(conn, "user.create", username, {"role": role},
                            actor_user=os_user())
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def change_user_sync(conn: sqlite3.Connection, username: str, *,
                     password_hash: str | None = None, disabled: bool | None = None) -> bool:
    """For the CLI, beside the running server: set a user's password hash
    and/or disabled flag; False if there is no such user. Disabling the last
    enabled admin raises :class:`LastAdmin` (and changes nothing).

    A new password or disabling also revokes the user's open sessions: in
    the same transaction, each session open in the file is named in
    ``revocations``, which the server ends within about a second
    (:meth:`Accounts.end_revoked_sessions`; at its start, if it is not
    running). A login the server commits after this transaction sees the
    change and is refused (:meth:`Accounts.unchanged`): no clock is compared.
    The change is named in ``account_changes`` in the same transaction, for
    the server to record (``user.password_change``, ``user.disable``,
    ``user.enable``; :func:`note_account_change`).
    """
    sets: list[str] = []
    params: list[Any] = []
    if password_hash is not None:
        sets.append("password_hash = ?")
        params.append(password_hash)
    if disabled is not None:
        sets.append("disabled = ?")
        params.append(int(disabled))
    cause = ("user_disabled" if disabled else
             "password_changed" if password_hash is not None else None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if disabled and conn.execute(
            "SELECT 1 FROM users WHERE username = ? AND role = 'admin'", (username,)
        ).fetchone() and not conn.execute(
            "SELECT 1 FROM users WHERE role = 'admin' AND NOT disabled AND username != ?",
            (username,),
        ).fetchone():
            raise LastAdmin(username)
        was = conn.execute("SELECT disabled FROM users WHERE username = ?",
                           (username,)).fetchone()
        changed = conn.execute(f"UPDATE users SET {', '.join(sets)} WHERE username = ?",
                               (*params, username)).rowcount
        revoked = 0
        if changed and cause is not None:
            # A session named already keeps the first change's cause, as its
            # time: it ends as a pass run between the two would have ended it.
            revoked = conn.execute(
                "INSERT INTO revocations (session_id, cause, created_ts)"
                " SELECT session_id, ?, ? FROM sessions WHERE user = ? AND state = 'open'"
                " ON CONFLICT (session_id) DO NOTHING",
                (cause, time.time(), username)).rowcount
        if changed:
            by = os_user()
            if password_hash is not None:
                note_account_change(conn, "user.password_change", username, {
                    "sessions_revoked": revoked if cause == "password_changed" else 0},
                    actor_user=by)
            if disabled is not None and was is not None and bool(was[0]) != disabled:
                # (disable of a disabled user, enable of an enabled one: no change)
                note_account_change(conn, "user.disable" if disabled else "user.enable",
                                    username, {"sessions_revoked": revoked} if disabled
                                    else {}, actor_user=by)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return bool(changed)


class LoginThrottle:
    """Failed logins per (username, client IP) and per client IP, in a window.

    Attempts still being checked (bcrypt takes a while) count as failures
    until they are decided: otherwise a thousand attempts sent at once would
    all pass the check before the first failure is counted, and each would
    cost a password hash.

    An IPv6 client counts by its /64 (:meth:`client_key`): one host is
    usually given a whole /64, and each of its addresses its own budget
    would make the throttle moot.

    Keys are kept in the order of their last failure: those whose last
    failure is out of the window go from the front at every attempt
    (:meth:`_forget_expired`), so memory follows the failures of the last
    window, not every (username, client IP) ever tried up to ``MAX_KEYS``.
    """

    MAX_KEYS = 100_000

    # The key a client address counts under: IPv4 as it is, IPv6 by /64.
    client_key = staticmethod(client_key)

    def __init__(self, max_failures: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._fails: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._checking: Counter[tuple[str, str]] = Counter()
        # Set (and replaced) each time a check ends: what admit() waits on.
        self._settled = asyncio.Event()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def _forget_expired(self, now: float) -> None:
        """Drop the keys whose last failure is out of the window: they block
        nothing. Only failures move a key to the end, with a time that
        never goes back, so they are the ones at the front. Without this a
        key was dropped only when its own pair came back, or by ``MAX_KEYS``:
        every pair ever tried stayed (one failed login from each of 50,000
        addresses held 100,000 keys, some 120 MB, long after the window)."""
        fails = self._fails
        cutoff = now - self.window
        while fails:
            key, q = next(iter(fails.items()))
            if q and q[-1] > cutoff:
                return
            del fails[key]

    def retry_after(self, username: str, ip: str) -> int | None:
        """Seconds until another attempt is allowed, or None when allowed now."""
        return self._blocked(username, ip)[0]

    def _blocked(self, username: str, ip: str) -> tuple[int | None, bool]:
        """:meth:`retry_after`, and whether only checks still running hold the
        attempt back (the failures alone would let it through)."""
        now = self.clock()
        self._forget_expired(now)
        waits = []
        failures_block = False
        for key, limit in (((username, ip), self.max_failures),
                           (("", ip), 4 * self.max_failures)):
            q = self._recent(key, now)
            if len(q) >= limit:
                waits.append(q[len(q) - limit] + self.window - now)
                failures_block = True
            elif len(q) + self._checking[key] >= limit:
                waits.append(1.0)  # decided within about a second
        if not waits:
            return None, False
        # Rounded up: a client back after Retry-After seconds is let in (by
        # int(wait + 0.999), 299.0005 s said 299, and then 429 again).
        return max(1, math.ceil(max(waits))), not failures_block

    async def admit(self, username: str, ip: str,
                    patience: float = ADMIT_PATIENCE_SECONDS) -> int | None:
        """None when the attempt may go on; else its ``Retry-After``.

        Checks still running count as failures until they are decided, so
        that a burst of parallel guesses cannot all be checked before the
        first failure counts. An attempt held back by them alone waits for
        them (up to ``patience`` seconds) and is decided on what they were:
        parallel correct logins of one user (a client opening several
        sessions at once) go through instead of getting 429.
        """
        deadline = time.monotonic() + patience
        while True:
            wait, pending_only = self._blocked(username, ip)
            left = deadline - time.monotonic()
            if wait is None or not pending_only or left <= 0:
                return wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), left)

    @contextlib.contextmanager
    def checking(self, username: str, ip: str) -> Iterator[None]:
        """Count an attempt as pending while its password is checked."""
        keys = ((username, ip), ("", ip))
        for key in keys:
            self._checking[key] += 1
        try:
            yield
        finally:
            for key in keys:
                self._checking[key] -= 1
                if self._checking[key] <= 0:
                    del self._checking[key]
            settled, self._settled = self._settled, asyncio.Event()
            settled.set()

    def failed(self, username: str, ip: str) -> None:
        now = self.clock()
        self._forget_expired(now)
        for key in ((username, ip), ("", ip)):
            q = self._fails.setdefault(key, deque())
            q.append(now)
            self._fails.move_to_end(key)
            if len(q) > 8 * self.max_failures:
                q.popleft()
        while len(self._fails) > self.MAX_KEYS:
            self._fails.popitem(last=False)

    def succeeded(self, username: str, ip: str) -> None:
        self._fails.pop((username, ip), None)


THROTTLE = web.AppKey("login_throttle", LoginThrottle)


async def _credentials(request: web.Request) -> tuple[str, str]:
    if request.content_length is not None and request.content_length > LOGIN_BODY_MAX:
        raise too_large()  # before reading a byte: anybody may post here
    ctype = request.content_type
    data: dict[str, Any]
    if ctype == "application/x-www-form-urlencoded":
        raw = await read_body(request, LOGIN_BODY_MAX)  # chunked or gzip: the limit holds
        charset = _charset(request.charset or "utf-8")
        try:
            # %XX escapes are bytes of the same charset as the rest (they were
            # read as UTF-8, with U+FFFD for any other byte: a Latin-1 form's
            # right password, escaped, got 401).
            pairs = urllib.parse.parse_qsl(raw.decode(charset), keep_blank_values=True,
                                           max_num_fields=16, encoding=charset,
                                           errors="strict")
        except (ValueError, LookupError):  # bytes not in the charset, too many fields
            raise bad_request("the form body is malformed") from None
        data = _once(pairs)
        if not data.keys() & {"username", "password"} and raw.lstrip()[:1] in (b"{", b"["):
            # curl -d '{"username": ...}' without -H 'Content-Type: ...': a
            # form to the server, read as the login fields it is not.
            raise bad_request("the body is JSON but its Content-Type says a form:"
                              " send it as application/json")
    elif ctype == "multipart/form-data":
        if request.content_length is None or "Content-Encoding" in request.headers:
            # aiohttp reads a multipart body itself: its size must be known first.
            raise bad_request("a multipart login body needs a Content-Length and no"
                              " Content-Encoding")
        try:
            await send_continue(request)
            async with body_deadline(request):
                fields = await _multipart_fields(request)
        except (ValueError, LookupError, RuntimeError, HttpProcessingError):
            # A multipart body without or with a wrong boundary, bytes that are not
            # in the (possibly unknown) charset, a part with an unknown
            # Content-Transfer-Encoding (RuntimeError), a part's header line
            # that is none (HttpProcessingError; so is every body with a
            # ``_charset_`` field, RFC 7578 4.6, which aiohttp 3.14 reads
            # into the next part's headers): aiohttp raises these, not 400.
            raise bad_request("the form body is malformed") from None
        data = _once(fields)
    else:
        data = await read_json(request, limit=LOGIN_BODY_MAX)
        if not isinstance(data, dict):
            raise bad_request("the body must be an object with username and password")
    username, password = data.get("username"), data.get("password")
    grant = data.get("grant_type")
    if grant is not None and grant != "password":
        raise bad_request("grant_type must be 'password'")
    if not isinstance(username, str) or not isinstance(password, str):
        raise bad_request("username and password are required strings")
    if not username or not password:
        raise bad_request("username and password must not be empty")
    # As given, not normalised (see MAX_PASSWORD_CHARS); normalised when checked.
    if len(username) > 256 or len(password) > MAX_PASSWORD_CHARS:
        raise bad_request("username or password too long")
    if not (is_utf8(username) and is_utf8(password)):
        # A form in a charset such as UTF-7 can decode to lone surrogates,
        # which bcrypt's prehash cannot encode (a 500); JSON refuses them already.
        raise bad_request("username and password must be valid Unicode")
    return username, password


# Python's text codecs that are no character sets: the escape codecs read
# ``\\x61`` or ``\\u0061`` in ASCII text as another character, punycode and
# idna decode labels, charmap and undefined are machinery. (Bytes-to-bytes
# codecs such as base64 are no text encodings: decoding raises LookupError.)
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna",
                           "charmap", "undefined"})


def _charset(name: str) -> str:
    """``name``, a form's or a part's charset, if it is a character set
    Python knows; else 400 ``invalid_request`` (as an unknown one is). A
    codec that is no character set decoded ``username=\\x61lice`` as
    ``alice``: a filter in front of the server, and the client, saw another
    name than the one checked and recorded."""
    try:
        known = codecs.lookup(name).name not in _NOT_CHARSETS
    except (LookupError, ValueError):  # (ValueError: a NUL in the name)
        known = False
    if not known:
        raise bad_request("the form body is malformed (its charset is unknown)")
    return name


async def _multipart_fields(request: web.Request) -> list[tuple[str, str]]:
    """The text fields of a multipart login body, as ``request.post()`` reads
    them (at most ``client_max_fields`` parts, files and parts that are no
    text ignored, each part's Content-Transfer-Encoding undone), each decoded
    in its charset (its Content-Type's, else UTF-8: aiohttp misreads a body
    with a ``_charset_`` field, refused above), which must be one
    (:func:`_charset`): ``post()`` took any Python codec. (The body's size
    is bounded by its Content-Length, which the caller checked; a form-data
    part's Content-Encoding is not undone.)"""
    reader = await request.multipart()
    fields: list[tuple[str, str]] = []
    parts = 0
    while (part := await reader.next()) is not None:
        parts += 1
        if 0 < request.client_max_fields < parts:
            raise too_large()
        if not isinstance(part, BodyPartReader):
            raise ValueError("a nested multipart body")
        if part.name is None:
            raise ValueError("a part without a name")
        if part.filename:
            await part.release()  # a file: not a login's
            continue
        raw = bytearray()
        while chunk := await part.read_chunk():
            raw += chunk
        value = bytes(part.decode(raw))  # (a form-data part: nothing to decompress)
        ctype = part.headers.get(hdrs.CONTENT_TYPE)
        if ctype is None or ctype.startswith("text/"):
            fields.append((part.name, value.decode(_charset(part.get_charset("utf-8")))))
    return fields


def _once(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """A login form's fields, each it reads given at most once (RFC 6749, 3.1: the
    token endpoint's parameters "MUST NOT be included more than once"; which
    of two usernames counts differs from one reader to the next, a proxy
    or filter in front of the server included)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in _LOGIN_FIELDS and key in seen:
                raise bad_request(f"the form field {key} is given more than once")
            seen.add(key)
    return data


# The fields a login reads: another field, ignored, may come as often as it likes.
_LOGIN_FIELDS = frozenset({"username", "password", "grant_type"})


def is_utf8(text: str) -> bool:
    """False for a string with lone surrogates: bytes that were not UTF-8
    (from a header, the environment or a pipe, decoded with
    ``surrogateescape``) or a charset such as UTF-7. It cannot be hashed,
    stored or sent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def login(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    username, password = await _credentials(request)
    throttle = request.app[THROTTLE]
    ip = throttle.client_key(client_ip(request))
    src = anonymous_source(request)
    attempted = {"username": username[:64]}
    wait = await throttle.admit(username, ip)
    if wait is not None:
        await engine.record_security(
            Draft("auth.login_throttled", outcome="denied",
                  details={**attempted, "reason": "too_many_attempts", "retry_after": wait},
                  source=src)
        )
        raise ApiError(429, "too_many_attempts", "too many failed logins; try again later",
                       {"Retry-After": str(wait)})
    accounts = request.app[ACCOUNTS]
    try:
        with throttle.checking(username, ip):
            found = await accounts.verify(username, password)
    except LoginBusy:
        await engine.record_security(
            Draft("auth.login_throttled", outcome="denied",
                  details={**attempted, "reason": "server_busy", "retry_after": 1},
                  source=src)
        )
        raise ApiError(429, "too_many_attempts", "too many logins at once; try again in a"
                       " second", {"Retry-After": "1"}) from None
    # A disabled account gets the answer of a wrong password; the record says why.
    refused = ("invalid_credentials" if found is None
               else "user_disabled" if found.disabled else None)
    session = None
    config = request.app[CONFIG]
    if found is not None and refused is None:
        try:
            session = await engine.start_session(found.user, found.role, src,
                                                 config.auth.token_ttl_seconds,
                                                 check=accounts.unchanged(found))
        except AccountChanged:
            refused = "account_changed"
    if session is None or found is None:
        throttle.failed(username, ip)
        await engine.record_security(
            Draft("auth.login_failed", outcome="denied",
                  details={**attempted, "reason": refused}, source=src)
        )
        raise ApiError(401, "invalid_credentials", "invalid username or password")
    throttle.succeeded(username, ip)
    token = request.app[TOKENS].issue(found.user, session.session_id, found.role,
                                      session.expires_at)
    if found.stale:
        # Hashed anew at auth.bcrypt_rounds (and normalised) beside the
        # answer, which does not wait for it: not a change of password.
        accounts.rehash_later(found, password)
    return json_response({
        "access_token": token,
        "token_type": "bearer",
        # The token lives token_ttl_seconds, and up to a second more (its
        # exp is a whole second, rounded up); less only after a slow start.
        "expires_in": max(0, min(config.auth.token_ttl_seconds,
                                 math.ceil(session.expires_at - time.time()))),
        "session_id": session.session_id,
    })


def _logout_body(body: Any) -> dict[str, Any] | None:
    """The optional body of ``POST /logout``: nothing, ``null`` or an object
    with at most ``session_id``, a string (``null`` is the same as none)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise bad_request("the body must be an object")
    unknown = set(body) - {"session_id"}
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    if not isinstance(body.get("session_id", ""), str | None):
        raise bad_request("session_id must be a string")
    return body


async def logout(request: web.Request) -> web.Response:
    ctx = request[CTX]
    engine = request.app[ENGINE]
    body = None
    if request.can_read_body:
        # A refused body is an attempt too: recorded, and the session stays open.
        body = await audited_input(request, Draft("session.end", source=ctx.source()),
                                   _logout_body, allow_empty=True, limit=LOGIN_BODY_MAX)
    claimed = body.get("session_id") if body is not None else None
    if claimed is not None and not hmac.compare_digest(
        claimed.encode(), ctx.session_id.encode()
    ):
        await engine.record_security(
            Draft("auth.session_mismatch", outcome="denied",
                  details={"reason": "logout_session_id", "method": request.method,
                           "path": request.path}, source=ctx.source()),
            ctx.session_id,
        )
        raise ApiError(403, "session_mismatch", "session_id does not match the token")
    count = await engine.end_session(ctx.session_id, ctx.source())
    return json_response({
        "message": "Successfully logged out",
        "session_id": ctx.session_id,
        "event_count": count,
    })


async def me(request: web.Request) -> web.Response:
    ctx = request[CTX]
    return json_response({
        "user": ctx.user,
        "role": ctx.role,
        "session_id": ctx.session_id,
        "session_start_time": format_ts(ctx.session_start),
        "expires_at": format_ts(ctx.expires_at),
    })
