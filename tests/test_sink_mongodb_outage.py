"""The mongodb sink through a long outage: the flusher opens it again and
again, and each failed open must not leave a socket behind.

Real PyMongo against loopback ports that refuse the connection or leave it
unanswered. PyMongo 4.20 leaves a socket open when a connect is cancelled,
as closing a client cancels its monitors' pending connects; only the
garbage collector closed those, and the server runs it rarely
(audit.runtime.tune_gc). Here it does not run at all while the opens fail.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import warnings
from collections.abc import Iterator

import pymongo.common
import pytest
from live_server import free_port
from mockupdb import MockupDB
from test_sink_mongodb import HELLO, answer_create_indexes

from audit.config import MongoSinkConfig
from sinks.base import SinkUnavailable
from sinks.mongodb import MongoSink

URI_ENV = "SESSION_AUDIT_TEST_OUTAGE_MONGODB_URI"
FAILED_OPENS = 20


def open_sockets() -> int:
    """How many of this process's descriptors are sockets."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor)
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connects hang, as a host that drops packets:
    it listens with a backlog of 0, and a connection no one accepts fills
    its queue, so the SYNs of any further connect are dropped."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # The sink's close cancels a monitor's connect, whose socket PyMongo
        # leaves to the collector (once per close): collected here, quietly,
        # not in a later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
            if was:
                gc.enable()


@pytest.mark.parametrize("deployment", ["refused", "unanswered"])
async def test_failed_opens_leave_no_socket_behind(
    deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.ExitStack() as stack:
        port = free_port() if deployment == "refused" else stack.enter_context(unanswered_port())
        monkeypatch.setenv(URI_ENV, f"mongodb://127.0.0.1:{port}/")
        # Server selection waits in steps of this (0.5 s), whatever its timeout.
        monkeypatch.setattr(pymongo.common, "MIN_HEARTBEAT_INTERVAL", 0.02)
        # A connect outlives the open that waits for it (as with the
        # defaults, 5 s each, when connects time out or come in late).
        sink = MongoSink(MongoSinkConfig(uri_env=URI_ENV),
                         server_selection_timeout_ms=50, connect_timeout_ms=3000)
        stack.enter_context(no_gc())
        try:
            with pytest.raises(SinkUnavailable, match="ServerSelectionTimeoutError"):
                await sink.open()
            before = open_sockets()
            for _ in range(FAILED_OPENS):
                with pytest.raises(SinkUnavailable, match="ServerSelectionTimeoutError"):
                    await sink.open()
            after = open_sockets()
        finally:
            await sink.close()
        # A monitor's connect may be under way: not one socket per open.
        assert after - before <= 2, (before, after)


async def open_within(sink: MongoSink, attempts: int) -> None:
    """Open ``sink`` as the flusher does: again after each failure."""
    for _ in range(attempts - 1):
        with contextlib.suppress(SinkUnavailable):
            await sink.open()
            return
    await sink.open()


async def test_the_deployment_back_the_sink_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client a failed open keeps is not a dead one: once the deployment
    answers at that address, the sink opens (the indexes built); and one
    kept from another URI is not used for the new one."""
    port = free_port()
    monkeypatch.setenv(URI_ENV, f"mongodb://127.0.0.1:{port}/")
    monkeypatch.setattr(pymongo.common, "MIN_HEARTBEAT_INTERVAL", 0.02)
    sink = MongoSink(MongoSinkConfig(uri_env=URI_ENV),
                     server_selection_timeout_ms=50, connect_timeout_ms=3000)
    for _ in range(2):
        with pytest.raises(SinkUnavailable, match="ServerSelectionTimeoutError"):
            await sink.open()
    server = MockupDB(port=port, auto_ismaster=HELLO, request_timeout=10)
    server.run()
    try:
        answer_create_indexes(server)
        await open_within(sink, 400)  # (a bound: 50 ms each, 20 s)
        await sink.close()
        # Failed on another URI (nothing there): the open with this one goes
        # to this one's deployment.
        monkeypatch.setenv(URI_ENV, f"mongodb://127.0.0.1:{free_port()}/")
        with pytest.raises(SinkUnavailable, match="ServerSelectionTimeoutError"):
            await sink.open()
        monkeypatch.setenv(URI_ENV, f"mongodb://127.0.0.1:{port}/")
        await open_within(sink, 400)
        await sink.close()
    finally:
        server.stop()
