"""The flusher: moves sealed parts and security events from the spool to the sink.

Security events go first (batched), then parts, oldest first, one sink write
each; while parts wait, a stored (or refused) security batch lets one part go next, so that
a steady trickle of security events (one caller's denied requests, a few a
second) cannot take every token and hold every session back. Every write
takes a token from the bucket; a rate-limit answer pauses *all* sending for
max(hint, jittered backoff); other retryable errors back off and retry
forever with the same ``_id``, and a part or security event that keeps
failing so is put aside for a while (DEFER_AFTER), so that the rest goes;
a rejection dead-letters the document. Only
one part (at most ``part_max_bytes``) or one security batch is in memory at
a time, whatever the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from sinks.base import Sink, SinkError, SinkRateLimited, SinkRejected, SinkUnavailable

from . import queries
from .config import FlushConfig
from .logthrottle import LogThrottle, more
from .metrics import Stats
from .ratelimit import MAX_HINT, Backoff, TokenBucket
from .spool import Spool, SpoolDamaged, SpoolUnavailable, open_lock
from .store import Writer, part_document

log = logging.getLogger("session_audit.flusher")

SECURITY_BATCH = 100
LOCK_RETRY_SECONDS = 0.2
# With nothing pending, the flusher still looks at the spool this often: work
# another process queued (``server.py retry-dead`` beside a running server)
# wakes nothing in this one.
IDLE_RECHECK_SECONDS = 5.0
# A document on which the sink raises an *unclassified* error this many times
# in a row is dead-lettered (kept, counted, retryable by command) so that one
# poison document cannot block everything queued behind it forever.
UNEXPECTED_LIMIT = 5
# A part that fails this many times in a row with a retryable error (a
# timeout, a 5xx) lets later parts go first: it is tried again after a pause
# of its own, doubling each time up to DEFER_MAX_SECONDS, and put aside again
# after a single failure. One part the receiver cannot take in time must not
# stop every part behind it. Rate limits pause everything instead. With only
# what was put aside pending, the first of it goes backoff_max_seconds after
# the last write at most, whatever its own pause (Flusher._aside_due).
# A security batch failing so is sent in halves, each half that fails again
# halved at once, until the one event it fails on is found: that event is
# put aside as a part is (still pending, tried again after its own pause, of
# at most backoff_max_seconds: a small write, and a lone event put aside while
# the whole sink was down then waits no longer than it did before), and later
# security events and parts go meanwhile.
DEFER_AFTER = 3
DEFER_MAX_SECONDS = 900.0
DEFERRED_MAX = 1000  # parts and security events remembered as deferred (the oldest are forgotten)
# The pause of one put aside while the whole sink was down, ended when a write
# went through again: it goes as before (a security event in a whole batch),
# but is put aside again after one more failure.
AGAIN = -math.inf
# With audit.keep_stored_seconds, acknowledged parts past their keep time are
# deleted whenever nothing is pending, and at most this long apart otherwise.
PURGE_EVERY_SECONDS = 5.0
# The spool's meta row holding the end of the pause the sink's last rate-limit
# answer asked for (wall time) and which sink asked: a restart, say a crash
# loop, goes on waiting for it rather than writing again at once.
PAUSE_KEY = "sink_pause"
# The spool's meta row holding the token bucket's level (tokens, at a wall
# time) and the sink it spends on: a start goes on from it, not from a full
# bucket (a crash loop sent ``burst`` writes at every start). It is saved in
# the transaction that marks a write stored, before a process's first write,
# before a write after one whose outcome was not saved (a failure), and at a
# clean exit; a start after any other exit counts one token more as taken.
BUCKET_KEY = "sink_bucket"
PURGE_BATCH = 500  # stored parts deleted in one job
PURGE_SECURITY_BATCH = 5000  # stored security events deleted in one job


# What is put aside: a part, (session_id, part), or a security event, its id in the spool.
Aside = tuple[str, int] | int


class Flusher:
    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        config: FlushConfig,
        *,
        keep_stored_seconds: float = 0.0,
        remember: tuple[str, float] | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.sink = sink
        self.keep = keep_stored_seconds
        # (the sink's type and location, seconds): sessions stored whole are
        # remembered that long, for verify (Writer.mark_part_stored).
        self.remember = remember
        self.stats = stats or spool.stats
        self.clock = clock
        self.bucket = TokenBucket(config.max_writes_per_second, config.burst, clock)
        self.backoff = Backoff(config.backoff_base_seconds, config.backoff_max_seconds, clock)
        # The spool failing (disk full) backs off on its own: a part the sink
        # took but the spool could not mark stored is sent again on each retry.
        self.spool_backoff = Backoff(max(config.backoff_base_seconds, 0.1),
                                     config.backoff_max_seconds, clock)
        self.sink_open = False
        self.healthy = True
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall time it was noted
        self._single_security = 0  # after a rejected batch: send one by one
        # After a security batch failed DEFER_AFTER times in a row (retryable):
        # how many of its events are not yet stored or put aside, and how many
        # are sent at a time (halved at each failure, see DEFER_AFTER).
        self._halving = 0
        self._piece = SECURITY_BATCH
        self._security_failing: tuple[str, int] = ("", 0)  # (first _id, failures in a row)
        # A security batch was stored: a pending part takes the next token, so
        # that security events arriving faster than the bucket refills (a few a
        # second from one logged-in caller's denied requests) cannot starve
        # every part. Security events still wait at most one part write.
        self._part_turn = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._lock_fd: int | None = None
        # _id -> unexpected sink errors in a row on that document: its own
        # tries, which the writes of other documents between them (a security
        # batch stored at each turn) do not start over. (The oldest are
        # forgotten past DEFERRED_MAX.)
        self._unexpected: dict[str, int] = {}
        self._purge_due = 0.0  # (clock) the next purge while parts are pending
        self._leftovers = True  # stored rows an earlier run may have kept: purged first
        self._defer_base = config.backoff_base_seconds
        self._failing: tuple[str, int] = ("", 0)  # (_id, consecutive retryable failures)
        # Aside -> (clock before which it waits, times deferred)
        self._deferred: dict[Aside, tuple[float, int]] = {}
        # While a cause lasts (a rate-limited, down or refusing sink), one
        # line a minute for it, not one a write.
        self._log = LogThrottle(clock=clock)
        self._failed_in_a_row = 0
        # A failure line of this run of failed attempts was logged: its end
        # is logged too. The throttle's minute is not started over when a
        # write goes through: a sink failing and passing by turns (503 on
        # every other write) logged its failure and "writes succeed again"
        # at each turn, and the lines of dead letters, of what was put
        # aside and of a damaged spool went out again too.
        self._said = False
        # Documents that failed (retryable) since the last write that went
        # through, and the parts put aside meanwhile. More than one document
        # failing is the sink's outage, not one part it cannot take: once a
        # write goes through again, the parts put aside during it are due.
        self._streak: set[str] = set()  # (two are enough to tell)
        self._streak_deferred: set[Aside] = set()
        # (clock) the end of the pause the last rate-limit answer asked for,
        # which flush_now leaves as it is.
        self._rate_limited_until = 0.0
        # (wall time) a rate-limit pause not yet written to the spool.
        self._pause_to_save: float | None = None
        self._pause_resumed = False
        self._pause_kept = False  # the spool holds a pause that may not have ended
        self._bucket_resumed = False
        # The spool's bucket (BUCKET_KEY) counts every token this process took.
        self._bucket_saved = False
        self._bucket_took = False  # this process took a token (wrote) at all
        self._last_write = clock()  # (clock) the last write's start, or the start

    # -- control -------------------------------------------------------------

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def flush_now(self) -> None:
        """``POST /audit/flush``: try now what waits for a failure's backoff
        (up to ``backoff_max_seconds``) or was put aside after failing again
        and again, say once an operator has mended the sink (once each: one
        that fails again is put aside again at once). A pause a
        rate-limit answer asked for stands: it pauses all sending
        (DESIGN.md), and the token bucket still spaces the writes."""
        self.backoff.until = min(self.backoff.until, self._rate_limited_until)
        # Due now, but how often each was put aside is kept: one still failing
        # is put aside again after one try (for longer), not DEFER_AFTER tries
        # in a row with every later part waiting, its pause started over.
        self._deferred = {k: (min(until, 0.0), times)
                          for k, (until, times) in self._deferred.items()}
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        """Flush until :meth:`stop`; never gives up on a document."""
        while not self._stopping:
            # Cleared before the step: a wake-up that arrives during it is kept.
            self._wake.clear()
            try:
                delay = await self.step()
            except (SpoolUnavailable, sqlite3.Error, OSError) as exc:
                # The spool could not read or commit (disk full, I/O error):
                # that may pass, and what was being flushed is still pending.
                delay = self.spool_backoff.failed()
                # At most a line a minute, counting those left out: a step
                # that goes through resets the backoff (and a wake-up cuts
                # the wait short), so a spool failing every other step (a
                # nearly full disk) logged this line at each.
                left_out = self._log.allow("spool")
                if left_out is not None:
                    log.error("flusher: the spool failed: %s; retrying in %.1fs%s", exc, delay,
                              more(left_out))
            else:
                self.spool_backoff.succeeded()
            if delay is None:  # nothing pending: sleep until woken, or look again
                self._idle.set()
                await self._wait(IDLE_RECHECK_SECONDS)
                self._idle.clear()
            elif delay > 0:
                await self._wait(delay)

    async def _wait(self, seconds: float | None) -> None:
        """Sleep up to ``seconds`` (forever if None) or until woken."""
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def drain(self, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Flush until nothing is pending (the ``drain`` command). With nothing
        pending it returns at once, without opening the sink (which may be
        down, or not configured: then there is nothing to wait for)."""
        while True:
            counts = await self.spool.read(lambda c: queries.counts(c, time.time()))
            if not counts["pending_parts"] and not counts["pending_security_events"]:
                return
            delay = await self.step()
            if progress is not None:
                progress(await self.spool.read(lambda c: queries.counts(c, time.time())))
            if delay is None:
                return
            if delay > 0:
                await asyncio.sleep(delay)

    def _sink_name(self) -> str:
        return self.remember[0] if self.remember else self.sink.type

    async def _resume_pause(self) -> None:
        """Once: go on with the pause a rate-limit answer asked for before this
        process started, if the same sink asked and it has not ended. Bounded as
        a hint is (a wall clock stepped back must not stop the trail)."""
        if self._pause_resumed:
            return
        row = await self.spool.read(lambda c: c.execute(
            "SELECT value FROM meta WHERE key = ?", (PAUSE_KEY,)).fetchone())
        self._pause_resumed = True
        try:
            saved = json.loads(row[0]) if row else {}
            until, sink = float(saved["until"]), saved["sink"]
        except (KeyError, TypeError, ValueError, OverflowError):  # (a damaged row)
            return
        left = min(until - time.time(), max(self.backoff.cap, MAX_HINT))
        if sink != self._sink_name() or not left > 0:
            return
        self._pause_kept = True
        resumed = self.clock() + left
        self.backoff.until = max(self.backoff.until, resumed)
        self._rate_limited_until = max(self._rate_limited_until, resumed)
        log.warning("sink %s asked for a pause (rate limited) that has not ended:"
                    " sending nothing for %.1f s more", self.sink.type, left)

    async def _save_pause(self) -> None:
        until, self._pause_to_save = self._pause_to_save, None
        if until is None:
            return
        text = json.dumps({"until": until, "sink": self._sink_name()})
        try:
            await self.spool.submit(lambda w: w.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (PAUSE_KEY, text)), needs_space=False)
        except Exception:
            if self._pause_to_save is None:
                self._pause_to_save = until  # tried again after the next step
            raise
        self._pause_kept = until > 0

    async def _resume_bucket(self) -> None:
        """Once, before the first write: go on from the token bucket an earlier
        process left in the spool, if it spent on the same sink."""
        if self._bucket_resumed:
            return
        row = await self.spool.read(lambda c: c.execute(
            "SELECT value FROM meta WHERE key = ?", (BUCKET_KEY,)).fetchone())
        self._bucket_resumed = True
        try:
            saved = json.loads(row[0]) if row else {}
            tokens, at, sink = float(saved["tokens"]), float(saved["at"]), saved["sink"]
            clean = saved.get("clean") is True
        except (KeyError, TypeError, ValueError, OverflowError):  # (a damaged row)
            return
        if sink != self._sink_name() or not (math.isfinite(tokens) and math.isfinite(at)):
            return
        self.bucket.resume(tokens, time.time() - at, in_flight=not clean)
        log.info("sink %s: the token bucket goes on from the last run's: %.2f of %d tokens",
                 self.sink.type, self.bucket.level(), int(self.bucket.burst))

    def _bucket_text(self, clean: bool = False) -> str:
        saved: dict[str, Any] = {"tokens": self.bucket.level(), "at": time.time(),
                                 "sink": self._sink_name()}
        if clean:
            saved["clean"] = True
        return json.dumps(saved)

    @staticmethod
    def _put_bucket(w: Writer, text: str) -> None:
        w.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (BUCKET_KEY, text))

    async def _save_bucket(self, clean: bool = False) -> None:
        text = self._bucket_text(clean)
        await self.spool.submit(lambda w: self._put_bucket(w, text), needs_space=False)
        self._bucket_saved = True

    async def save_bucket_at_exit(self) -> None:
        """At a clean exit, no write under way any more: the bucket as it is,
        every token this process took counted, so that the next start counts
        none more for a write whose outcome was not saved. A process that
        wrote nothing leaves the row as it found it: a ``drain`` beside a
        running server would otherwise mark the server's level clean, and the
        server's unsaved write, were it killed, would not be counted."""
        if self._bucket_resumed and self._bucket_took:
            await self._save_bucket(clean=True)

    async def _take(self) -> float:
        """Take a token for one write; or, none there, the seconds until one is."""
        wait = self.bucket.delay()
        if wait > 0:
            return wait
        if not self._bucket_saved:
            # This process's first write (the level it went on from counts a
            # write an earlier process may have sent unsaved: the next start
            # must count it too), or one after a write whose outcome was not
            # saved: the spool counts every write but the one about to go.
            await self._save_bucket()
        self.bucket.try_take()
        self._last_write = self.clock()
        self._bucket_saved = False
        self._bucket_took = True
        return 0.0

    async def step(self) -> float | None:
        """One unit of work. Returns None when idle, else seconds to wait first."""
        delay = await self._step()
        await self._save_pause()
        return delay

    async def _step(self) -> float | None:
        pause = self.backoff.remaining()
        if pause > 0:
            return pause
        if not self.sink_open:
            try:
                await self.sink.open()
            except Exception as exc:
                return self._retryable(exc)
            self.sink_open = True
            if self._failed_in_a_row:
                # The sink takes writes again: healthy now, not only once a
                # write goes through (with nothing pending, none would).
                if self._said:
                    log.warning("sink %s open, after %d failed attempts", self.sink.type,
                                self._failed_in_a_row)
                else:
                    log.info("sink %s open", self.sink.type)
                self._failed_in_a_row = 0
                self._said = False
                self.backoff.succeeded()
                self.healthy = True
            else:
                log.info("sink %s open", self.sink.type)
        # A pause kept from before this process started is waited out with the
        # sink open (an open sends nothing of the trail): else the start took
        # the sink for one not open yet, waited for it, skipped its checks
        # against the sink, and status said unhealthy until the pause ended.
        await self._resume_pause()
        await self._resume_bucket()
        pause = self.backoff.remaining()
        if pause > 0:
            return pause
        # One flusher at a time per spool file: ``server.py drain`` may run
        # beside the server, and both must not send the same pending item.
        if not self._lock():
            return LOCK_RETRY_SECONDS
        try:
            return await self._flush_one()
        finally:
            self._unlock()

    def _lock(self) -> bool:
        if self._lock_fd is None:
            path = self.spool.path.with_name(self.spool.path.name + ".flush-lock")
            self._lock_fd = open_lock(path)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the flush lock's file (after the loop has stopped)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    async def _flush_one(self) -> float | None:
        limit = (1 if self._single_security else
                 min(self._piece, self._halving) if self._halving else SECURITY_BATCH)
        now = self.clock()
        waiting = [k for k, (until, _) in self._deferred.items() if until > now]
        skip = {k for k in waiting if isinstance(k, tuple)}
        held = {k for k in waiting if isinstance(k, int)}
        damaged: list[tuple[int, str]] = []
        try:
            security = await self.spool.read(
                lambda c: queries.pending_security(c, limit, damaged, held))
        except SpoolDamaged as exc:
            # A page of security events the spool cannot read: the parts
            # still go (each step tries the security events again).
            self._damage_noted("security events", exc)
            security = []
        if damaged:  # texts damaged in the spool: never sent, kept as dead letters
            await self._security_damaged(damaged)
            return 0.0
        for i, (rid, _) in enumerate(security):
            if self._deferred.get(rid, (AGAIN,))[0] != AGAIN:  # put aside, due: sent alone
                security = security[:i] or security[:1]
                break
        if security and not self._part_turn:
            return await self._send_security(security)
        raw = self.sink.raw_events
        meta = await self.spool.read(lambda c: queries.next_pending_part(c, skip))
        part = None
        if meta is not None:
            try:
                events = await self.spool.read(lambda c: queries.part_events(c, meta, raw))
            except SpoolDamaged as exc:
                await self._part_damaged(meta, exc)
                return 0.0
            part = part_document(meta, events)
        if ((self.keep > 0 and (part is None or self.clock() >= self._purge_due))
                or self._leftovers):
            # Also while a backlog drains: acknowledged parts past their keep
            # time free their space (a full spool under "reject" refuses
            # actions until they do). With keep_stored_seconds = 0 nothing is
            # kept, but a start may find what an earlier configuration kept:
            # it goes first, however many batches it takes.
            self._purge_due = self.clock() + PURGE_EVERY_SECONDS
            # A full batch: more waits, purged at the next step, at once.
            self._leftovers = await self._purge()
        if part is None:
            self._part_turn = False
            if security:
                return await self._send_security(security)
            if self._leftovers:
                return 0.0  # more purging first, at once
            if waiting:  # only what was put aside may be pending: the first is due then
                pending: set[Aside] = set()
                if skip:
                    pending |= await self.spool.read(lambda c: queries.still_pending(c, skip))
                if held:
                    pending |= await self.spool.read(
                        lambda c: queries.security_still_pending(c, held))
                for gone in set(waiting) - pending:  # stored or dead-lettered by another process
                    self._deferred.pop(gone, None)
                if pending:
                    return self._aside_due(pending, now)
            return None
        wait = await self._take()
        if wait > 0:
            return wait
        self._part_turn = False
        return await self._write_part(part)

    async def _send_security(self, batch: list[tuple[int, dict[str, Any]]]) -> float:
        wait = await self._take()
        if wait > 0:
            return wait
        return await self._write_security(batch)

    async def _write_security(self, batch: list[tuple[int, dict[str, Any]]]) -> float:
        ids = [rid for rid, _ in batch]
        try:
            try:
                await self.sink.write_security_events([doc for _, doc in batch])
            except Exception as exc:
                rejected = self._poison(str(batch[0][1]["_id"]), exc)
                if rejected is None:
                    raise
                raise rejected from exc
        except SinkRejected as exc:
            # Answered for good, stored or not: that write took a token, and a
            # pending part takes the next (security events refused one by one
            # must not hold every session back either).
            self._part_turn = True
            if len(batch) > 1:
                # Find the culprit: send this batch's events one at a time.
                self.stats.writes_failed += 1
                self._single_security = len(batch)
                return 0.0
            self._dead_lettered(exc)
            left_out = self._log.allow("dead")
            if left_out is not None:
                self._said = True
                log.error("security event %s dead-lettered: %s%s", batch[0][1]["_id"], exc,
                          more(left_out))
            msg = str(exc)
            sink = self.remember[0] if self.remember is not None else None
            await self.spool.submit(lambda w: w.mark_security_dead(ids, msg, sink),
                                    needs_space=False)
            self._security_past(batch)
            return 0.0
        except Exception as exc:
            pause = self._retryable(exc)
            # (An unclassified error counts toward dead-lettering instead: _poison.)
            if isinstance(exc, SinkError) and not isinstance(exc, SinkRateLimited):
                await self._security_failed(batch, str(exc))
            return pause
        keep = self.keep
        sink = self.remember[0] if self.remember is not None else None
        bucket = self._bucket_text()

        def stored_security(w: Writer) -> None:
            w.mark_security_stored(ids, keep, sink)
            self._put_bucket(w, bucket)

        await self.spool.submit(stored_security, needs_space=False)
        self._bucket_saved = True
        self._unexpected.pop(str(batch[0][1]["_id"]), None)
        self._security_past(batch)
        self.stats.security_written += len(batch)
        # The first write through after an outage (more than one document
        # failed) may be a piece of a halved batch, or an event put aside: the
        # rest of the security events go next, whole, before a part's turn.
        self._part_turn = len(self._streak) < 2
        self._ok()
        return 0.0

    def _security_past(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """These security events are no longer pending (stored, dead-lettered)."""
        first = self._deferred.get(batch[0][0], (AGAIN,))[0]
        for rid, _ in batch:
            self._deferred.pop(rid, None)
        if first != AGAIN:
            return  # put aside before (sent alone): not one of those counted below
        self._single_security = max(0, self._single_security - len(batch))
        self._halving = max(0, self._halving - len(batch))

    async def _security_failed(self, batch: list[tuple[int, dict[str, Any]]], error: str) -> None:
        """Count a retryable failure of a security batch; after
        :data:`DEFER_AFTER` in a row, halve it until the one event it fails
        on is found, and put that aside (see there)."""
        rid, doc_id = batch[0][0], str(batch[0][1]["_id"])
        if rid in self._deferred:
            # Put aside before, due again: aside again at once. Not a sign of
            # an outage (two such would end the pause of every one put aside at
            # each write through, searched anew, and give no part its turn),
            # and the failures in a row of the batch behind it still count.
            if self._deferred[rid][0] == AGAIN:  # (sent in a batch, counted there)
                self._single_security = max(0, self._single_security - 1)
                self._halving = max(0, self._halving - 1)
            wait = self._put_aside(rid, self._aside_cap(rid))
            self._log_aside("security event %s keeps failing; later events go first, it is"
                            " tried again within %.1f s (sooner while nothing else is"
                            " pending)", doc_id, wait)
            return
        self._note_streak(doc_id)
        last, count = self._security_failing
        count = count + 1 if last == doc_id else 1
        self._security_failing = (doc_id, count)
        # A piece of a batch that kept failing: at once.
        if count < (1 if self._halving else DEFER_AFTER):
            return
        self._security_failing = ("", 0)
        if len(batch) > 1:
            if not self._halving:
                self._log_aside("security events from %s: a batch of %d keeps failing; sent"
                                " in halves to find the one it fails on", doc_id, len(batch))
            self._halving = max(self._halving, len(batch))
            self._piece = (len(batch) + 1) // 2
            return
        # Found: whole batches again (another is found alike).
        sink = self.remember[0] if self.remember is not None else None
        await self.spool.submit(lambda w: w.mark_security_aside(rid, error, sink),
                                needs_space=False)
        self._halving = 0
        self._single_security = max(0, self._single_security - 1)
        wait = self._put_aside(rid, self._aside_cap(rid))
        self._log_aside("security event %s keeps failing; later events go first, it is"
                        " tried again within %.1f s (sooner while nothing else is pending)",
                        doc_id, wait)

    def _aside_due(self, pending: set[Aside], now: float) -> float:
        """Only what was put aside is pending: the seconds until the first is
        due, or until backoff_max_seconds have passed since the last write
        (or the start), whichever is sooner; then that first one goes, alone,
        and is put aside again at once if it fails. A pause of its own longer
        than the backoff's keeps it from taking the writes of what else is
        pending; nothing else is: the sink is idle. (A long outage put every
        pending document aside for up to DEFER_MAX_SECONDS, and once the
        sink was back nothing went for up to that long.)"""
        first = min(pending, key=lambda k: self._deferred[k][0])
        until, times = self._deferred[first]
        probe = self._last_write + self.backoff.cap
        if probe >= until:
            return max(0.0, until - now)
        if probe > now:
            return probe - now
        self._deferred[first] = (now, times)  # due: sent alone, not in a batch
        return 0.0

    def _aside_cap(self, rid: int) -> float:
        """The longest pause of a security event put aside: backoff_max_seconds
        (a small write; one put aside while the whole sink was down waits no
        longer than it did before), times the number put aside, up to
        DEFER_MAX_SECONDS: each one's retry that fails again pauses all
        sending, and ten retried each minute took every write but a few."""
        n = 1 + sum(isinstance(k, int) and k != rid for k in self._deferred)
        return min(DEFER_MAX_SECONDS, max(self.backoff.cap * n, self.backoff.cap))

    def _log_aside(self, msg: str, *args: object) -> None:
        """Once a minute at most: an outage puts aside again and again."""
        left_out = self._log.allow("aside")
        if left_out is not None:
            log.warning(msg + "%s", *args, more(left_out))

    async def _write_part(self, doc: dict[str, Any]) -> float:
        sid, part = doc["session_id"], doc["part"]
        try:
            try:
                await self.sink.write_part(doc)
            except Exception as exc:
                rejected = self._poison(str(doc["_id"]), exc)
                if rejected is None:
                    raise
                raise rejected from exc
        except SinkRejected as exc:
            self._dead_lettered(exc)
            left_out = self._log.allow("dead")
            if left_out is not None:
                self._said = True
                log.error("part %s dead-lettered: %s%s", doc["_id"], exc, more(left_out))
            msg = str(exc)
            await self.spool.submit(
                lambda w: w.mark_part_failed(sid, part, msg, dead=True), needs_space=False
            )
            return 0.0
        except Exception as exc:
            pause = self._retryable(exc)
            # (An unclassified error counts toward dead-lettering instead: _poison.)
            if isinstance(exc, SinkError) and not isinstance(exc, SinkRateLimited):
                await self._part_failed(doc["_id"], sid, part, str(exc))
            return pause
        keep, remember = self.keep, self.remember
        bucket = self._bucket_text()

        def stored(w: Writer) -> None:
            w.mark_part_stored(sid, part, keep, remember)
            self._put_bucket(w, bucket)

        await self.spool.submit(stored, needs_space=False)
        self._bucket_saved = True
        self.stats.parts_written += 1
        self._deferred.pop((sid, part), None)
        self._failing = ("", 0)
        self._unexpected.pop(str(doc["_id"]), None)
        self._ok()
        return 0.0

    def _damage_noted(self, what: str, exc: SpoolDamaged) -> None:
        left_out = self._log.allow("damaged")
        if left_out is not None:
            log.error("flusher: %s cannot be read: %s%s", what, exc, more(left_out))

    async def _part_damaged(self, meta: dict[str, Any], exc: SpoolDamaged) -> None:
        """A part the spool cannot read (a page of its events damaged, or an
        event's text): dead-lettered, kept and counted, so that the parts
        behind it go (it held every one of them back, for good), and never
        sent half read or as text that is not JSON. Not the sink's fault:
        the sink stays healthy. ``retry-dead`` once the spool is repaired."""
        sid, part = meta["session_id"], meta["part"]
        self._damage_noted(f"part {sid}:{part}", exc)
        msg = f"the spool cannot read this part: {exc}"
        await self.spool.submit(lambda w: w.mark_part_failed(sid, part, msg, dead=True),
                                needs_space=False)

    async def _security_damaged(self, damaged: list[tuple[int, str]]) -> None:
        """Security events whose text in the spool is damaged (not UTF-8, not
        JSON): dead-lettered, each with what is wrong (one crashed the
        flusher at each start, and nothing was sent any more)."""
        rid, why = damaged[0]
        more_ids = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        exc = SpoolDamaged(f"the audit spool is damaged: the text of security event {rid}"
                           f" is {why}{more_ids}")
        self.spool.note_damage(exc)
        self._damage_noted("security events", exc)
        sink = self.remember[0] if self.remember is not None else None

        def dead(w: Writer) -> None:
            for rid, why in damaged:
                w.mark_security_dead([rid], f"the spool cannot read this event: its text is"
                                     f" {why}", sink)

        await self.spool.submit(dead, needs_space=False)

    async def _part_failed(self, doc_id: str, sid: str, part: int, error: str) -> None:
        """Count a retryable failure of a part (in the spool: ``attempts``,
        ``last_error``); after :data:`DEFER_AFTER` in a row, later parts go
        first for a while (see there)."""
        await self.spool.submit(
            lambda w: w.mark_part_failed(sid, part, error, dead=False), needs_space=False)
        key = (sid, part)
        # Put aside before: again at once (not a sign of an outage, and the
        # failures in a row of the part behind it still count).
        if key not in self._deferred:
            self._note_streak(doc_id)
            last, count = self._failing
            count = count + 1 if last == doc_id else 1
            self._failing = (doc_id, count)
            if count < DEFER_AFTER:
                return
            self._failing = ("", 0)
        wait = self._put_aside(key, DEFER_MAX_SECONDS)
        # Once a minute at most: an outage puts parts aside again and again.
        left_out = self._log.allow("part aside")
        if left_out is not None:
            self._said = True
            log.warning("part %s keeps failing; later parts go first, it is tried again within"
                        " %.1f s (sooner while nothing else is pending)%s",
                        doc_id, wait,  # (0.4 s with a 0.05 s backoff base: not "0 s")
                        more(left_out))

    def _put_aside(self, key: Aside, cap: float) -> float:
        """``key`` waits a pause of its own, doubling each time it is put aside
        up to ``cap``; returns it."""
        times = self._deferred.pop(key, (0.0, 0))[1]  # re-inserted last: the oldest are
        # forgotten first. (The exponent is bounded: one failing for weeks must not overflow it.)
        wait: float = min(cap, self._defer_base * 2 ** min(DEFER_AFTER + times, 40))
        self._deferred[key] = (self.clock() + wait, times + 1)
        if len(self._streak_deferred) < DEFERRED_MAX:
            self._streak_deferred.add(key)
        while len(self._deferred) > DEFERRED_MAX:
            del self._deferred[next(iter(self._deferred))]
        return wait

    async def _purge(self) -> bool:
        """Delete acknowledged rows past their keep time, a bounded batch of
        each (:data:`PURGE_BATCH` parts of at most
        :data:`~audit.store.PURGE_MAX_EVENTS` events in all,
        :data:`PURGE_SECURITY_BATCH` security events); returns whether a
        batch was full (more may wait)."""
        cutoff = self.spool.clock() - self.keep  # the clock that stamped stored_ts

        def purge(w: Writer) -> bool:
            _, more = w.purge_stored(cutoff, PURGE_BATCH)
            sec = w.purge_stored_security(cutoff, PURGE_SECURITY_BATCH)
            return more or sec >= PURGE_SECURITY_BATCH

        more: bool = await self.spool.submit(purge, needs_space=False)
        return more

    # -- outcomes ------------------------------------------------------------

    def _poison(self, doc_id: str, exc: Exception) -> SinkRejected | None:
        """A rejection once the same document kept raising unclassified errors
        (at its own tries in a row: another document's write between them
        does not count)."""
        count = self._unexpected.pop(doc_id, 0) + 1
        if isinstance(exc, SinkError):
            return None
        if count < UNEXPECTED_LIMIT:
            self._unexpected[doc_id] = count  # (re-inserted last: the oldest go first)
            while len(self._unexpected) > DEFERRED_MAX:
                del self._unexpected[next(iter(self._unexpected))]
            return None
        return SinkRejected(f"unexpected sink error {UNEXPECTED_LIMIT} times in a row:"
                            f" {type(exc).__name__}: {exc}"[:300])

    def _note_streak(self, doc_id: str) -> None:
        if len(self._streak) < 2:
            self._streak.add(doc_id)

    def _ok(self) -> None:
        if not self.healthy and self._failed_in_a_row and self._said:
            log.warning("sink %s: writes succeed again, after %d failed attempts",
                        self.sink.type, self._failed_in_a_row)
        if len(self._streak) > 1:  # an outage, not one document: what it put aside is due
            # (how often each was put aside kept, as flush_now does: one that
            # still fails is put aside again after one try, not searched anew)
            back = [k for k in self._streak_deferred if k in self._deferred]
            for k in back:
                self._deferred[k] = (AGAIN, self._deferred[k][1])
            if back:
                log.info("sink %s: %d documents put aside while it failed are due again",
                         self.sink.type, len(back))
            self._halving = 0  # and security events go in whole batches again
        self._streak.clear()
        self._streak_deferred.clear()
        if self._pause_kept:  # the sink takes writes again: a restart need not wait
            self._pause_kept = False
            self._pause_to_save = 0.0
        self._failed_in_a_row = 0
        self._said = False
        self.stats.writes_ok += 1
        self.backoff.succeeded()
        self.healthy = True

    def _note_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.last_error_at = time.time()  # (shown beside healthy: true once it passed)

    def _dead_lettered(self, exc: BaseException) -> None:
        """A write refused for good: not a healthy sink until one is taken (a
        receiver refusing every write, say a wrong token, answers but stores
        nothing)."""
        self.stats.writes_failed += 1
        self.stats.dead_lettered += 1
        self._failed_in_a_row += 1
        self.healthy = False
        self._note_error(exc)

    def _retryable(self, exc: BaseException) -> float:
        """Back off after a write that may be retried; returns the pause."""
        hint = None
        if isinstance(exc, SinkRateLimited):
            self.stats.rate_limited += 1
            hint = exc.retry_after
        else:
            self.stats.writes_failed += 1
            self._failed_in_a_row += 1
            if not isinstance(exc, (SinkUnavailable, SinkError)):
                # A sink bug must not lose anything either: log it and retry.
                # Its traceback once a minute at most (a sink failing every
                # other write logged it in full at each); another type of
                # error (another bug) at once, not left out as its repeat.
                left_out = self._log.allow(f"unexpected {type(exc).__name__}")
                if left_out is not None:
                    self._said = True
                    log.error("unexpected sink error%s", more(left_out), exc_info=exc)
        self.healthy = isinstance(exc, SinkRateLimited)
        self._note_error(exc)
        pause = self.backoff.failed(hint)
        if isinstance(exc, SinkRateLimited):
            self._rate_limited_until = max(self._rate_limited_until, self.clock() + pause)
            self._pause_to_save = time.time() + (self._rate_limited_until - self.clock())
        left_out = self._log.allow(type(exc).__name__)
        if left_out is not None:
            if not isinstance(exc, SinkRateLimited):
                self._said = True
            log.warning("sink %s: %s; pausing %.2fs%s", self.sink.type, self.last_error, pause,
                        more(left_out))
        return pause
