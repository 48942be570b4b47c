"""Sinks: where sealed session parts and security events are written."""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse

from audit.config import Config

from .base import (
    QueryNotSupported,
    Sink,
    SinkConflict,
    SinkError,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
)

__all__ = [
    "QueryNotSupported",
    "Sink",
    "SinkConflict",
    "SinkError",
    "SinkRateLimited",
    "SinkRejected",
    "SinkUnavailable",
    "cleartext_to_remote",
    "create_sink",
]

log = logging.getLogger("session_audit.sinks")


def cleartext_to_remote(url: str) -> bool:
    """An ``http://`` URL whose host is not a loopback address or ``localhost``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def create_sink(config: Config, *, readonly: bool = False) -> Sink:
    """The sink named by ``[sink] type``; nothing is connected until ``open()``.
    With ``readonly`` (verify), the sqlite sink opens its file read only, the
    jsonl sink creates, locks and repairs nothing, and the mongodb sink builds
    no index (verify must not change what it checks)."""
    kind = config.sink.type
    if kind == "sqlite":
        from .sqlite import SqliteSink

        sink: Sink = SqliteSink(config.sqlite_sink_path, readonly=readonly)
        return sink
    if kind == "jsonl":
        from .jsonl import JsonlSink

        return JsonlSink(config.jsonl_dir, readonly=readonly)
    if kind == "http":
        from .http import HttpSink

        if cleartext_to_remote(config.sink.http.url):
            log.warning("sink.http.url is plain http:// to a host that is not this machine:"
                        " the audit trail and its bearer token travel in clear text;"
                        " use https://")
        return HttpSink(config.sink.http)
    if kind == "mongodb":
        from .mongodb import MongoSink

        return MongoSink(config.sink.mongodb, readonly=readonly)
    raise ValueError(f"unknown sink type {kind!r}")  # config validation prevents this
