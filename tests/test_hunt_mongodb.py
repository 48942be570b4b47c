"""The mongodb sink against what real deployments answer, found by a bug hunt.

Through the real PyMongo driver against the scripted wire-protocol server
of tests/test_sink_mongodb.py (mockupdb), and, for ``mongodb+srv://`` URIs,
a real DNS server on 127.0.0.1 that the driver's resolver (dnspython) asks.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from mockupdb import MockupDB
from test_sink_mongodb import URI_ENV, new_sink, receive, start, start_server, uri

from audit.config import parse_config
from sinks import create_sink
from sinks.base import SinkUnavailable
from sinks.mongodb import MongoSink


class SrvDns:
    """A DNS server (UDP, 127.0.0.1) for one ``mongodb+srv://`` name: the
    name does not exist (NXDOMAIN) until :attr:`up`, then its SRV record
    names ``127.0.0.1`` at ``target_port``; no TXT record.

    The name is ``cluster0.0.1``: PyMongo takes only SRV hosts under the
    name's parent domain (here ``0.1``, which ``127.0.0.1`` ends in), and
    ``srv_host_validator``, to allow another, is only in PyMongo 4.19+."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            question = query.question[0]
            if not self.up:
                answer.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.SRV:
                answer.answer.append(dns.rrset.from_text(
                    question.name, 60, "IN", "SRV", f"0 0 {self.target_port} 127.0.0.1."))
            self.sock.sendto(answer.to_wire(), peer)

    def resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        return resolver

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def fresh_server() -> Iterator[MockupDB]:
    server = start_server()  # no automatic answers: each request is the test's
    try:
        yield server
    finally:
        server.stop()


async def test_srv_name_not_resolving_yet_fails_the_open_and_indexes_come_later(
    fresh_server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``mongodb+srv://`` name is looked up at the first operation, not
    when the client is made. While it does not resolve (a DNS outage, a
    container started before its network, a cluster just created), every
    index build failed with ConfigurationError, which was taken for the
    deployment refusing that index: the open "succeeded", and once the name
    resolved the writes went on but the indexes were never built (the admin
    listings scanned the collections for good; Cosmos DB refuses a sort
    without its index)."""
    server = fresh_server
    srv = SrvDns(server.port)
    try:
        monkeypatch.setattr(dns.asyncresolver, "default_resolver", srv.resolver())
        monkeypatch.setenv(URI_ENV, "mongodb+srv://cluster0.0.1/?tls=false")
        sink = new_sink()
        with pytest.raises(SinkUnavailable, match="DNS query name does not exist"):
            await sink.open()
        assert not server.got(timeout=0)
        srv.up = True  # the flusher opens the sink again: the indexes are built
        task = start(sink.open())
        for _ in range(5):
            (await receive(server, "createIndexes")).replies({"ok": 1})
        await task
        await sink.close()
    finally:
        srv.stop()


async def test_atlas_failed_login_fails_the_open(
    fresh_server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atlas refuses a login with 8000 ``AtlasError``, "bad auth :
    Authentication failed.", not 18. That was taken for Atlas refusing an
    index: five warnings about slower listings hid the failed login, the
    sink "opened", and once the login worked (the database user created or
    its password set) the writes went on without their indexes until a
    restart. Now it fails the open like 18: tried again, the login's error
    shown."""
    server = fresh_server
    monkeypatch.setenv(URI_ENV, f"mongodb://auditor:S3cret-pw@127.0.0.1:{server.port}/"
                                "?authSource=admin")
    # Every login the driver tries (its own SCRAM exchange) is refused.
    server.autoresponds("saslStart", {"ok": 0, "errmsg": "bad auth : Authentication failed.",
                                      "code": 8000, "codeName": "AtlasError"})
    sink = new_sink()
    with pytest.raises(SinkUnavailable, match="bad auth") as info:
        await sink.open()
    assert "S3cret-pw" not in str(info.value)
    await sink.close()


async def test_verify_opens_the_sink_without_building_indexes(
    fresh_server: MockupDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify must change nothing in what it checks, and its read-only role
    may not build indexes: its open built the five query indexes all the
    same (with such a role: five warnings). Read only, the open asks the
    deployment whether it answers (a failure there is verify's "the sink is
    unavailable"), and nothing else."""
    server = fresh_server
    monkeypatch.setenv(URI_ENV, uri(server))
    config = parse_config({"sink": {"type": "mongodb", "mongodb": {"uri_env": URI_ENV}}})
    made = create_sink(config, readonly=True)
    assert isinstance(made, MongoSink) and made.readonly
    sink = new_sink(readonly=True)
    task = start(sink.open())
    (await receive(server, "ping")).ok()
    await task
    task = start(sink.open())  # (opened already: nothing asked)
    await task
    await sink.close()
