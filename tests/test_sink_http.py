"""The http sink's fault handling, against the real receiver in tests/receiver.py."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web
from receiver import Fault, Receiver, ReceiverOptions, sample_part, sample_security_event, serve

from audit.config import HttpSinkConfig
from sinks.base import (
    SinkConflict,
    SinkError,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
)
from sinks.http import HttpSink, _strip_userinfo, parse_retry_after

TOKEN = "tok-9f8e7d6c5b4a-secret"
TOKEN_ENV = "SESSION_AUDIT_TEST_HTTP_TOKEN"
NOW = 1_764_167_467.0  # 2025-11-26T14:31:07Z

Start = Callable[..., Awaitable[tuple[Receiver, str]]]


@pytest.fixture
async def start_receiver() -> AsyncIterator[Start]:
    started: list[tuple[Receiver, web.AppRunner]] = []

    async def start(**options: object) -> tuple[Receiver, str]:
        receiver = Receiver(ReceiverOptions(**options))  # type: ignore[arg-type]
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
    assert "HTTP 409" in str(info.value) and "another hash" in str(info.value)
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
    assert "HTTP 308" in text and "redirect to https://moved.example/v1/sessions" in text
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


async def test_timeout_is_unavailable_and_the_retry_is_idempotent(
    start_receiver: Start, make_sink: Callable[..., Awaitable[HttpSink]]
) -> None:
    receiver, url = await start_receiver(hang_seconds=30.0)
    sink = await make_sink(url, timeout_seconds=1.0)
    part = sample_part("slow")
    receiver.script(Fault(hang=True, apply=True))
    # A guard, not a timing: without its own timeout the write would hang 30 s.
    with pytest.raises(SinkUnavailable, match=r"no answer within 1 s"):
        async with asyncio.timeout(20):
            await sink.write_part(part)
    assert receiver.parts == {"slow:0": part}  # it landed although we timed out
    await sink.write_part(part)  # the retry: a duplicate, so success
    assert receiver.parts == {"slow:0": part}
    assert receiver.stats["status_409"] == 1


async def test_connection_refused_is_unavailable(
    make_sink: Callable[..., Awaitable[HttpSink]],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = await make_sink(f"http://127.0.0.1:{port}")
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
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"listening on http://127.0.0.1:"), line
        sink = await make_sink(line.split()[-1].decode())
        part = sample_part("cli")
        await sink.write_part(part)
        await sink.write_part(part)
        await sink.write_security_events([sample_security_event("cli-e")])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
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
