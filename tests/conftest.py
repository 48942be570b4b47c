"""Shared, generic fixtures: configs in tmp_path, fake clocks, condition waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import Live, release_ports
from sqlite_conns import close_all
from waiting import wait_for

import handlers.admin
import handlers.errors
import server
from audit.config import Config, parse_config
from audit.logthrottle import LogThrottle

AUDIT_KEY = b"test-audit-key-0123456789abcdef!"


class FakeClock:
    """A clock that moves only when told to; use for ``clock=`` / ``monotonic=``."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@pytest.fixture(autouse=True)
def _fresh_log_throttles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own module-level log throttles: a line an earlier test
    in the same process had said was left out of a later one's log as a
    repeat (seen when pytest-xdist ran them in another order)."""
    for module, name in ((handlers.admin, "_QUERY_LOG"), (handlers.errors, "_UNAVAILABLE_LOG"),
                         (server, "_SEND_LOG")):
        monkeypatch.setattr(module, name, LogThrottle())


@pytest.fixture(autouse=True)
def _release_ports() -> Iterator[None]:
    """The ports live_server.free_port() held for the test, let go at its end."""
    yield
    release_ports()


@pytest.fixture(autouse=True)
def _close_sqlite_connections() -> Iterator[None]:
    """The connections the test opened with ``sqlite_conns.connect``, closed."""
    yield
    close_all()


@pytest.fixture
def audit_key() -> bytes:
    return AUDIT_KEY


@pytest.fixture
def fake_clock() -> FakeClock:
    """A wall clock (epoch seconds) under the test's control."""
    return FakeClock()


@pytest.fixture
def fake_monotonic() -> FakeClock:
    return FakeClock(start=1000.0)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """``make_config(audit={...}, flush={...})``: a Config whose data lives in tmp_path."""

    def make(**sections: dict[str, Any]) -> Config:
        data: dict[str, Any] = {k: dict(v) for k, v in sections.items()}
        data.setdefault("server", {}).setdefault("data_dir", str(tmp_path / "data"))
        return parse_config(data, base_dir=str(tmp_path))

    return make


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    """``await wait_until(pred, timeout=10)``: poll a (sync or async) predicate
    until it is truthy, failing the test at the deadline."""
    return wait_for


class Engines:
    """Opens AuditEngines for a test and closes (or cleans up) them afterwards."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._open: list[Any] = []
        self._abandoned: list[Any] = []

    async def open(
        self, config: Config, sink: Any = None, *, background: bool = False,
        prepare: Callable[[Any], None] | None = None, interrupted: bool = True,
        **kwargs: Any
    ) -> Any:
        """``prepare(engine)``, if given, runs before the engine opens (the
        server registers its before_reap hooks so); ``interrupted=False``
        leaves record_interrupted to the test (as the server's start does)."""
        from audit.engine import AuditEngine
        from sinks.sqlite import SqliteSink

        if sink is None:
            sink = SqliteSink(config.sqlite_sink_path)
        engine = AuditEngine(config, sink, self.key, **kwargs)
        if prepare is not None:
            prepare(engine)
        await engine.open(background=background, interrupted=interrupted)
        self._open.append(engine)
        return engine

    async def close(self, engine: Any) -> None:
        """Close one engine now (a server stopped), before the test ends."""
        self._open.remove(engine)
        await engine.close(flush_window=0)

    async def abandon(self, engine: Any) -> None:
        """Simulate a crash: the engine stops where it is, without closing.

        Background tasks and the writer loop are cancelled; a batch already
        on the writer thread runs to its end (as it would have before the
        process died), queued jobs never run, and nothing is closed: its
        connections stay open until the test ends, as a dead process's
        files would be until the OS reclaims them.
        """
        self._open.remove(engine)
        self._abandoned.append(engine)
        tasks = [*engine._tasks.values(), engine.spool._task]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        if engine.spool._wexec is not None:
            await asyncio.to_thread(engine.spool._wexec.shutdown, True)
            engine.spool._wexec = None

    async def drain(
        self, engine: Any, monotonic: FakeClock | None = None, steps: int = 100_000
    ) -> None:
        """Run the flusher until idle; waits are skipped on a fake monotonic clock."""
        for _ in range(steps):
            delay = await engine.flusher.step()
            if delay is None:
                return
            if delay > 0:
                if monotonic is not None:
                    monotonic.advance(delay)
                else:
                    await asyncio.sleep(delay)
        raise AssertionError("the flusher did not become idle")

    async def aclose(self) -> None:
        for engine in reversed(self._open):
            await engine.close(flush_window=0.5)
        for engine in self._abandoned:
            spool = engine.spool
            for conn in (spool._wconn, spool._rconn):
                if conn is not None:
                    conn.close()
            if spool._rexec is not None:
                spool._rexec.shutdown(wait=True)
            await engine.sink.close()


@pytest.fixture
async def engines(audit_key: bytes) -> Any:
    """``await engines.open(config, sink=None, background=False, clock=..., monotonic=...)``."""
    e = Engines(audit_key)
    yield e
    await e.aclose()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    """A real server process (live_server.Live) with the default settings,
    killed at teardown; a module may define its own."""
    lv = Live(tmp_path)
    yield lv
    lv.close()
