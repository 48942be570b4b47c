"""Sinks: where sealed session parts and security events are written."""

from __future__ import annotations

import ipaddress
import logging
import os
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
    "mongodb_tls_weakness",
    "mongodb_uri_options",
]

log = logging.getLogger("session_audit.sinks")


def cleartext_to_remote(url: str) -> bool:
    """An ``http://`` URL whose host is not a loopback address or ``localhost``."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "http" and not _local(parts.hostname or "")


def _local(host: str) -> bool:
    """A host of this machine: loopback, ``localhost``, or a Unix socket's
    path (a MongoDB URI's ``%2Ftmp%2Fmongodb-27017.sock``)."""
    host = host.lower()
    if host.startswith("/"):
        return True
    host = host.rstrip(".")  # (a fully qualified name: "localhost.")
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


# A MongoDB URI's options that turn the certificate or host name check off.
_MONGODB_UNCHECKED = ("tlsInsecure", "tlsAllowInvalidCertificates", "tlsAllowInvalidHostnames")


def mongodb_uri_options(uri: str) -> list[tuple[str, str]]:
    """A MongoDB URI's options as PyMongo reads them: each key lower-cased,
    each value %-decoded (``+`` a space), in the URI's order."""
    options = []
    for pair in uri.partition("?")[2].replace(";", "&").split("&"):
        key, _, value = pair.partition("=")
        options.append((urllib.parse.unquote_plus(key).strip().lower(),
                        urllib.parse.unquote_plus(value)))
    return options


def mongodb_tls_weakness(uri: str) -> str | None:
    """What a MongoDB URI leaves open on the network: no TLS towards a host
    that is not this machine, or TLS with its check turned off; None when
    neither. Names the hosts or the options, never the URI (it holds the
    password). Read by hand: PyMongo's parser looks a ``mongodb+srv://``
    name up in DNS, and the sink reports a URI it cannot use when it opens."""
    scheme, _, rest = uri.partition("://")
    hosts = rest.partition("?")[0].split("/", 1)[0].rpartition("@")[2]
    # (the last of an option given twice wins, as in PyMongo)
    options = {key: value.strip().lower() for key, value in mongodb_uri_options(uri)}
    tls = options.get("tls", options.get("ssl", "true" if scheme == "mongodb+srv" else "false"))
    if tls != "true":
        remote = []
        for host in filter(None, hosts.split(",")):
            name = (host[1:host.index("]")] if host.startswith("[") and "]" in host
                    else host.rsplit(":", 1)[0])
            if not _local(urllib.parse.unquote(name)):
                remote.append(name)
        if remote:
            return f"asks for no TLS towards {', '.join(remote)}"
        return None
    unchecked = [k for k in _MONGODB_UNCHECKED if options.get(k.lower()) == "true"]
    if unchecked:
        return f"turns TLS's check off ({', '.join(unchecked)})"
    return None


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

        weakness = mongodb_tls_weakness(os.environ.get(config.sink.mongodb.uri_env, ""))
        if weakness is not None:
            log.warning("the MongoDB URI in %s %s: anyone on the path can read the audit"
                        " trail, and pose as the server to drop it; use tls=true (the"
                        " default with mongodb+srv://) and a tlsCAFile for a private CA",
                        config.sink.mongodb.uri_env, weakness)
        return MongoSink(config.sink.mongodb, readonly=readonly)
    raise ValueError(f"unknown sink type {kind!r}")  # config validation prevents this
