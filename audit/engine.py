"""The audit engine: spool + sessions + reaper + flusher behind one small API.

The server (handlers, middleware, CLI) talks only to :class:`AuditEngine`;
it is usable and tested without HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, replace
from typing import Any

from sinks.base import Sink

from . import queries
from .config import Config, open_window, sink_identity, sink_where
from .events import Draft, Source, format_ts
from .flusher import Flusher
from .logthrottle import FailingPass, LogThrottle, more
from .metrics import Stats
from .ratelimit import FloodGuard
from .spool import JOB_BYTES, Spool, SpoolClosed, SpoolFull, SpoolUnavailable
from .store import (
    INTERRUPTED,
    ActionError,
    Append,
    Change,
    Limits,
    OpenSession,
    Read,
    SessionNotOpen,
    Writer,
    activity_time,
)

log = logging.getLogger("session_audit.engine")

# The spool's meta rows of actions under way whose event is recorded only
# once they end, but which act beyond the process before that: a chat sends
# the document to the AI provider and waits seconds for its answer. A process
# killed meanwhile (SIGKILL, the OOM killer, a power cut) left no trace that
# the document had left the machine. Each such action is noted here, durably,
# before it starts (AuditEngine.begin); its event deletes the note in the
# same transaction (record_done); a start finds those left and records each,
# outcome failure, reason "interrupted" (record_interrupted).
BEGUN = "begun:"

REAPER_INTERVAL = 1.0
# A background task (flusher, reaper) that crashed is started again after
# this pause, doubling with each crash up to TASK_RESTART_MAX_SECONDS: a
# crash (a bug, an unforeseen error) must not stop flushing or reaping for
# the rest of the process, while /healthz, which supervisors watch, says 200.
TASK_RESTART_SECONDS = 1.0
TASK_RESTART_MAX_SECONDS = 60.0
# How often the flood guard's counts become summary security events.
SUMMARY_INTERVAL = 10.0
# How often the reaper drops what it remembers of sessions that have ended
# or been cut since (_uncut_since), in seconds.
UNCUT_PRUNE_INTERVAL = 60.0
# Open sessions the reaper looks at between two turns of the event loop
# (about 2 ms of work at 0.5 us a session).
REAP_CHUNK = 4096
# Security events of callers without a valid session: the ones a flood from
# the network produces, and the only ones the flood guard may count instead
# of recording (a logged-in caller's are all recorded, with its session).
UNAUTHENTICATED = frozenset({
    "auth.invalid_token", "auth.token_expired", "auth.session_ended",
    "auth.login_failed", "auth.login_throttled",
})


def _username(draft: Draft) -> str | None:
    name = draft.details.get("username")
    return name[:128] if isinstance(name, str) else None


def _reason(draft: Draft) -> str | None:
    reason = draft.details.get("reason")
    return reason[:64] if isinstance(reason, str) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class AuditEngine:
    def __init__(
        self,
        config: Config,
        sink: Sink,
        key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        reaper_interval: float = REAPER_INTERVAL,
        beside_server: bool = False,
    ) -> None:
        """``beside_server``: a command (drain, retry-dead) that may run while
        a server serves the same spool; it leaves the server's sessions
        alone (no cut to its own part limits at open: the server's cache of
        them would go stale)."""
        a = config.audit
        self.config = config
        self.sink = sink
        self.clock = clock
        self.stats = Stats()
        self.spool = Spool(
            config.spool_path,
            key,
            limits=Limits(a.part_max_events, a.part_max_bytes),
            synchronous=a.synchronous,
            max_bytes=a.spool_max_bytes,
            on_full=a.on_spool_full,
            clock=clock,
            stats=self.stats,
            cut_to_limits=not beside_server,
        )
        self.flusher = Flusher(
            self.spool,
            sink,
            config.flush,
            keep_stored_seconds=a.keep_stored_seconds,
            remember=(sink_identity(config), open_window(config)),
            stats=self.stats,
            clock=monotonic,
        )
        self.reaper_interval = reaper_interval
        self.before_reap: list[Callable[[], Awaitable[Any]]] = []
        self.flood: FloodGuard | None = (
            FloodGuard(a.security_events_per_ip_per_second, a.security_events_per_ip_burst,
                       clock=monotonic)
            if a.security_events_per_ip_per_second > 0 else None
        )
        self._summarised_at = monotonic()
        self.monotonic = monotonic
        # session id -> (cut_seq, monotonic time by which its uncut events had
        # begun): their age for the time checkpoint, whatever the wall clock
        # does meanwhile (reap_once).
        self._uncut_since: dict[str, tuple[int, float]] = {}
        self._uncut_pruned = monotonic()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._inflight: set[asyncio.Future[Any]] = set()
        # Background tasks that crashed and wait for their restart: name -> what.
        self._failed: dict[str, str] = {}
        self.task_crashes: dict[str, int] = {}  # name -> crashes since start
        self._factories: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._restarts: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        self._reaper_log = LogThrottle()
        self._hook_logs: dict[str, FailingPass] = {}  # before_reap hook -> its log
        self._fast_log = LogThrottle()  # events lost under ack = "fast"
        self.beside_server = beside_server

    # -- lifecycle ---------------------------------------------------------

    async def open(self, *, background: bool = True, interrupted: bool = True) -> None:
        """Open the spool; with ``background``, start the flusher and reaper.
        With ``interrupted``, record what an earlier process left under way
        (:meth:`record_interrupted`); the server does so itself, once the
        security chain caught up with the sink's (meanwhile the sessions of
        those actions count them as activity: the reaper runs)."""
        await self.spool.open()
        self.spool.on_commit = self.flusher.wake
        if interrupted:
            await self.record_interrupted()
        elif not self.beside_server:
            # The caller records them later (the server, once the sink was
            # tried): the reaper, started below, meanwhile judges the idle
            # deadlines with the chats begun counted, as that record will.
            self._count_begun(await self._begun(say=False))
        if background:
            self._start("flusher", self.flusher.run)
            self._start("reaper", self._reaper)

    @property
    def task_failure(self) -> str | None:
        """The background tasks crashed and not yet started again, or None."""
        if not self._failed:
            return None
        return "; ".join(f"audit-{name}: {what}" for name, what in sorted(self._failed.items()))

    def _start(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._factories[name] = factory
        task = asyncio.create_task(factory(), name=f"audit-{name}")
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        name = task.get_name().removeprefix("audit-")
        crashes = self.task_crashes[name] = self.task_crashes.get(name, 0) + 1
        self._failed[name] = type(exc).__name__
        if self._closing or self._tasks.get(name) is not task:
            log.error("background task %s crashed", task.get_name(), exc_info=exc)
            return
        delay = min(TASK_RESTART_MAX_SECONDS,
                    TASK_RESTART_SECONDS * 2 ** min(crashes - 1, 16))
        log.error("background task %s crashed (%d times since start); started again in"
                  " %.0f s", task.get_name(), crashes, delay, exc_info=exc)
        self._restarts[name] = asyncio.get_running_loop().call_later(
            delay, self._restart, name)

    def _restart(self, name: str) -> None:
        self._restarts.pop(name, None)
        if self._closing:
            return
        self._failed.pop(name, None)
        self._start(name, self._factories[name])

    async def close(self, flush_window: float = 2.0) -> None:
        """Stop the reaper, let the flusher work up to ``flush_window`` s, close.

        Open sessions stay open in the spool for the next start.
        """
        self._closing = True
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()
        flusher = self._tasks.pop("flusher", None)
        try:
            reaper = self._tasks.pop("reaper", None)
            if reaper is not None:
                reaper.cancel()
                # A reaper that crashed was logged by its done-callback.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reaper
            try:
                await self.record_summaries(final=True)
            except Exception as exc:  # the spool may have failed
                log.error("security event counts not recorded at shutdown: %s", exc)
            while self._inflight:  # (one that ends may start another: _fast_done)
                await asyncio.gather(*self._inflight, return_exceptions=True)
            if flusher is not None:
                deadline = time.monotonic() + flush_window
                while not flusher.done() and time.monotonic() < deadline:
                    if self.flusher._idle.is_set() and not await self._has_pending():
                        break
                    await asyncio.sleep(0.05)
                self.flusher.stop()
                try:
                    await asyncio.wait_for(flusher,
                                           timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    pass  # cancelled by wait_for; what it was writing stays pending
                except Exception:  # already logged by the done-callback
                    pass
            if flusher is not None:  # the server's (not a command's): for `status` later
                try:
                    await self._save_sink_status()
                except Exception as exc:  # the spool may have failed
                    log.error("sink state not saved at shutdown: %s", exc)
            if flusher is None or flusher.done():  # no write under way any more
                try:
                    await self.flusher.save_bucket_at_exit()
                except Exception as exc:  # the spool may have failed
                    log.error("the sink's token bucket not saved at shutdown: %s", exc)
        finally:
            # Even when the above is cancelled: a sink or spool left open keeps
            # its connection's thread, and the process, alive.
            if flusher is not None and not flusher.done():
                flusher.cancel()  # what it was writing stays pending
                await asyncio.wait({flusher}, timeout=1.0)
            self.flusher.close()
            with contextlib.suppress(Exception):
                await self.sink.close()
            await self.spool.close()

    async def _has_pending(self) -> bool:
        c = await self.spool.read(lambda conn: queries.counts(conn, self.clock()))
        return bool(c["pending_parts"] or c["pending_security_events"])

    @property
    def ready(self) -> bool:
        return (self.spool.accepting and self.task_failure is None
                and self.spool.damaged is None)

    # -- sessions ----------------------------------------------------------

    def session(self, session_id: str) -> OpenSession | None:
        """The open session, or None when it is sealed, unknown or past a deadline."""
        s = self.spool.open_session(session_id)
        if s is None or self._end_reason(s, self.clock()) is not None:
            return None
        return s

    def _end_reason(self, s: OpenSession, now: float) -> str | None:
        ended = self.ended(s, now)
        return ended[0] if ended is not None else None

    def ended(self, s: OpenSession, now: float) -> tuple[str, float] | None:
        """The first deadline of the session that has passed by ``now``, as
        (seal reason, when), or None. The first, not any: after downtime (or
        a clock jump) a session that went idle, then expired, ended idle."""
        a = self.config.audit
        deadlines = (
            (s.expires_at, 0, "token_expired"),
            (s.start_ts + a.max_session_seconds, 1, "max_duration"),
            (s.last_activity + a.idle_timeout_seconds, 2, "idle_timeout"),
        )
        when, _, reason = min(deadlines)
        return (reason, when) if when <= now else None

    def touch(self, session_id: str) -> None:
        """Count a request that records no event as activity (memory only)."""
        s = self.spool.open_session(session_id)
        if s is not None:
            s.last_activity = max(s.last_activity, self.clock())

    async def start_session(
        self, user: str, role: str, source: Source, ttl_seconds: float,
        *, check: Callable[[sqlite3.Connection], None] | None = None,
    ) -> OpenSession:
        """Start a session: ``session.start`` and ``token.issue`` in one commit.

        ``check(conn)`` runs first in the same transaction (on the writer
        thread); whatever it raises refuses the start, and nothing is recorded.
        """
        # A whole second: the token's ``exp`` is one, and /me, token.issue and
        # the session's end must name the same moment. Rounded up, so that
        # the token lives at least ``ttl_seconds``.
        expires_at = float(math.ceil(self.clock() + ttl_seconds))
        src = replace(source, user=user, role=role)
        drafts = [
            Draft("session.start", source=src),
            Draft("token.issue", source=src, details={"expires_at": format_ts(expires_at)}),
        ]

        def start(w: Writer) -> OpenSession:
            if check is not None:
                check(w.conn)
            return w.start_session(user, role, expires_at, drafts)

        session: OpenSession = await self.spool.submit(start)
        return session

    async def record(
        self, session_id: str, draft: Draft, change: Change | None = None,
        *, read_only: bool = False, needs_space: bool = True, durable: bool = False,
        document: str | None = None,
    ) -> Any:
        """Record an event in the caller's session, atomically with ``change``.

        Returns what ``change`` returned; without ``change``, the event as
        stored (its canonical JSON text), or None under ``ack = "fast"``.
        ``change(conn, draft)`` runs on the writer thread inside the same
        transaction. If it raises :class:`ActionError`, the change is rolled
        back, the event is recorded with that outcome and reason (plus a
        security event ``access.denied`` when denied), and the error is
        raised here after the commit. With ``read_only``, ``change`` only
        reads: it runs without savepoints (a :class:`Read` job). Without
        ``needs_space`` the event is taken even by a full spool: for the record
        of an action that has already happened (a chat the provider answered).
        With ``durable`` it returns after the commit even under ``ack = "fast"``.
        With ``document`` (an id; ``read_only`` only), ``change`` is
        ``check(row, draft)``: it gets that document's row, read with the
        batch's other reads (:class:`~audit.store.Read`), not the connection.
        """
        if change is None:
            append = Append(session_id, draft)
            if self.config.audit.ack == "fast" and not durable:
                self._fast(self.spool.submit_nowait(append, needs_space=needs_space),
                           session_id, [draft])
                return None
            return await self.spool.submit_nowait(append, needs_space=needs_space)

        def changing(w: Writer) -> Any:
            w.session(session_id)  # fail before the change if the session is gone
            w.conn.execute("SAVEPOINT change")
            try:
                result = change(w.conn, draft)
            except ActionError as err:
                w.conn.execute("ROLLBACK TO change")
                w.conn.execute("RELEASE change")
                w.record_failure(session_id, draft, err)
                return err
            w.conn.execute("RELEASE change")
            w.append(session_id, draft)
            return result

        job = Read(session_id, draft, change, document) if read_only else changing
        try:
            result = await self.spool.submit(job, needs_space=needs_space)
        finally:
            if not read_only:  # documents may have changed: measure them again soon
                self.spool.app_changed = True
        if isinstance(result, ActionError):
            try:
                raise result
            finally:
                result = None  # its traceback holds this frame: no cycle through it
        return result

    async def record_events(self, session_id: str, drafts: list[Draft], *, size: int) -> int:
        """Record ``drafts`` in the caller's session in one job (client
        events: the events are the action); ``size`` is what the spool
        counts them as until their commit. Under ``ack = "fast"`` it returns
        once they are queued, before the commit, as :meth:`record` does for
        a plain event. Returns how many."""

        def job(w: Writer) -> int:
            for d in drafts:
                w.append(session_id, d)
            return len(drafts)

        if self.config.audit.ack == "fast":
            self._fast(self.spool.submit_nowait(job, size=size), session_id, drafts)
            return len(drafts)
        n: int = await self.spool.submit(job, size=size)
        return n

    async def begin(self, session_id: str, draft: Draft) -> str:
        """Note, durably, an action about to act beyond this process whose
        event (``draft``) is recorded only once it ends (:data:`BEGUN`);
        returns the note's key for :meth:`record_done`. Refused by a full
        spool (:class:`SpoolFull`): not begun without room for its record."""
        key = BEGUN + draft.event_id
        text = json.dumps({"session_id": session_id, "started": self.clock(),
                           "draft": asdict(draft)}, separators=(",", ":"))

        def note(w: Writer) -> None:
            w.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

        noted = self.spool.submit_nowait(note, size=max(JOB_BYTES, len(text)))
        try:
            await asyncio.shield(noted)
        except asyncio.CancelledError:
            # (The shutdown cut the request off.) The note commits still, but
            # the action does not begin: it is deleted once it has, or a start
            # would record an interrupted chat that sent nothing.
            self.detach(self._unnote(key, noted))
            raise
        return key

    async def _unnote(self, key: str, noted: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):
            await noted  # (not committed: nothing to delete)
            await self.spool.submit(
                lambda w: w.conn.execute("DELETE FROM meta WHERE key = ?", (key,)),
                needs_space=False)

    async def record_done(self, session_id: str, draft: Draft, begun: str | None = None,
                          *, activity: float | None = None) -> None:
        """Record the event of an action that has happened (a chat the
        provider was asked), deleting its :meth:`begin` note ``begun`` in the
        same transaction: taken even by a full spool, and durable whatever
        ``audit.ack`` says. A session that ended meanwhile (logout, expiry,
        idle timeout) does not lose it: it goes to the security stream as
        ``auth.session_ended`` with the action's details, and
        :class:`SessionNotOpen` is raised (marked recorded). ``activity``
        (with ``begun``): when the event counts as the session's activity,
        if not at its time (:meth:`Writer.append`)."""

        def done(w: Writer) -> None:
            if begun is not None:
                w.conn.execute("DELETE FROM meta WHERE key = ?", (begun,))

        def event(w: Writer) -> str:
            text = w.append(session_id, draft, activity=activity)
            done(w)
            return text

        try:
            await self.spool.submit(event if begun is not None else Append(session_id, draft),
                                    needs_space=False)
        except SessionNotOpen as exc:
            ended = _ended_during(draft)

            def security(w: Writer) -> None:
                w.append_security(ended, session_id)
                done(w)

            await self.spool.submit(security, needs_space=False)
            exc.recorded = True
            raise

    async def _begun(self, *, say: bool) -> list[tuple[str, str, Draft, float | None]]:
        """The actions an earlier process began and never recorded (the
        :data:`BEGUN` notes), as (note's key, session id, the draft of their
        record, when they count as activity); with ``say``, a note that
        cannot be read is said."""
        rows = await self.spool.read(lambda c: c.execute(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            (BEGUN, BEGUN[:-1] + chr(ord(BEGUN[-1]) + 1))).fetchall())
        noted: list[tuple[str, str, Draft, float | None]] = []
        for key, text in rows:
            # What is wrong is named, not quoted: the words of float() or
            # Draft(**...) quoted the note's value or an unknown field's name.
            wrong = "not JSON"
            try:
                # NaN and Infinity, which json reads and the records' JSON
                # refuses: its record raised out of the start, at every start.
                note = json.loads(text, parse_constant=_no_constant)
                wrong = "its draft is not one this release can read"
                raw = note["draft"]
                draft = Draft(**{**raw, "source": Source(**raw["source"])})
                wrong = "it has no session_id"
                session_id = note["session_id"]
                wrong = "its started is missing or not a time"
                started = format_ts(float(note["started"]))
                if not isinstance(session_id, str) or not isinstance(draft.details, dict):
                    wrong = "not a session id and details"
                    raise TypeError(wrong)
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                if say:
                    log.error("the spool's note %r of an action under way cannot be read"
                              " (%s, %s): its event is not recorded", key, wrong,
                              type(exc).__name__)
                continue
            draft.outcome = "failure"
            draft.details = {**draft.details, "reason": INTERRUPTED, "started_at": started}
            # The record, made now, is not the user's activity: the action's
            # request was, when it began (as a restart reads the record back).
            noted.append((key, session_id, draft, activity_time(
                {"action": draft.action, "outcome": draft.outcome, "details": draft.details})))
        return noted

    def _count_begun(self, noted: list[tuple[str, str, Draft, float | None]]) -> None:
        """Each noted action's session active when the action began (memory
        only, as a request that records nothing)."""
        for _, session_id, _, activity in noted:
            s = self.spool.open_session(session_id)
            if s is not None and activity is not None:
                s.last_activity = max(s.last_activity, activity)

    async def record_interrupted(self) -> None:
        """Record the actions an earlier process began and never recorded
        (:data:`BEGUN`): outcome failure, reason ``interrupted``, with when
        each began; a note that cannot be read is left, and said. Not beside
        a server (its actions are still under way). After the catch-up of the
        security chain (:func:`~audit.rollback.catch_up_security_chain`): a
        record there moved the spool's head past the one the sink continues."""
        if self.beside_server:
            return
        noted = await self._begun(say=True)
        # Each session's activity as it stood before the crash, all its actions
        # begun counted, before any deadline is judged: the downtime is not
        # activity, and one action judged alone could end a session that a
        # later one had kept open.
        self._count_begun(noted)
        if noted:
            # Then the sessions the command line revoked while the server was
            # down end as they did then (the reaper's hooks: ``passwd``,
            # ``disable``), with their cause and at their time: a record
            # appended first put the seal at this start (no earlier than the
            # session's newest event), or the idle deadline the downtime
            # passed sealed it before, its cause lost. Their chats' records
            # go to the security stream, as for any session ended meanwhile.
            await self._before_reap()
        for key, session_id, draft, activity in noted:
            log.warning("%s (event %s, session %s) was under way when the server stopped:"
                        " recorded as interrupted", draft.action, draft.event_id, session_id)
            try:
                s = self.spool.open_session(session_id)
                ended = self.ended(s, self.clock()) if s is not None else None
                if s is not None and ended is not None:
                    # Past a deadline while the server was down: it ends first, as
                    # the reaper ends it (the record appended to it was activity
                    # that took an idle session, and its token, back to life).
                    with contextlib.suppress(SessionNotOpen):
                        await self.spool.submit(_ender(s, *ended), needs_space=False)
                await self.record_done(session_id, draft, key, activity=activity)
            except SessionNotOpen:
                pass  # (recorded as a security event)
            except (SpoolUnavailable, sqlite3.Error, OSError) as exc:
                # The spool cannot commit (a full disk): the note stays, for the next start.
                log.error("the interrupted %s (event %s) cannot be recorded yet: %s",
                          draft.action, draft.event_id, exc)
                return

    def detach(self, recording: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``recording`` (the record of an action already done, its caller
        cancelled) in a task of its own: a second cancellation of the caller
        does not stop it half way, and :meth:`close` waits for it before the
        spool closes."""
        fut = asyncio.ensure_future(recording)
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return fut

    def _fast(self, fut: asyncio.Future[Any], session_id: str, drafts: list[Draft]) -> None:
        """Follow the commit of events answered before it (``ack = "fast"``)."""
        self._inflight.add(fut)
        fut.add_done_callback(lambda f: self._fast_done(f, session_id, drafts))

    def _fast_done(self, fut: asyncio.Future[Any], session_id: str,
                   drafts: list[Draft]) -> None:
        self._inflight.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, SessionNotOpen):
            # The session ended (a logout, a deadline) between the request's
            # token check and this commit. The caller has its 2xx: the action
            # happened, and its record goes to the security stream, as a
            # chat's does (record_done). It was dropped with a log line.
            self.detach(self._ended_meanwhile(session_id, drafts))
            return
        if exc is not None:
            # While the spool cannot commit, every request's event fails so:
            # one line a minute per cause, with how many were left out.
            left_out = self._fast_log.allow(type(exc).__name__)
            if left_out is not None:
                log.error("event not recorded (ack=fast): %s%s", exc, more(left_out))

    async def _ended_meanwhile(self, session_id: str, drafts: list[Draft]) -> None:
        ended = [_ended_during(d) for d in drafts]

        def security(w: Writer) -> None:
            for e in ended:
                w.append_security(e, session_id)

        try:
            await self.spool.submit(security, needs_space=False)
        except Exception as exc:
            log.error("event not recorded (ack=fast; its session %s ended first): %s",
                      session_id, exc)

    async def record_security(
        self, draft: Draft, session_id: str | None = None, *, happened: bool = False
    ) -> None:
        """Record a security event. One of a caller without a valid session
        (:data:`UNAUTHENTICATED`) past its client IP's budget is counted into
        a summary event instead (:class:`FloodGuard`). An event of an action
        that ``happened`` is never counted and is taken by a full spool."""
        if happened:
            await self.spool.submit(lambda w: w.append_security(draft, session_id),
                                    needs_space=False)
            return
        if (
            self.flood is not None
            and draft.action in UNAUTHENTICATED
            and not self.flood.admit(draft.source.ip, draft.action, self.clock(),
                                     draft.source.user or _username(draft), session_id,
                                     _reason(draft))
        ):
            return
        await self.spool.submit(lambda w: w.append_security(draft, session_id))

    async def record_summaries(self, *, final: bool = False) -> int:
        """Record one event per (client IP, an IPv6 one by its /64, action)
        counted by the flood guard since the last call, ``source.ip`` the first
        address counted: ``details`` ``{"reason": "over_budget", "count",
        "first_ts", "last_ts", "usernames", "more_usernames", "session_ids",
        "more_session_ids", "addresses", "more_addresses", "reasons"}``
        (``reasons``: the counted events' own ``details.reason``, each with its
        count).
        Returns how many were recorded. If the spool refuses them (full,
        failing), the counts are kept for the next call. The ``final`` call,
        at shutdown, has no next one: a full spool takes them (they are
        requests already answered; at most ``FloodGuard.MAX_KEYS`` events)."""
        flood = self.flood
        if flood is None:
            return 0
        summaries = flood.take_summaries()
        if not summaries:
            return 0
        drafts = [
            Draft(c.action, outcome="denied", source=Source(ip=None if c.ip == "-" else c.ip),
                  details={"reason": "over_budget", "count": c.count,
                           "first_ts": format_ts(c.first), "last_ts": format_ts(c.last),
                           "usernames": sorted(c.users), "more_usernames": c.more_users,
                           "session_ids": sorted(c.sessions),
                           "more_session_ids": c.more_sessions,
                           "addresses": sorted(c.addresses),
                           "more_addresses": c.more_addresses,
                           "reasons": dict(sorted(c.reasons.items()))})
            for c in summaries
        ]

        def job(w: Writer) -> int:
            for d in drafts:
                w.append_security(d, None)
            return len(drafts)

        try:
            fut = self.spool.submit_nowait(job, needs_space=not final)
        except (SpoolFull, SpoolUnavailable, SpoolClosed):
            flood.restore(summaries)
            raise

        def done(f: asyncio.Future[Any]) -> None:
            # Decided by the commit, not by whoever awaits it: a caller
            # cancelled meanwhile (shutdown) neither loses nor doubles them.
            if f.cancelled() or f.exception() is not None:
                flood.restore(summaries)

        fut.add_done_callback(done)
        n: int = await asyncio.shield(fut)
        return n

    async def end_session(self, session_id: str, source: Source, reason: str = "logout") -> int:
        """Record ``session.end`` and seal; returns the session's event count.
        (Sessions revoked by the command line get their ``cause`` from
        ``Accounts.end_revoked_sessions``' own ``session.end``.)"""
        end = Draft("session.end", source=source, details={"reason": reason})
        s: OpenSession = await self.spool.submit(
            lambda w: w.seal(session_id, reason, end), needs_space=False
        )
        return s.event_count

    async def _before_reap(self) -> None:
        """Run the :attr:`before_reap` hooks; one that fails is said (not in
        full each time) and the others go on."""
        for hook in self.before_reap:
            name = str(getattr(hook, "__name__", hook))
            said = self._hook_logs.get(name)
            if said is None:
                said = self._hook_logs[name] = FailingPass(
                    log, f"reaper: {name}", LogThrottle(clock=self.monotonic))
            try:
                await hook()
            except Exception as exc:  # the reaping goes on; the hook's rows wait
                said.failed(exc)  # (each second while a damaged spool lasts: not in full)
            else:
                said.succeeded()

    async def reap_once(self) -> int:
        """Seal idle, expired and over-long sessions; cut time checkpoints.

        The :attr:`before_reap` hooks run first: sessions the command line
        revoked (``passwd``, ``disable``) end as they did then, with their
        cause, before a deadline that came later could claim them."""
        await self._before_reap()
        now = self.clock()
        mono = self.monotonic()
        a = self.config.audit
        idle, longest, checkpoint = (a.idle_timeout_seconds, a.max_session_seconds,
                                     a.checkpoint_seconds)
        seen = self._uncut_since
        # Entries of sessions that ended or were cut are dropped now and then,
        # not by building the whole map again on every pass.
        kept: dict[str, tuple[int, float]] | None = None
        if mono - self._uncut_pruned >= UNCUT_PRUNE_INTERVAL:
            kept, self._uncut_pruned = {}, mono
        futs: list[asyncio.Future[Any]] = []
        # Once a second over every open session, on the event loop: the common
        # case (nothing due) costs a few comparisons and one dict lookup.
        sessions = self.spool.open_sessions()
        try:
            for start in range(0, len(sessions), REAP_CHUNK):
                if start:  # let requests in between chunks
                    await asyncio.sleep(0)
                for s in sessions[start:start + REAP_CHUNK]:
                    sid = s.session_id
                    if (s.expires_at <= now or s.last_activity + idle <= now
                            or s.start_ts + longest <= now):
                        ended = self.ended(s, now)  # (which deadline came first)
                        if ended is not None:
                            futs.append(self.spool.submit_nowait(_ender(s, *ended),
                                                                 needs_space=False))
                            continue
                    first = s.uncut_first_ts
                    if first is None:
                        continue
                    # Aged by the wall clock (it went on while the server was down)
                    # and by the monotonic one since first seen here: a wall clock
                    # stepped back must not hold the events back as long.
                    wall_age = now - first
                    entry = seen.get(sid)
                    if entry is None or entry[0] != s.cut_seq:
                        entry = seen[sid] = (s.cut_seq, mono - max(0.0, wall_age))
                    if kept is not None:
                        kept[sid] = entry
                    if wall_age >= checkpoint or mono - entry[1] >= checkpoint:
                        futs.append(self.spool.submit_nowait(_checkpointer(sid), needs_space=False))
        except BaseException:
            # Stopped half way (cancelled at a turn between chunks, or the
            # spool refused a job): the jobs queued so far still run; their
            # answers, a failure among them, are for nobody now.
            for fut in futs:
                fut.cancel()
            raise
        if kept is not None:
            self._uncut_since = kept
        results = await asyncio.gather(*futs, return_exceptions=True)
        done = 0
        failed: list[BaseException] = []
        for r in results:
            if isinstance(r, SessionNotOpen):
                continue  # sealed meanwhile by logout
            if isinstance(r, BaseException):
                failed.append(r)
            else:
                done += 1
        if failed:
            # The jobs of one pass fail together (a spool that cannot commit
            # fails the whole batch), and again on the next pass: one line for
            # them, once a minute, not one a session a second. (The minute
            # is not started over by a pass that succeeds: passes failing
            # and succeeding by turns logged a line each second.)
            left_out = self._reaper_log.allow("jobs")
            if left_out is not None:
                log.error("reaper: %d of %d jobs failed: %s%s", len(failed), len(results),
                          failed[0], more(left_out))
        return done

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reaper_interval)
            try:
                await self.reap_once()
                await self._save_sink_status()
                await self.spool.measure_app_bytes()
                if self.monotonic() - self._summarised_at >= SUMMARY_INTERVAL:
                    self._summarised_at = self.monotonic()
                    await self.record_summaries()
            except (sqlite3.Error, OSError, SpoolFull, SpoolUnavailable) as exc:
                # Keep reaping. A spool that is full or cannot commit reports
                # itself (readyz, its own log line): said once a minute here.
                left_out = self._reaper_log.allow(type(exc).__name__)
                if left_out is not None:
                    log.error("reaper: %s%s", exc, more(left_out))

    # -- admin -------------------------------------------------------------

    async def retry_dead_letters(self) -> int:
        n: int = await self.spool.submit(lambda w: w.retry_dead(), needs_space=False)
        self.flusher.wake()
        return n

    def sink_where(self) -> str:
        return sink_where(self.config)

    def sink_status(self) -> dict[str, Any]:
        f = self.flusher
        remaining = f.backoff.remaining()
        return {
            "type": self.sink.type,
            "where": self.sink_where(),
            "healthy": f.healthy and f.sink_open,
            "last_error": f.last_error,
            "last_error_at": format_ts(f.last_error_at) if f.last_error_at else None,
            "writes_ok": self.stats.writes_ok,
            "writes_failed": self.stats.writes_failed,
            "rate_limited": self.stats.rate_limited,
            "backoff_until": format_ts(time.time() + remaining) if remaining > 0 else None,
        }

    async def _save_sink_status(self) -> None:
        """Keep the sink's state in the spool so ``server.py status`` can show it."""
        text = json.dumps({**self.sink_status(), "saved_at": format_ts(time.time())})

        def save(w: Writer) -> None:
            w.conn.execute(
                "INSERT INTO meta (key, value) VALUES ('sink_status', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (text,),
            )

        await self.spool.submit(save, needs_space=False)

    async def status(self) -> dict[str, Any]:
        counts = await self.spool.read(lambda c: queries.counts(c, self.clock()))
        st = self.stats
        return {
            **counts,
            "spool_bytes": self.spool.spool_bytes,
            "spool_max_bytes": self.spool.max_bytes,
            "accepting": self.spool.accepting,
            # What SQLite said when it found the spool file damaged (null: it
            # has not), until the server is stopped and the file repaired.
            "spool_damaged": self.spool.damaged,
            "events_recorded": st.events_recorded,
            "security_events_recorded": st.security_events_recorded,
            "security_events_summarised": self.flood.suppressed if self.flood else 0,
            "group_commit": {
                "commits": st.commits,
                "mean_batch": round(st.batch_sizes.total / st.commits, 2) if st.commits else 0,
                "mean_latency_ms": (
                    round(1000 * st.commit_seconds.total / st.commits, 3) if st.commits else 0
                ),
            },
            "sink": self.sink_status(),
            # A crashed flusher or reaper, until it is started again (ready is
            # false meanwhile), and how often each crashed since start.
            "task_failure": self.task_failure,
            "task_crashes": dict(self.task_crashes),
        }


def _sealer(
    session_id: str, reason: str, end: Draft, when: float
) -> Callable[[Writer], OpenSession]:
    return lambda w: w.seal(session_id, reason, end, at=when)


def _ender(s: OpenSession, reason: str, when: float) -> Callable[[Writer], OpenSession]:
    """The reaper's job for a session past a deadline (``reason``, ``when``)."""
    end = Draft("session.end", source=Source(user=s.user, role=s.role),
                details={"reason": reason})
    return _sealer(s.session_id, reason, end, when)


def _checkpointer(session_id: str) -> Callable[[Writer], bool]:
    return lambda w: w.checkpoint(session_id)


def _ended_during(draft: Draft) -> Draft:
    """The security event that records ``draft``, an action done while its
    session ended: its outcome and details kept under ``details``."""
    return Draft(
        "auth.session_ended", outcome="failure", target=draft.target, source=draft.source,
        details={"reason": "session_ended_during_action", "action": draft.action,
                 "action_outcome": draft.outcome, "action_details": draft.details},
    )
