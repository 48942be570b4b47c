"""Sinks: where sealed session parts and security events are written."""

from __future__ import annotations

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
    "create_sink",
]


def create_sink(config: Config) -> Sink:
    """The sink named by ``[sink] type``; nothing is connected until ``open()``."""
    kind = config.sink.type
    if kind == "sqlite":
        from .sqlite import SqliteSink

        sink: Sink = SqliteSink(config.sqlite_sink_path)
        return sink
    if kind == "jsonl":
        from .jsonl import JsonlSink

        return JsonlSink(config.jsonl_dir)
    if kind == "http":
        from .http import HttpSink

        return HttpSink(config.sink.http)
    if kind == "mongodb":
        from .mongodb import MongoSink

        return MongoSink(config.sink.mongodb)
    raise ValueError(f"unknown sink type {kind!r}")  # config validation prevents this
