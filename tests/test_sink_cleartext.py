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
