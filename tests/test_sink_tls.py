"""TLS towards the sinks: the receiver's or deployment's certificate is checked.

An audit sink that took any certificate would let whoever is on the path
read the audit trail, and drop it while answering 2xx. The http sink uses
aiohttp's default context (``ssl.create_default_context()``: the system's
CAs, or ``SSL_CERT_FILE``, host names checked); the mongodb sink passes the
URI's ``tls``/``tlsCAFile`` to PyMongo and sets no TLS option of its own.
Certificates are made per test run by ``trustme``; the servers are real
ones on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pymongo.common
import pytest
import trustme
from aiohttp import web
from mockupdb import MockupDB
from receiver import Fault, Receiver, sample_part, serve
from test_sink_mongodb import HELLO, answer_create_indexes

from audit.config import HttpSinkConfig, MongoSinkConfig
from sinks.base import SinkUnavailable
from sinks.http import HttpSink
from sinks.mongodb import MongoSink

TOKEN = "tok-tls-7a6b5c4d3e2f-secret"
TOKEN_ENV = "SESSION_AUDIT_TEST_TLS_TOKEN"
QUERY_KEY = "qk-0f1e2d3c4b5a-secret"
MONGO_ENV = "SESSION_AUDIT_TEST_TLS_MONGODB_URI"
MONGO_PASSWORD = "pw-9z8y7x6w-secret"

StartTls = Callable[..., Awaitable[list[int]]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture
async def tls_sites() -> AsyncIterator[StartTls]:
    """Serve a receiver over TLS on loopback, one site (port) per context."""
    runners: list[web.AppRunner] = []

    async def start(receiver: Receiver, *contexts: ssl.SSLContext) -> list[int]:
        runner = web.AppRunner(receiver.app(), shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        runners.append(runner)
        ports = []
        for ctx in contexts:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
            await site.start()
            assert site._server is not None
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return ports

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


# -- http sink ------------------------------------------------------------------


async def test_http_sink_refuses_a_receiver_whose_certificate_it_does_not_trust(
    ca: trustme.CA, tls_sites: StartTls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A certificate from a CA this process does not trust (the test's own):
    nothing is sent, the write is unavailable (retried, never stored nor
    dead-lettered), and the message says why without the token or the
    URL's query."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    receiver = Receiver()
    [port] = await tls_sites(receiver, server_context(ca, "127.0.0.1"))
    sink = HttpSink(HttpSinkConfig(url=f"https://127.0.0.1:{port}/?key={QUERY_KEY}",
                                   token_env=TOKEN_ENV, timeout_seconds=5.0))
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable) as info:
            await sink.write_part(sample_part("untrusted"))
    finally:
        await sink.close()
        receiver.close()
    text = str(info.value)
    assert "certificate verify failed" in text, text
    assert TOKEN not in text and QUERY_KEY not in text, text
    assert receiver.stats["requests"] == 0 and not receiver.parts


# Runs the sink in a process of its own, on uvloop as `serve` does: aiohttp
# builds its default SSL context when it is imported, so SSL_CERT_FILE must
# be in the environment the process starts with (as systemd's is).
_WRITER = """
import asyncio, json, sys
import uvloop
from audit.config import HttpSinkConfig
from sinks.base import SinkError
from sinks.http import HttpSink

async def main() -> None:
    out = []
    for url, part in json.loads(sys.argv[1]):
        sink = HttpSink(HttpSinkConfig(url=url, token_env=sys.argv[2], timeout_seconds=5.0))
        await sink.open()
        try:
            await sink.write_part(part)
            out.append("stored")
        except SinkError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
        finally:
            await sink.close()
    print(json.dumps(out))

uvloop.run(main())
"""


async def test_http_sink_trusts_a_private_ca_through_ssl_cert_file(
    ca: trustme.CA, tls_sites: StartTls, tmp_path: Path,
) -> None:
    """With the CA in SSL_CERT_FILE: a certificate for the URL's host is
    stored; one for another host name is still refused (unavailable); an
    https receiver's redirect to plain http is not followed."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver, plain = Receiver(), Receiver()
    trusted_port, other_host_port = await tls_sites(
        receiver, server_context(ca, "127.0.0.1"), server_context(ca, "receiver.example"))
    plain_runner, plain_port = await serve(plain, "127.0.0.1", 0)
    receiver.script(Fault(308, {"Location": f"http://127.0.0.1:{plain_port}/sessions"}))
    writes = [
        (f"https://127.0.0.1:{trusted_port}/?key={QUERY_KEY}", sample_part("redirected")),
        (f"https://127.0.0.1:{trusted_port}/?key={QUERY_KEY}", sample_part("trusted")),
        (f"https://127.0.0.1:{other_host_port}/?key={QUERY_KEY}", sample_part("other-host")),
    ]
    env = {**os.environ, "SSL_CERT_FILE": str(ca_file), TOKEN_ENV: TOKEN}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, json.dumps(writes), TOKEN_ENV,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        receiver.close()
        plain.close()
        await plain_runner.cleanup()
    assert proc.returncode == 0, err.decode()
    redirected, trusted, other_host = json.loads(out)
    assert redirected.startswith("SinkUnavailable: "), redirected
    assert "HTTP 308: redirect to http://127.0.0.1" in redirected, redirected
    assert plain.stats["requests"] == 0
    assert trusted == "stored"
    assert other_host.startswith("SinkUnavailable: "), other_host
    assert "certificate verify failed" in other_host, other_host
    assert "mismatch" in other_host, other_host
    for text in (redirected, other_host):
        assert TOKEN not in text and QUERY_KEY not in text, text
    assert list(receiver.parts) == [sample_part("trusted")["_id"]]


# -- mongodb sink ---------------------------------------------------------------


async def _open_fails(uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The message of the SinkUnavailable that opening the sink on ``uri`` raises."""
    monkeypatch.setenv(MONGO_ENV, uri)
    sink = MongoSink(MongoSinkConfig(uri_env=MONGO_ENV),
                     server_selection_timeout_ms=1000, connect_timeout_ms=5000)
    try:
        with pytest.raises(SinkUnavailable) as info:
            await sink.open()
    finally:
        await sink.close()
    text = str(info.value)
    assert MONGO_PASSWORD not in text and "auditor" not in text, text
    return text


async def test_mongodb_sink_tls_failures_are_unavailable_and_name_no_credentials(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tls=true`` towards a server that does not speak TLS, towards one
    whose CA is not trusted, and towards one trusted through ``tlsCAFile``
    whose certificate names another host: each is unavailable (the open is
    retried), says why, and shows neither user nor password.

    ``loadBalanced=true`` has the open's own command connect (no monitor
    connects in the background): the error comes at once rather than at the
    server selection timeout, and no connect is left pending when the client
    closes (PyMongo 4.20.1 leaves the socket of a cancelled connect to the
    garbage collector, a ResourceWarning in some later test)."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):  # ssl.SSLError is one
            await reader.read(1)
        writer.close()

    plain = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    other_host = await asyncio.start_server(
        hang_up, "127.0.0.1", 0, ssl=server_context(ca, "mongo.example"))
    try:
        user = f"auditor:{MONGO_PASSWORD}@127.0.0.1"
        plain_port = plain.sockets[0].getsockname()[1]
        tls_port = other_host.sockets[0].getsockname()[1]
        tls = "tls=true&loadBalanced=true"
        text = await _open_fails(f"mongodb://{user}:{plain_port}/?{tls}", monkeypatch)
        assert "SSL handshake failed" in text, text
        text = await _open_fails(f"mongodb://{user}:{tls_port}/?{tls}", monkeypatch)
        assert "certificate verify failed" in text, text
        text = await _open_fails(
            f"mongodb://{user}:{tls_port}/?{tls}&tlsCAFile={ca_file}", monkeypatch)
        assert "certificate verify failed" in text and "mismatch" in text, text
    finally:
        for server in (plain, other_host):
            server.close()
            await server.wait_closed()


async def test_mongodb_sink_opens_once_its_ca_file_is_put_right(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An open refused for a CA file that does not hold the deployment's CA
    (the certificate check fails) opens once the operator has put the right
    CA into that file: the next open reads it, as a new client does, not a
    client kept from the failed open with the old file's context."""
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # another CA's
    server = MockupDB(auto_ismaster=HELLO, request_timeout=10)
    server.run()
    answer_create_indexes(server)

    async def forward(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """TLS ends here; the bytes go on in the clear to the MockupDB."""
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(forward(reader, up_writer), forward(up_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0,
                                       ssl=server_context(ca, "127.0.0.1"))
    port = proxy.sockets[0].getsockname()[1]
    monkeypatch.setenv(MONGO_ENV, f"mongodb://127.0.0.1:{port}/?tls=true&tlsCAFile={ca_file}")
    monkeypatch.setattr(pymongo.common, "MIN_HEARTBEAT_INTERVAL", 0.02)
    sink = MongoSink(MongoSinkConfig(uri_env=MONGO_ENV),
                     server_selection_timeout_ms=200, connect_timeout_ms=2000)
    try:
        with pytest.raises(SinkUnavailable, match="certificate verify failed"):
            await sink.open()
        ca.cert_pem.write_to_path(str(ca_file))
        for _ in range(20):  # (a bound: 0.2 s each)
            with contextlib.suppress(SinkUnavailable):
                await sink.open()
                break
        else:
            await sink.open()
    finally:
        await sink.close()
        proxy.close()
        await proxy.wait_closed()
        server.stop()
