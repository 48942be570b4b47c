"""A plain-http sink URL to another machine is warned about at start."""

from __future__ import annotations

import logging

import pytest

from audit.config import parse_config
from sinks import cleartext_to_remote, create_sink


@pytest.mark.parametrize(("url", "warned"), [
    ("http://127.0.0.1:8099/v1", False),
    ("http://[::1]:8099/v1", False),
    ("http://localhost/v1", False),
    ("http://receiver.localhost:8099/v1", False),  # *.localhost is this machine (RFC 6761)
    ("https://audit.example.com/v1", False),
    ("http://audit.example.com/v1", True),
    ("http://10.0.0.7/v1", True),
    ("http://user:pw@192.0.2.1/v1", True),
    ("http://localhost./v1", False),  # (fully qualified)
    ("http://[::ffff:127.0.0.1]:8099/v1", False),  # (IPv4-mapped loopback)
    ("http://[::ffff:10.0.0.7]/v1", True),
])
def test_cleartext_to_remote(url: str, warned: bool, caplog: pytest.LogCaptureFixture) -> None:
    assert cleartext_to_remote(url) is warned
    config = parse_config({"sink": {"type": "http", "http": {"url": url}}})
    with caplog.at_level(logging.WARNING, logger="session_audit.sinks"):
        create_sink(config)
    assert ("clear text" in caplog.text) is warned
    assert "pw" not in caplog.text


@pytest.mark.parametrize(("url", "warned"), [
    ("http://127.0.0.1:11434/v1", False),
    ("https://api.openai.com/v1", False),
    ("http://gpu-box.lan:8000/v1", True),
    ("http://user:pw@192.0.2.1/v1", True),
])
def test_cleartext_ai_provider_is_warned_about(url: str, warned: bool,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A chat sends the whole document, the message and the API key to
    ai.openai.base_url: a plain-http one to another machine is warned about
    at start, like the http sink's (it was not)."""
    from aiohttp import web

    from handlers.ai import create_provider

    config = parse_config({"ai": {"provider": "openai", "openai": {"base_url": url}}})
    with caplog.at_level(logging.WARNING, logger="handlers.ai"):
        create_provider(config, web.Application())
    assert ("clear text" in caplog.text) is warned
    assert "pw" not in caplog.text


URI_ENV = "TEST_CLEARTEXT_MONGODB_URI"


@pytest.mark.parametrize(("uri", "said"), [
    # No TLS towards another machine (the hosts named, never the URI).
    ("mongodb://auditor:pw@db1.example.net:27017,db2.example.net/?replicaSet=rs0",
     "asks for no TLS towards db1.example.net, db2.example.net"),
    ("mongodb://auditor:pw@127.0.0.1,10.0.0.7:27018/", "asks for no TLS towards 10.0.0.7"),
    ("mongodb://[2001:db8::1]:27017/", "asks for no TLS towards 2001:db8::1"),
    ("mongodb+srv://auditor:pw@cluster0.example.net/?tls=false", "asks for no TLS"),
    ("mongodb://db.example.net/?ssl=false", "asks for no TLS"),
    # TLS with its check off.
    ("mongodb+srv://auditor:pw@cluster0.example.net/?tlsAllowInvalidCertificates=true",
     "turns TLS's check off (tlsAllowInvalidCertificates)"),
    ("mongodb://db.example.net/?tls=true&tlsInsecure=true", "(tlsInsecure)"),
    ("mongodb://db.example.net/?TLS=TRUE&tlsallowinvalidhostnames=True",
     "(tlsAllowInvalidHostnames)"),
    # Not warned about: TLS on (mongodb+srv's default), or this machine only.
    ("mongodb+srv://auditor:pw@cluster0.example.net/?retryWrites=true&w=majority", None),
    ("mongodb://db.example.net/?tls=true&tlsCAFile=%2Fetc%2Fca.pem", None),
    ("mongodb://db.example.net/?ssl=true", None),
    ("mongodb://auditor:pw@localhost:27017/", None),
    ("mongodb://127.0.0.1:27017,[::1]:27018/?replicaSet=rs0", None),
    ("mongodb://%2Ftmp%2Fmongodb-27017.sock/", None),
    ("mongodb://localhost.:27017,[::ffff:127.0.0.1]:27018/", None),
])
def test_a_mongodb_uri_without_tls_or_with_its_check_off_is_warned_about(
    uri: str, said: str | None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The audit trail goes to MongoDB as the URI says: one without TLS to
    another machine, or with the certificate check off, is said at start
    (the http sink's plain http:// is; this was not)."""
    monkeypatch.setenv(URI_ENV, uri)
    config = parse_config({"sink": {"type": "mongodb", "mongodb": {"uri_env": URI_ENV}}})
    with caplog.at_level(logging.WARNING, logger="session_audit.sinks"):
        create_sink(config)
    if said is None:
        assert caplog.text == ""
    else:
        assert said in caplog.text
        assert URI_ENV in caplog.text
        assert ":pw@" not in caplog.text and "auditor" not in caplog.text
