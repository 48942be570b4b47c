"""The http sink's fault handling, against the real receiver in tests/receiver.py,
and against bare HTTP servers (RawServer) for answers aiohttp's server would not send."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import signal
import socket
import sqlite3
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web
from api_fixtures import MakeApi, make_api
from live_server import free_port
from receiver import Fault, Receiver, ReceiverOptions, sample_part, sample_security_event, serve
from waiting import wait_for

from audit import queries
from audit.config import HttpSinkConfig
from sinks.base import (
    SinkConflict,
    SinkError,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
)
from sinks.http import BODY_CAP, HttpSink, _strip_userinfo, parse_retry_after

TOKEN = "tok-9f8e7d6c5b4a-secret"
TOKEN_ENV = "SESSION_AUDIT_TEST_HTTP_TOKEN"
NOW = 1_764_167_467.0  # 2025-11-26T14:31:07Z

__all__ = ["make_api"]

Start = Callable[..., Awaitable[tuple[Receiver, str]]]


@pytest.fixture
async def start_receiver() -> AsyncIterator[Start]:
    started: list[tuple[Receiver, web.AppRunner]] = []

    async def start(
        clock: Callable[[], float] = time.monotonic, **options: object
    ) -> tuple[Receiver, str]:
        receiver = Receiver(ReceiverOptions(**options), clock=clock)  # type: ignore[arg-type]
        runner, port = await serve(receiver, "127.0.0.1", 0)
        started.append((receiver, runner))
        return receiver, f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for receiver, runner in started:
            receiver.close()
            await runner.cleanup()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., Awaitable[HttpSink]]]:
    sinks: list[HttpSink] = []

    async def make(url: str, timeout_seconds: float = 5.0, **kwargs: object) -> HttpSink:
        sink = HttpSink(
            HttpSinkConfig(url=url, token_env=TOKEN_ENV, timeout_seconds=timeout_seconds),
            **kwargs,  # type: ignore[arg-type]
        )
        await sink.open()
        sinks.append(sink)
        return sink

    try:
        yield make
    finally:
        for sink in sinks:
            await sink.close()


# -- parse_retry_after ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("Wed, 26 Nov 2025 14:31:49 GMT", 42.0),  # NOW + 42 s
        ("Wed, 26 Nov 2025 14:31:07 GMT", 0.0),  # exactly now
        ("Wed, 26 Nov 2025 14:00:00 GMT", 0.0),  # in the past
        ("Wednesday, 26-Nov-25 14:32:07 GMT", 60.0),  # RFC 850, obsolete but allowed
        ("Wed Nov 26 14:31:17 2025", None),  # asctime has no zone: not trusted
        ("Wed, 32 Nov 2025 14:31:49 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_uses_the_given_clock() -> None:
    date = "Wed, 26 Nov 2025 14:31:49 GMT"
    assert parse_retry_after(date, NOW + 40) == pytest.approx(2.0)
    assert parse_retry_after(date, NOW - 8) == pytest.approx(50.0)


# -- answers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "retry_after"),
    [
        (Fault(429, {"Retry-After": "7"}), SinkRateLimited, 7.0),
        (Fault(429), SinkRateLimited, None),
        (Fault(429, {"Retry-After": "garbage"}), SinkRateLimited, None),
        (Fault(503, {"Retry-After": "3"}), SinkRateLimited, 3.0),
        (Fault(503), SinkUnavailable, None),
        (Fault(500), SinkUnavailable, None),
        (Fault(502), SinkUnavailable, None),
        (Fault(504), SinkUnavailable, None),
        (Fault(408), SinkUnavailable, None),
        (Fault(425), SinkUnavailable, None),  # Too Early: RFC 8470 says send it again
        (Fault(400), SinkRejected, None),
        (Fault(401), SinkRejected, None),
        (Fault(403), SinkRejected, None),
        (Fault(404), SinkRejected, None),
        # Redirects are not followed and say nothing about the part: retry.
        (Fault(301, {"Location": "https://moved.example/v1/sessions"}), SinkUnavailable, None),
        (Fault(302), SinkUnavailable, None),
        (Fault(304), SinkUnavailable, None),
        (Fault(307, {"Location": "/v2/sessions"}), SinkUnavailable, None),
        (Fault(308), SinkUnavailable, None),
        (Fault(413), SinkRejected, None),
        (Fault(422), SinkConflict, None),
    ],
)
async def test_status_mapping(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    fault: Fault,
    error: type[SinkError],
    retry_after: float | None,
) -> None:
    receiver, url = await start_receiver()
    sink = await make_sink(url)
    for write in (
        lambda: sink.write_part(sample_part("s1")),
        lambda: sink.write_security_events([sample_security_event("e1")]),
    ):
        receiver.script(fault)
        with pytest.raises(error) as info:
            await write()
        assert type(info.value) is error
        assert f"HTTP {fault.status}" in str(info.value)
        if isinstance(info.value, SinkRateLimited):
            assert info.value.retry_after == retry_after
    assert receiver.parts == {} and receiver.security_events == {}


@pytest.mark.parametrize("dup_status", [200, 409])
async def test_a_409_naming_another_hash_is_a_conflict(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]], dup_status: int
) -> None:
    """A receiver that answers every duplicate _id with 409 (API.md's words)
    can still tell a conflict apart by sending the stored part's hash back."""
    receiver, url = await start_receiver(conflict_status=409, dup_status=dup_status)
    sink = await make_sink(url)
    await sink.write_part(sample_part("s1"))
    await sink.write_part(sample_part("s1"))  # the same part again: stored
    with pytest.raises(SinkConflict) as info:
        await sink.write_part(sample_part("s1", salt="other"))
    assert f"POST {url}/sessions: HTTP 409: s1:0 is stored with another hash" in str(info.value)
    assert receiver.parts["s1:0"]["hash"] == sample_part("s1")["hash"]


async def test_a_409_without_a_hash_is_stored(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver()
    sink = await make_sink(url)
    await sink.write_part(sample_part("s1"))
    receiver.script(Fault(409))  # {"error": ...}: no hash to compare
    await sink.write_part(sample_part("s1", salt="other"))


async def test_redirect_is_retried_and_names_the_target_without_secrets(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver()
    sink = await make_sink(url)
    location = "https://bob:hunter22@moved.example/v1/sessions?sig=s3cr3t-sig#frag"
    receiver.script(Fault(308, {"Location": location}))
    with pytest.raises(SinkUnavailable) as info:
        await sink.write_part(sample_part("moved"))
    text = str(info.value)
    assert ("HTTP 308: redirect to https://moved.example/v1/sessions not followed;"
            " set [sink.http] url to the receiver's address") in text, text
    for secret in ("hunter22", "bob", "s3cr3t-sig", "frag"):
        assert secret not in text
    assert receiver.parts == {}
    await sink.write_part(sample_part("moved"))  # the retry, once the receiver answers
    assert "moved:0" in receiver.parts


async def test_url_credentials_and_query_are_sent_but_never_shown(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """The URL's query (an API key) goes with every request, after the path;
    neither it nor the credentials, as written, decoded or as the Basic
    header's base64 (a receiver may echo it), appear in an error."""
    receiver, url = await start_receiver()
    host = url.removeprefix("http://")
    sink = await make_sink(
        f"http://sinkuser:S3cret%40SinkPw@{host}/?apikey=QUERYSECRET123&format=json")
    await sink.write_part(sample_part("q"))
    assert receiver.urls_seen[-1] == "/sessions?apikey=QUERYSECRET123&format=json"
    basic = base64.b64encode(b"sinkuser:S3cret@SinkPw").decode()
    assert receiver.headers_seen[-1]["Authorization"] == f"Basic {basic}"
    receiver.script(Fault(401, body={"error": f"you sent Basic {basic} to"
                                              f" {receiver.urls_seen[-1]}"}))
    with pytest.raises(SinkRejected) as info:
        await sink.write_part(sample_part("q2"))
    text = str(info.value)
    assert f"POST http://{host}/sessions: HTTP 401" in text, text
    assert "http sink" in text  # "json" and "http" are not hidden for format=json
    for secret in (basic, "S3cret", "SinkPw", "sinkuser", "QUERYSECRET123"):
        assert secret not in text, (secret, text)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://u:p@[::1]:8099/v1", "http://[::1]:8099/v1"),
        ("http://u:p@[::1]/v1", "http://[::1]/v1"),
        ("https://u@[2001:db8::7]:443/a?b=1", "https://[2001:db8::7]:443/a?b=1"),
        ("http://u:p@[fe80::1%25eth0]:80/v1", "http://[fe80::1%25eth0]:80/v1"),
        ("http://u:p@Receiver.Example:8080/v1", "http://Receiver.Example:8080/v1"),
        ("http://u:p%40ss@h.example/v1", "http://h.example/v1"),
        ("http://u:p@ss@h.example/v1", "http://h.example/v1"),  # an "@" left unescaped
        ("http://h.example:8080/v1", "http://h.example:8080/v1"),
        ("http://[::1]:8099/v1", "http://[::1]:8099/v1"),
    ],
)
def test_strip_userinfo_keeps_the_host_as_written(url: str, expected: str) -> None:
    assert _strip_userinfo(url) == expected


async def test_ipv6_receiver_with_credentials_in_the_url(
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    receiver = Receiver(ReceiverOptions())
    runner, port = await serve(receiver, "::1", 0)
    try:
        sink = await make_sink(f"http://user:pa55word@[::1]:{port}/")
        part = sample_part("v6")
        await sink.write_part(part)
        assert receiver.parts == {"v6:0": part}
        assert receiver.headers_seen[-1]["Authorization"].startswith("Basic ")
        receiver.script(Fault(400))
        with pytest.raises(SinkRejected) as info:
            await sink.write_part(sample_part("v6b"))
        assert f"POST http://[::1]:{port}/sessions" in str(info.value)
        assert "pa55word" not in str(info.value)
    finally:
        receiver.close()
        await runner.cleanup()


async def test_429_with_http_date(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver()
    sink = await make_sink(url, clock=lambda: NOW)
    date = format_datetime(datetime.fromtimestamp(NOW + 90, tz=UTC), usegmt=True)
    receiver.script(Fault(429, {"Retry-After": date}), Fault(503, {"Retry-After": date}))
    for _ in range(2):
        with pytest.raises(SinkRateLimited) as info:
            await sink.write_part(sample_part("s1"))
        assert info.value.retry_after == 90.0


async def test_token_bucket_answers_429_with_retry_after(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver(rate=0.5, burst=2)
    sink = await make_sink(url)
    await sink.write_part(sample_part("a"))
    await sink.write_part(sample_part("b"))
    with pytest.raises(SinkRateLimited) as info:
        await sink.write_part(sample_part("c"))
    assert info.value.retry_after is not None and 1.0 <= info.value.retry_after <= 2.0
    assert sorted(receiver.parts) == ["a:0", "b:0"]


async def test_duplicates_are_success_with_409_and_200(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    for dup_status in (409, 200):
        receiver, url = await start_receiver(dup_status=dup_status)
        sink = await make_sink(url)
        part = sample_part("dup")
        await sink.write_part(part)
        await sink.write_part(part)
        assert receiver.stats[f"status_{dup_status}"] == 1
        assert receiver.parts == {"dup:0": part}
    receiver.script(Fault(409))  # a bare 409 from anywhere is success too
    await sink.write_part(sample_part("other"))


async def test_request_shape(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver()
    sink = await make_sink(url + "/")  # a trailing slash is dropped
    part = sample_part("shape")
    events = [sample_security_event("x1"), sample_security_event("x2")]
    await sink.write_part(part)
    await sink.write_security_events(events)
    assert receiver.parts == {"shape:0": part}
    assert receiver.security_events == {"x1": events[0], "x2": events[1]}
    part_headers, event_headers = receiver.headers_seen
    assert part_headers["Idempotency-Key"] == "shape:0"
    assert part_headers["Content-Type"].startswith("application/json")
    assert "Idempotency-Key" not in event_headers
    assert "Authorization" not in part_headers  # the token variable is not set
    # Bodies are read as sent (see test_compressed_answers...): none wanted.
    assert part_headers["Accept-Encoding"] == event_headers["Accept-Encoding"] == "identity"


async def test_timeout_is_unavailable_and_the_retry_is_idempotent(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver(hang_seconds=30.0)
    sink = await make_sink(url, timeout_seconds=1.0)
    part = sample_part("slow")
    receiver.script(Fault(hang=True, apply=True))
    # A guard, not a timing: without its own timeout the write would hang 30 s.
    with pytest.raises(SinkUnavailable, match=rf"POST {url}/sessions: no answer within 1 s$"):
        async with asyncio.timeout(20):
            await sink.write_part(part)
    assert receiver.parts == {"slow:0": part}  # it landed although we timed out
    await sink.write_part(part)  # the retry: a duplicate, so success
    assert receiver.parts == {"slow:0": part}
    assert receiver.stats["status_409"] == 1


async def test_connection_refused_is_unavailable(
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    sink = await make_sink(f"http://127.0.0.1:{free_port()}")  # (nothing listens)
    with pytest.raises(SinkUnavailable, match=r"127\.0\.0\.1"):
        async with asyncio.timeout(20):  # a guard against a hang, not a timing
            await sink.write_part(sample_part("nowhere"))


async def test_not_open_is_unavailable() -> None:
    sink = HttpSink(HttpSinkConfig(url="http://127.0.0.1:9"))
    with pytest.raises(SinkUnavailable):
        await sink.write_part(sample_part("x"))
    await sink.close()
    await sink.close()


async def test_bearer_token_sent_and_never_in_messages(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    receiver, url = await start_receiver(token=TOKEN)
    sink = await make_sink(url.replace("http://", "http://user:pa55word@"), timeout_seconds=1.0)
    await sink.write_part(sample_part("auth"))
    assert receiver.headers_seen[-1]["Authorization"] == f"Bearer {TOKEN}"
    assert "auth:0" in receiver.parts
    errors: list[SinkError] = []
    # A receiver that echoes the header back in its error body.
    for fault in (
        Fault(400, body={"error": f"bad Authorization: Bearer {TOKEN} for user pa55word"}),
        Fault(503, body={"echo": TOKEN}),
        Fault(hang=True),
    ):
        receiver.script(fault)
        with pytest.raises(SinkError) as info:
            await sink.write_part(sample_part("auth2"))
        errors.append(info.value)
    for err in errors:
        assert TOKEN not in str(err) and TOKEN not in repr(err)
        assert "pa55word" not in str(err)
    assert "***" in str(errors[0])


async def test_wrong_token_is_rejected_without_leaking_it(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _, url = await start_receiver(token="another-token")
    sink = await make_sink(url)
    with pytest.raises(SinkRejected, match="HTTP 401") as info:
        await sink.write_part(sample_part("x"))
    assert TOKEN not in str(info.value)


async def test_random_faults_retried_deliver_everything_once(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """Like the flusher: retry each write until it succeeds; nothing lost or doubled."""
    receiver, url = await start_receiver(fail_share=0.4, seed=7, hang_seconds=2.0)
    sink = await make_sink(url, timeout_seconds=0.5)
    parts = [sample_part(f"r{i:02d}") for i in range(15)]
    kinds: set[type[SinkError]] = set()
    deadline = time.monotonic() + 30
    for part in parts:
        while True:
            assert time.monotonic() < deadline
            try:
                await sink.write_part(part)
                break
            except (SinkRateLimited, SinkUnavailable) as exc:
                kinds.add(type(exc))
    assert receiver.parts == {p["_id"]: p for p in parts}
    assert receiver.stats["requests"] > len(parts)
    assert kinds == {SinkRateLimited, SinkUnavailable}


async def test_receiver_command_line_stores_to_a_file(
    tmp_path: Path, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """``python tests/receiver.py ... --store PATH``: what it got is readable after exit."""
    store = tmp_path / "received.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("receiver.py")),
        "--port", "0", "--seed", "3", "--store", str(store),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"listening on http://127.0.0.1:"), line
        sink = await make_sink(line.split()[-1].decode())
        part = sample_part("cli")
        await sink.write_part(part)
        await sink.write_part(part)
        await sink.write_security_events([sample_security_event("cli-e")])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    with closing(sqlite3.connect(store)) as db:
        parts = db.execute("SELECT id, doc FROM parts").fetchall()
        stats = dict(db.execute("SELECT key, n FROM stats").fetchall())
        events = db.execute("SELECT id FROM security_events").fetchall()
    assert [(i, json.loads(d)) for i, d in parts] == [("cli:0", part)]
    assert events == [("cli-e",)]
    assert stats["requests"] == 3 and stats["status_409"] == 1


@pytest.mark.parametrize(("url", "secret"), [
    ("http://user:s@h.example/base", "s"),
    ("http://a:longpassword@h.example/x", "longpassword"),
    ("http://h.example/x?auth=1", "1"),
])
def test_short_secrets_are_hidden_where_they_stand_alone_not_inside_words(
    url: str, secret: str
) -> None:
    """A short secret replaced inside every word would both mangle the message
    and, by where the stars land, tell what it is."""
    sink = HttpSink(HttpSinkConfig(url=url, token_env=TOKEN_ENV))
    text = sink._redact(f"http sink: POST /sessions: HTTP 401: unauthorized; sent {secret}")
    assert text == "http sink: POST /sessions: HTTP 401: unauthorized; sent ***", text


# -- bare servers: answers a well-behaved server would not send -------------------

Answer = Callable[["RawServer", asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A bare HTTP/1.1 server on 127.0.0.1: reads each request (head and
    ``Content-Length`` body) and lets ``answer`` write the bytes of the reply."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.url = ""
        self.headers: list[dict[str, str]] = []  # each request's, names lowercased
        self.targets: list[str] = []  # each request's path and query
        self.connections = 0
        self.sent = 0  # body bytes that endless() got out before the client left
        self.left = asyncio.Event()  # the client closed a connection
        self.stopping = asyncio.Event()  # an answer that stalls waits for this
        self._tasks: set[asyncio.Task[object]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while not self.stopping.is_set():
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                self.targets.append(lines[0].split(" ")[1])
                fields = (line.partition(":") for line in lines[1:])
                headers = {k.strip().lower(): v.strip() for k, _, v in fields if k}
                self.headers.append(headers)
                await reader.readexactly(int(headers.get("content-length", "0")))
                await self.answer(self, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.left.set()
        finally:
            writer.close()

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Answer], Awaitable[RawServer]]]:
    started: list[tuple[RawServer, asyncio.Server]] = []

    async def start(answer: Answer) -> RawServer:
        raw = RawServer(answer)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
        raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started.append((raw, server))
        return raw

    try:
        yield start
    finally:
        for raw, server in started:
            server.close()
            await raw.stop()
            await server.wait_closed()


def fixed(status: int, body: bytes, *headers: str) -> Answer:
    """An answer with ``body`` as it is (``Content-Length`` set) and ``headers``."""
    async def answer(_: RawServer, writer: asyncio.StreamWriter) -> None:
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
    return answer


def endless(status: int) -> Answer:
    """A chunked body that never ends, 16 KiB every 2 ms (at most 32 MiB, then
    it stalls): only a reader with a limit gets past it."""
    async def answer(raw: RawServer, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        first = b'{"error": "too long", "x": "'
        for n in range(2048):
            data = (first if n == 0 else b"") + b"x" * (16384 - (len(first) if n == 0 else 0))
            writer.write(b"4000\r\n" + data + b"\r\n")
            await writer.drain()
            raw.sent += 16384
            await asyncio.sleep(0.002)
        await raw.stopping.wait()
    return answer



async def bad_status_line(_: RawServer, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 abc\r\n\r\n")
    await writer.drain()
    writer.close()


@functools.cache
def gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(bytes(size)) + packer.flush()


def gzipped(doc: object) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(json.dumps(doc).encode()) + packer.flush()


# -- answers' bodies --------------------------------------------------------------


@pytest.mark.parametrize(("status", "error"), [
    (200, None),
    (409, None),  # too long to name the stored hash: success unchecked
    (400, SinkRejected),
    (503, SinkUnavailable),
])
async def test_an_endless_body_is_read_up_to_the_cap_and_the_status_decides(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    status: int,
    error: type[SinkError] | None,
) -> None:
    """A body without end (a receiver gone wrong, anything at its address)
    must neither hold the write until the timeout nor fill memory: the sink
    reads BODY_CAP bytes and one more, lets the status decide, and closes the
    connection rather than draining it for reuse."""
    raw = await raw_server(endless(status))
    sink = await make_sink(raw.url, timeout_seconds=3.0)
    for attempt in range(2):
        async with asyncio.timeout(20):  # a guard against a hang, not a timing
            if error is None:
                await sink.write_part(sample_part("big"))
            else:
                with pytest.raises(error) as info:
                    await sink.write_part(sample_part("big"))
                text = str(info.value)
                assert f'HTTP {status}: {{"error": "too long", "x": …' in text, text
            await raw.left.wait()  # the sink closed the connection
        raw.left.clear()
        assert raw.connections == attempt + 1  # a new one each time
    assert raw.sent < 4 * 1024 * 1024, raw.sent


@pytest.mark.parametrize(("status", "body", "error", "shown"), [
    (200, "bomb", None, ""),
    # A gzip header, then a deflate block of the reserved type: no unpacking
    # it, but the status decides.
    (200, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 20, None, ""),
    (409, "bomb", None, ""),  # unpacks past the cap: no stored hash to check
    (409, gzipped({"duplicate": True, "hash": "f" * 64}), SinkConflict, "another hash"),
    (400, gzipped({"error": "bad thing"}), SinkRejected, 'HTTP 400: {"error": "bad thing"}'),
], ids=["200-bomb", "200-not-gzip", "409-bomb", "409-other-hash", "400-detail"])
async def test_compressed_answers_are_read_as_sent_and_unpacked_within_the_cap(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    status: int,
    body: bytes | str,
    error: type[SinkError] | None,
    shown: str,
) -> None:
    """The sink asks for ``identity``, but a receiver may compress anyway.
    aiohttp would unpack the body whole (this 32 KiB of gzip is 32 MiB of
    zeros; 1 MiB of it, a gigabyte) and fail a 2xx whose body does not
    unpack. The sink reads it as sent and unpacks at most BODY_CAP of it,
    for what it needs the body for: a 409's stored hash, an error's detail."""
    payload = gzip_of_zeros(32 * 1024 * 1024) if body == "bomb" else body
    assert isinstance(payload, bytes) and len(payload) < BODY_CAP
    raw = await raw_server(fixed(status, payload, "Content-Encoding: gzip"))
    sink = await make_sink(raw.url)
    tracemalloc.start()
    try:
        if error is None:
            await sink.write_part(sample_part("gz"))
        else:
            with pytest.raises(error) as info:
                await sink.write_part(sample_part("gz"))
            assert type(info.value) is error and shown in str(info.value), info.value
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
    assert raw.headers[-1]["accept-encoding"] == "identity"


async def test_a_timeout_after_the_status_line_says_the_receiver_answered(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    """"No answer" would send an operator looking for a receiver that is down."""
    async def stalls(raw: RawServer, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await raw.stopping.wait()

    raw = await raw_server(stalls)
    sink = await make_sink(raw.url, timeout_seconds=1.0)
    with pytest.raises(SinkUnavailable) as info:
        async with asyncio.timeout(20):  # a guard against a hang, not a timing
            await sink.write_part(sample_part("stall"))
    assert "HTTP 200 answered, but its body did not arrive within 1 s" in str(info.value)


def status_line(line: bytes, *headers: bytes) -> Answer:
    """An answer with the status line as given (a 101, a status of two digits)."""
    async def answer(_: RawServer, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\r\n".join([line, b"Content-Length: 0", *headers]) + b"\r\n\r\n")
        await writer.drain()
    return answer


@pytest.mark.parametrize(("line", "status"), [
    (b"HTTP/1.1 101 Switching Protocols", 101),  # to a request that asked for no upgrade
    (b"HTTP/1.1 099 X", 99),
    (b"HTTP/1.1 000 X", 0),
])
async def test_a_status_that_is_neither_4xx_nor_a_success_is_retried_not_dead_lettered(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    line: bytes,
    status: int,
) -> None:
    """Only a 4xx is about the part; a final 1xx or a status below 100 says
    nothing about it (something else answers at the receiver's address)."""
    raw = await raw_server(status_line(line))
    sink = await make_sink(raw.url)
    for write in (lambda: sink.write_part(sample_part("s1")),
                  lambda: sink.write_security_events([sample_security_event("e1")])):
        with pytest.raises(SinkUnavailable) as info:
            async with asyncio.timeout(20):  # a guard against a hang, not a timing
                await write()
        assert f"HTTP {status}" in str(info.value), info.value


@pytest.mark.parametrize("location", [b"http://[::1", b"http://[zz]/", b"http://a]b/"])
async def test_a_redirect_to_a_location_that_is_not_a_url_is_retried(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    location: bytes,
) -> None:
    """urlsplit raised ValueError on it: an unclassified error, logged with a
    traceback, and the part dead-lettered after five (UNEXPECTED_LIMIT)."""
    raw = await raw_server(status_line(b"HTTP/1.1 302 Found", b"Location: " + location))
    sink = await make_sink(raw.url)
    with pytest.raises(SinkUnavailable) as info:
        await sink.write_part(sample_part("s1"))
    assert "HTTP 302: redirect (to a Location that is not a URL) not followed" in str(info.value)


async def test_a_409_whose_body_nests_past_the_parsers_stack_is_a_409_without_a_hash(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    """json.loads raises RecursionError, not ValueError, on it: the write
    failed unclassified (dead-lettered after five) instead of being stored."""
    raw = await raw_server(fixed(409, b"[" * 60000))
    sink = await make_sink(raw.url)
    await sink.write_part(sample_part("s1"))
    await sink.write_security_events([sample_security_event("e1")])


# -- secrets in messages ------------------------------------------------------------


@pytest.mark.parametrize(("query", "pieces"), [
    ("key=abc%2Bdef%2Fghi%3D%3D", ["ghi", "abc%2B", "abc+def"]),  # shown as abc%2Bdef/ghi%3D%3D
    ("api_key=sécret-value-123", ["cret-value", "s%C3%A9"]),  # shown as s%C3%A9cret-value-123
    ("sig=abc|def[1]", ["abc%7C", "def%5B", "abc|def"]),  # shown as abc%7Cdef%5B1%5D
    ("key=abc def12345", ["def12345"]),  # shown as abc+def12345
], ids=["slash", "non-ascii", "pipe-brackets", "space"])
async def test_a_query_as_aiohttp_re_encoded_it_is_not_shown(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    query: str,
    pieces: list[str],
) -> None:
    """aiohttp names the URL in some errors (here: a bad status line) as it
    re-encoded it, which none of the configured query's forms match."""
    raw = await raw_server(bad_status_line)
    sink = await make_sink(f"{raw.url}/v1?{query}")
    with pytest.raises(SinkUnavailable) as info:
        async with asyncio.timeout(20):  # a guard against a hang, not a timing
            await sink.write_part(sample_part("q"))
    text = str(info.value)
    assert f"POST {raw.url}/v1/sessions: ClientResponseError" in text, text
    assert "/v1/sessions?***" in text, text  # where aiohttp named it
    for piece in pieces:
        assert piece not in text, (piece, text)


@pytest.mark.parametrize("body", [
    # The token across the 200 characters shown, as itself and as a header.
    {"echo": "x" * 180 + f" {TOKEN}"},
    {"error": "x" * 170 + f" got Bearer {TOKEN}"},
    # The token across the 4 KiB decoded, close to the start once the blanks close up.
    {"echo": " " * 4080 + TOKEN},
    # Anyone's credential, as an Authorization header writes it.
    {"error": "proxy saw Authorization: Bearer other-tok-123 and Basic dXNlcjpwdw=="},
], ids=["across-200-chars", "bearer-across-200-chars", "across-4-KiB", "any-bearer-or-basic"])
async def test_an_echoed_credential_is_redacted_before_the_detail_is_cut(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    monkeypatch: pytest.MonkeyPatch,
    body: dict[str, str],
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    receiver, url = await start_receiver()
    sink = await make_sink(url)
    receiver.script(Fault(400, body=body))
    with pytest.raises(SinkRejected) as info:
        await sink.write_part(sample_part("echo"))
    text = str(info.value)
    assert "HTTP 400" in text
    for secret in (TOKEN[:6], "other-tok", "dXNlcjpwdw"):
        assert secret not in text, (secret, text)


async def test_a_token_with_a_trailing_newline_is_sent_without_it(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a secret file gives it (``$(cat token)`` drops the newline, many
    ways of reading it do not)."""
    monkeypatch.setenv(TOKEN_ENV, f" {TOKEN}\r\n")
    receiver, url = await start_receiver(token=TOKEN)
    sink = await make_sink(url)
    await sink.write_part(sample_part("nl"))
    assert receiver.headers_seen[-1]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("token", [f"{TOKEN}\nX-Injected: 1", f"tok-9f\x01{TOKEN}", f"{TOKEN}\x7f"],
                         ids=["newline-inside", "ctrl-a", "del"])
async def test_a_token_with_a_control_character_inside_is_refused_at_open(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """Refused once, naming the variable, rather than failing every write."""
    monkeypatch.setenv(TOKEN_ENV, token)
    sink = HttpSink(HttpSinkConfig(url="http://127.0.0.1:9", token_env=TOKEN_ENV))
    try:
        with pytest.raises(SinkUnavailable) as info:
            await sink.open()
        text = str(info.value)
        assert f"${TOKEN_ENV} contains a control character" in text, text
        assert TOKEN[:6] not in text and "Injected" not in text
    finally:
        await sink.close()


async def test_a_token_that_is_not_utf8_is_refused_at_open(
    start_receiver: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token set in another encoding (a Latin-1 shell) reaches Python as
    lone surrogates, which aiohttp dropped from the header: the receiver got
    another token than the one configured, and answered 401, a rejection
    that dead-lettered every part. Refused at open, naming the variable."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN[:4] + "\udcf6" + TOKEN[4:])
    receiver, url = await start_receiver(token=TOKEN[:4] + "\u00f6" + TOKEN[4:])
    sink = HttpSink(HttpSinkConfig(url=url, token_env=TOKEN_ENV))
    try:
        with pytest.raises(SinkUnavailable) as info:
            await sink.open()
            await sink.write_part(sample_part("latin1"))
        text = str(info.value)
        assert f"${TOKEN_ENV} is not UTF-8 text" in text, text
        assert TOKEN[4:] not in text
        assert not receiver.headers_seen
    finally:
        await sink.close()


# -- security events: a 409 to a batch --------------------------------------------


async def test_a_409_to_a_batch_sends_its_events_one_by_one(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """A receiver may refuse a whole batch with 409 for one duplicate in it,
    which says nothing of the others: they must not be lost."""
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"b{i}") for i in range(4)]
    await sink.write_security_events(events[1:2])
    await sink.write_security_events(events)
    assert receiver.security_events == {e["_id"]: e for e in events}
    assert receiver.stats["requests"] == 1 + 1 + 4  # b1; the batch; each alone
    await sink.write_security_events(events)  # all duplicates now: success
    assert receiver.stats["requests"] == 6 + 1 + 4


async def test_a_409_to_one_security_event_naming_another_hash_is_a_conflict(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    await sink.write_security_events([sample_security_event("c1")])
    await sink.write_security_events([sample_security_event("c1")])  # the same: stored
    # One event is sent alone from the start: its 409 is unambiguous.
    assert receiver.stats["requests"] == 2
    other = sample_security_event("c1", salt="other")
    for batch in ([other], [sample_security_event("c2"), other]):
        with pytest.raises(SinkConflict,
                           match="/security-events: HTTP 409: c1 is stored with another hash"):
            await sink.write_security_events(batch)
    assert receiver.security_events["c1"] == sample_security_event("c1")
    assert "c2" in receiver.security_events


@pytest.mark.parametrize(("fault", "error"), [
    (Fault(429, {"Retry-After": "2"}), SinkRateLimited),
    (Fault(503), SinkUnavailable),
    (Fault(400), SinkRejected),
], ids=["429", "503", "400"])
async def test_an_error_among_the_events_sent_one_by_one_raises_and_the_resend_goes_on(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    fault: Fault,
    error: type[SinkError],
) -> None:
    """The batch is stored whole or raises the error met on the way; the
    flusher's resend of it goes on one by one where that stopped."""
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"m{i}") for i in range(3)]
    await sink.write_security_events(events[:1])
    # The batch refused (m0 is stored), m0 alone a duplicate, then m1 meets the fault.
    receiver.script(Fault(409), Fault(409), fault)
    with pytest.raises(error) as info:
        await sink.write_security_events(events)
    assert type(info.value) is error and f"HTTP {fault.status}" in str(info.value)
    if isinstance(info.value, SinkRateLimited):
        assert info.value.retry_after == 2.0
    assert sorted(receiver.security_events) == ["m0"]
    before = receiver.stats["requests"]
    await sink.write_security_events(events)
    assert receiver.security_events == {e["_id"]: e for e in events}
    assert receiver.stats["requests"] - before == 2  # m1 and m2, alone


@pytest.mark.parametrize(("fault", "error"), [
    (Fault(429, {"Retry-After": "2"}), SinkRateLimited),
    (Fault(400), SinkRejected),
], ids=["429", "400"])
async def test_one_by_one_is_for_the_batch_that_needed_it_not_the_next(
    start_receiver: Start,
    make_sink: Callable[..., Awaitable[HttpSink]],
    fault: Fault,
    error: type[SinkError],
) -> None:
    """A batch left half sent one by one (rate limited, or an event the
    flusher then dead-letters) does not send another batch one by one: that
    one goes whole first. Each request is billed and rate limited."""
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"u{i}") for i in range(3)]
    await sink.write_security_events(events[:1])
    receiver.script(Fault(409), Fault(409), fault)  # the batch, u0 alone, u1: the fault
    with pytest.raises(error):
        await sink.write_security_events(events)
    before = receiver.stats["requests"]
    others = [sample_security_event(f"w{i}") for i in range(4)]
    await sink.write_security_events(others)
    assert receiver.stats["requests"] - before == 1  # the batch, whole
    assert set(receiver.security_events) == {"u0"} | {e["_id"] for e in others}


async def test_a_batch_that_grew_goes_on_one_by_one_then_sends_its_new_events_whole(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """The resend of a batch that grew meanwhile (more events arrived): the
    events of the batch that needed one by one go on so, the new ones go
    as a batch."""
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"g{i}") for i in range(3)]
    await sink.write_security_events(events[:1])
    receiver.script(Fault(409), Fault(409), Fault(429))  # the batch, g0 alone, g1: 429
    with pytest.raises(SinkRateLimited):
        await sink.write_security_events(events)
    grown = [*events, sample_security_event("g3"), sample_security_event("g4")]
    before = receiver.stats["requests"]
    await sink.write_security_events(grown)
    assert receiver.stats["requests"] - before == 3  # g1 and g2 alone; g3 and g4 together
    assert receiver.security_events == {e["_id"]: e for e in grown}


@pytest.mark.parametrize("grows", [False, True], ids=["same", "grows"])
async def test_a_rate_limited_resend_one_by_one_gets_further_each_time(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]], grows: bool
) -> None:
    """With one request allowed per Retry-After, a resend that started over
    with the batch (409 again: its duplicate is still in it) would spend that
    request on the batch every time and store nothing more; so would one
    that sent the batch again whole because an event arrived meanwhile."""
    now = [0.0]
    receiver, url = await start_receiver(
        clock=lambda: now[0], rate=1.0, burst=2, batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"r{i}") for i in range(6)]
    await sink.write_security_events(events[-1:])  # the duplicate comes last
    for i in range(20):
        try:
            await sink.write_security_events(events)
            break
        except SinkRateLimited as exc:
            assert exc.retry_after is not None
            now[0] += exc.retry_after  # as the flusher waits
            if grows:  # an event arrived meanwhile: the resend holds it too
                events.append(sample_security_event(f"n{i}"))
    assert receiver.security_events == {e["_id"]: e for e in events}


async def test_a_resend_one_by_one_skips_a_taken_event_only_with_its_hash(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """The events a rate-limited one-by-one send got through are skipped on
    the resend by ``_id`` and ``hash``: one resent with another hash is sent
    again, and the receiver's 409 naming the stored hash is a conflict, not a
    success taken on trust."""
    now = [0.0]
    receiver, url = await start_receiver(
        clock=lambda: now[0], rate=1.0, burst=3, batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"k{i}") for i in range(3)]
    await sink.write_security_events(events[-1:])  # the duplicate that makes the batch 409
    with pytest.raises(SinkRateLimited):  # the batch (409), k0 alone, then k1 is 429
        await sink.write_security_events(events)
    assert set(receiver.security_events) == {"k0", "k2"}
    now[0] += 100.0
    changed = [sample_security_event("k0", salt="other"), *events[1:]]
    with pytest.raises(SinkConflict, match="k0 is stored with another hash"):
        await sink.write_security_events(changed)
    assert receiver.security_events["k0"] == events[0]


# A Retry-After HTTP-date whose hour (or day, year, zone) is a number past
# what a C long holds: parsedate_to_datetime raises OverflowError, which is
# not a ValueError.
HUGE_DATE = "Wed, 21 Oct 2015 99999999999999999999:28:00 GMT"


@pytest.mark.parametrize("value", [
    HUGE_DATE,
    "Wed, 99999999999999999999 Oct 2015 07:28:00 GMT",
    "Wed, 21 Oct 99999999999999999999 07:28:00 GMT",
    "Wed, 21 Oct 2015 07:28:00 +99999999999999999999",
])
def test_a_retry_after_date_with_an_enormous_number_is_no_hint(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


async def test_an_enormous_retry_after_date_is_retried_not_dead_lettered(
    start_receiver: Start, make_config, engines, fake_clock, fake_monotonic
) -> None:
    """Found by probing with odd receivers: such a Retry-After on any answer
    but a success (a 429, a 503, a 500) raised OverflowError out of the sink,
    an unclassified error, and after UNEXPECTED_LIMIT of them in a row the
    flusher dead-lettered the part, which the receiver had only asked to be
    sent again."""
    from audit import queries
    from audit.events import Draft, Source
    from audit.flusher import UNEXPECTED_LIMIT

    receiver, url = await start_receiver()
    receiver.script(*[Fault(status, {"Retry-After": HUGE_DATE})
                      for status in [503, 500] * UNEXPECTED_LIMIT + [429]])
    config = make_config(sink={"type": "http", "http": {"url": url}},
                         flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    engine = await engines.open(config, HttpSink(config.sink.http),
                                clock=fake_clock, monotonic=fake_monotonic)
    src = Source(user="alice", role="user")
    session = await engine.start_session("alice", "user", src, 3600)
    await engine.record(session.session_id, Draft("document.list"))
    await engine.end_session(session.session_id, src)
    await engines.drain(engine, fake_monotonic)

    counts = await engine.spool.read(lambda c: queries.counts(c, fake_clock()))
    assert counts["dead_letter_parts"] == 0
    assert list(receiver.parts) == [f"{session.session_id}:0"]
    assert receiver.stats["requests"] == 2 * UNEXPECTED_LIMIT + 2


async def test_a_redirect_to_a_location_that_is_not_utf8_is_retried_and_shown(
    raw_server: Callable[[Answer], Awaitable[RawServer]], make_api: MakeApi
) -> None:
    """Found by probing with odd receivers: aiohttp hands a header's bytes
    that are not UTF-8 on as lone surrogates, which the redirect's message
    quoted. Storing that message with the part in the spool raised
    UnicodeEncodeError out of the flusher, whose task died: nothing was
    sent any more until a restart, /readyz said 503 and /audit/status,
    quoting the last error, was a 500."""
    moved = True

    async def answer(_: RawServer, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 307 X\r\nLocation: http://a/b\xff\xfe\r\nContent-Length: 0\r\n\r\n"
                     if moved else b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    raw = await raw_server(answer)
    api = await make_api(sink={"type": "http", "http": {"url": raw.url}},
                         flush={"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05})
    admin = await api.admin()
    alice = await api.user("alice")
    assert (await api.client.post("/logout", headers=alice.headers)).status == 200
    # Three tries: a few backoffs of at most 0.05 s; a flusher that crashes
    # is started again after 1 s, then 2 s.
    await wait_for(lambda: len(raw.headers) >= 3, message="the part sent three times")
    assert api.engine.task_crashes == {}
    assert (await api.client.get("/readyz")).status == 200
    resp = await api.client.get("/audit/status", headers=admin.headers)
    assert resp.status == 200
    shown = (await resp.json())["sink"]["last_error"]
    assert "HTTP 307: redirect to http://a/b\ufffd\ufffd not followed" in shown

    moved = False  # the receiver is back where it was: the part goes out

    async def stored() -> bool:
        counts = await api.engine.spool.read(lambda c: queries.counts(c, time.time()))
        return counts["pending_parts"] == 0 and counts["dead_letter_parts"] == 0

    await wait_for(stored, message="alice's part stored")


# -- answers pinned down by a mutation review ---------------------------------------

OTHER_HASH = "f" * 64
HASH_BODY = json.dumps({"duplicate": True, "hash": OTHER_HASH}).encode()


def padded(body: bytes, size: int) -> bytes:
    """``body`` followed by blanks to ``size`` bytes: JSON still, read whole."""
    return body + b" " * (size - len(body))


def packed(data: bytes, wbits: int) -> bytes:
    """gzip (``wbits`` 31), zlib (15) or raw deflate (-15) of ``data``."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("status", "body", "headers", "conflict"), [
    # A 409's body of BODY_CAP bytes is read whole: its hash is checked; one
    # byte more, and it is not all read: success unchecked.
    (409, padded(HASH_BODY, BODY_CAP), (), True),
    (409, padded(HASH_BODY, BODY_CAP + 1), (), False),
    # The same, unpacked: the cap is on what it unpacks to.
    (409, packed(padded(HASH_BODY, BODY_CAP), 31), ("Content-Encoding: gzip",), True),
    (409, packed(padded(HASH_BODY, BODY_CAP + 1), 31), ("Content-Encoding: gzip",), False),
    # Every encoding the sink unpacks, "deflate" as zlib or raw.
    (409, packed(HASH_BODY, 31), ("Content-Encoding: x-gzip",), True),
    (409, packed(HASH_BODY, 15), ("Content-Encoding: deflate",), True),
    (409, packed(HASH_BODY, -15), ("Content-Encoding: Deflate",), True),
    (409, HASH_BODY, ("Content-Encoding: identity",), True),
    # A hash that is no string, or a body that is no object: no stored hash.
    (409, b'{"hash": 5}', (), False),
    (409, b'["hash"]', (), False),
    # Only a 409 names a stored hash: a 2xx stored the part, whatever its body.
    (200, HASH_BODY, (), False),
], ids=["cap", "cap+1", "gzip-cap", "gzip-cap+1", "x-gzip", "deflate-zlib", "deflate-raw",
        "identity", "hash-not-str", "not-object", "200"])
async def test_a_stored_hash_is_read_from_a_409_body_within_the_cap(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    status: int,
    body: bytes,
    headers: tuple[str, ...],
    conflict: bool,
) -> None:
    raw = await raw_server(fixed(status, body, *headers))
    sink = await make_sink(raw.url)
    if conflict:
        with pytest.raises(SinkConflict, match=r"/sessions: HTTP 409: s1:0 is stored with"):
            await sink.write_part(sample_part("s1"))
    else:
        await sink.write_part(sample_part("s1"))


@pytest.mark.parametrize(("body", "headers", "shown"), [
    (b"", (), ""),  # no detail: nothing after the status
    (b"bad \xff byte", (), ": bad \ufffd byte"),  # not UTF-8: replaced, not an error
    (b'{"error": "x"}', ("Content-Encoding: identity",), ': {"error": "x"}'),
    (b"whatever", ("Content-Encoding: br",), ""),  # not unpacked: no detail
    (b"not gzip at all", ("Content-Encoding: gzip",), ""),  # does not unpack: none
    # A last word that ends at the decoding's limit is whole; one byte more
    # and it was cut there: shown as an ellipsis.
    (padded(b"", 4096 - 6) + b"ending", (), ": ending"),
    (padded(b"", 4097 - 6) + b"ending", (), ": \u2026"),
], ids=["empty", "not-utf8", "identity", "br", "bad-gzip", "4096", "4097"])
async def test_an_error_body_is_shown_as_its_detail(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    body: bytes,
    headers: tuple[str, ...],
    shown: str,
) -> None:
    raw = await raw_server(fixed(400, body, *headers))
    sink = await make_sink(raw.url)
    with pytest.raises(SinkRejected) as info:
        await sink.write_part(sample_part("s1"))
    assert str(info.value) == f"http sink: POST {raw.url}/sessions: HTTP 400{shown}"


@pytest.mark.parametrize("status", [300, 302])
async def test_a_redirect_without_a_location_is_retried_and_says_so(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
    status: int,
) -> None:
    """300 (Multiple Choices) is a redirect like the others, not a success."""
    raw = await raw_server(status_line(f"HTTP/1.1 {status} X".encode()))
    sink = await make_sink(raw.url)
    with pytest.raises(SinkUnavailable) as info:
        await sink.write_part(sample_part("s1"))
    assert str(info.value) == (
        f"http sink: POST {raw.url}/sessions: HTTP {status}: redirect not followed;"
        " set [sink.http] url to the receiver's address")


async def test_not_open_and_not_json_say_so() -> None:
    sink = HttpSink(HttpSinkConfig(url="http://127.0.0.1:9"))
    with pytest.raises(SinkUnavailable, match=r"^http sink is not open$"):
        await sink.write_security_events([sample_security_event("e1")])
    await sink.open()
    try:
        part = sample_part("s1") | {"odd": {1, 2}}
        with pytest.raises(SinkRejected, match=r"^http sink: not JSON serialisable: "):
            await sink.write_part(part)
    finally:
        await sink.close()


async def test_a_sink_closed_mid_resend_sends_the_next_batch_whole(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    """Going on one by one is for the resend of the batch that stopped; a
    sink opened again (the sink swapped back, say) starts with batches."""
    receiver, url = await start_receiver(batch_dup_status=409)
    sink = await make_sink(url)
    events = [sample_security_event(f"m{i}") for i in range(3)]
    await sink.write_security_events(events[:1])
    receiver.script(Fault(409), Fault(409), Fault(503))
    with pytest.raises(SinkUnavailable):
        await sink.write_security_events(events)
    await sink.close()
    await sink.open()
    before = receiver.stats["requests"]
    fresh = [sample_security_event("n0"), sample_security_event("n1")]
    await sink.write_security_events(fresh)
    assert receiver.stats["requests"] - before == 1
    assert {"n0", "n1"} <= set(receiver.security_events)


@pytest.mark.parametrize(("url", "text", "expected"), [
    # What is hidden shows as ***, where it stood.
    ("http://h.example/x", f"echo {TOKEN}!", "echo ***!"),
    ("http://h.example/x", "sent Bearer abc.def to", "sent Bearer *** to"),
    ("http://h.example/x", "at /v1/sessions?x=1 now", "at /v1/sessions?*** now"),
    ("http://u:pw@h.example/x", f"got {base64.b64encode(b'u:pw').decode()}.", "got ***."),
    # The query whole, although no value in it looks like a key.
    ("http://h.example/x?tenant=ab12&region=eu", "query tenant=ab12&region=eu refused",
     "query *** refused"),
    # A value with "=" in it (base64's padding) is the value whole.
    ("http://h.example/x?sig=c2lnbmF0dXJl==", "bad signature c2lnbmF0dXJl==",
     "bad signature ***"),
    # Each parameter is looked at, not only the first.
    ("http://h.example/x?format=json&key=k1", "unknown key k1", "unknown key ***"),
    # Eight characters count as long: hidden inside words too.
    ("http://h.example/x?tenant=abcd1234", "no tenant xabcd1234y", "no tenant x***y"),
    # A longer secret holding a shorter one goes first, or its rest would show.
    ("http://u:s3cretpw@h.example/x?key=extra-s3cretpw", "key extra-s3cretpw", "key ***"),
], ids=["token", "bearer", "query-after-path", "basic", "whole-query", "padded-value",
        "second-param", "eight-chars", "longest-first"])
def test_redaction_replaces_each_secret_whole_with_stars(
    url: str, text: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    sink = HttpSink(HttpSinkConfig(url=url, token_env=TOKEN_ENV))
    sink._token = sink._read_token()  # as open() reads it
    assert sink._redact(text) == expected


async def test_a_base_path_with_a_trailing_slash_and_a_query(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    raw = await raw_server(fixed(400, b""))
    sink = await make_sink(f"{raw.url}/v1/?k=abc")
    with pytest.raises(SinkRejected) as info:
        await sink.write_security_events([sample_security_event("e1")])
    assert raw.targets == ["/v1/security-events?k=abc"]
    assert str(info.value) == f"http sink: POST {raw.url}/v1/security-events: HTTP 400"


@pytest.mark.parametrize(("userinfo", "authorization"), [
    ("", None),  # no token variable, no credentials: no Authorization at all
    ("sinkuser@", "Basic " + base64.b64encode(b"sinkuser:").decode()),  # no password
])
async def test_without_a_token_variable_the_url_alone_says_the_credentials(
    start_receiver: Start, userinfo: str, authorization: str | None
) -> None:
    receiver, url = await start_receiver()
    sink = HttpSink(HttpSinkConfig(url=url.replace("http://", f"http://{userinfo}"), token_env=""))
    await sink.open()
    try:
        await sink.write_part(sample_part("s1"))
    finally:
        await sink.close()
    assert receiver.headers_seen[-1].get("Authorization") == authorization


async def test_a_409_body_that_arrives_in_pieces_is_read_whole(
    raw_server: Callable[[Answer], Awaitable[RawServer]],
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    """The part's own hash, cut in two by the chunks: a duplicate, stored."""
    part = sample_part("s1")
    body = json.dumps({"duplicate": True, "hash": part["hash"]}).encode()
    cut = body.index(part["hash"].encode()) + 8

    async def answer(_: RawServer, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 409 X\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (body[:cut], body[cut:]):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # apart, so most likely read apart (no timing asserted)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    raw = await raw_server(answer)
    sink = await make_sink(raw.url)
    await sink.write_part(part)


async def test_a_url_whose_scheme_is_in_capitals_is_taken(start_receiver: Start) -> None:
    """A scheme is case-insensitive (RFC 3986 3.1), and aiohttp sends to
    ``HTTP://host``: the start refused it ("an http:// or https:// URL is
    required"). It is the same URL, and the same sink, as in lower case."""
    from audit.config import parse_config, sink_identity

    receiver, url = await start_receiver()
    upper = "HTTP://" + url.removeprefix("http://")
    config = parse_config({"sink": {"type": "http", "http": {"url": upper}}})
    assert sink_identity(config) == sink_identity(
        parse_config({"sink": {"type": "http", "http": {"url": url}}}))
    ai = parse_config({"ai": {"provider": "openai",
                              "openai": {"base_url": "HttpS://ai.example/v1"}}})
    assert ai.ai.openai.base_url == "HttpS://ai.example/v1"
    sink = HttpSink(config.sink.http)
    await sink.open()
    try:
        await sink.write_part(sample_part("upper"))
    finally:
        await sink.close()
    assert receiver.urls_seen[-1] == "/sessions"
