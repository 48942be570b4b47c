"""Configuration: frozen dataclasses built once by :func:`load_config`.

Nothing else in the project reads TOML or the configuration environment.
Every error names the offending key (``audit.part_max_events``), so an
operator can fix the file without reading code.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

CONFIG_ENV = "SESSION_AUDIT_CONFIG"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "data"
    # Behind a load balancer: its addresses (comma-separated IPs or CIDR
    # ranges). A request from one of them is attributed to the rightmost
    # address of X-Forwarded-For that is not a trusted proxy. Empty: the
    # connection's address, X-Forwarded-For ignored.
    trusted_proxies: str = ""
    # A graceful shutdown lets requests in flight run this long, then cancels
    # them (a chat waiting on its provider); a request body still arriving
    # is cut off at half of it.
    shutdown_grace_seconds: float = 20.0

    def proxy_networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.trusted_proxies)


@dataclass(frozen=True)
class AuthConfig:
    token_ttl_seconds: int = 3600
    bcrypt_rounds: int = 12
    login_max_failures: int = 5
    login_window_seconds: int = 300
    # The shortest password adduser, passwd and SESSION_AUDIT_ADMIN_PASSWORD
    # take: NIST SP 800-63B-4 asks 15 for a password that is the only factor
    # (8 where it is one of several, as rev. 3 asked of every password).
    min_password_chars: int = 8


@dataclass(frozen=True)
class AuditConfig:
    ack: Literal["durable", "fast"] = "durable"
    synchronous: Literal["full", "normal"] = "full"
    idle_timeout_seconds: float = 1800
    max_session_seconds: float = 43200
    part_max_events: int = 500
    part_max_bytes: int = 1048576
    checkpoint_seconds: float = 900
    spool_max_bytes: int = 1073741824
    on_spool_full: Literal["reject", "accept"] = "reject"
    keep_stored_seconds: float = 0
    capture_ai_content: bool = False
    # Opt-in: the command line's changes of accounts (adduser, passwd,
    # disable, enable) as security events `user.*`, which API.md's list of
    # security events does not have. Off, the changes wait in the spool.
    record_account_changes: bool = False
    # Opt-in flood guard: security events of callers without a valid session
    # that one client IP may have recorded one by one (a token bucket); past
    # it they are counted into summary events. 0 (default): every one recorded.
    security_events_per_ip_per_second: float = 0.0
    security_events_per_ip_burst: int = 200


@dataclass(frozen=True)
class FlushConfig:
    max_writes_per_second: float = 5.0
    burst: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class SqliteSinkConfig:
    path: str = ""


@dataclass(frozen=True)
class MongoSinkConfig:
    uri_env: str = "SESSION_AUDIT_MONGODB_URI"
    database: str = "audit"
    sessions_collection: str = "session_audit"
    security_collection: str = "security_audit"


@dataclass(frozen=True)
class JsonlSinkConfig:
    dir: str = ""


@dataclass(frozen=True)
class HttpSinkConfig:
    url: str = ""
    token_env: str = "SESSION_AUDIT_HTTP_TOKEN"
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class SinkConfig:
    type: Literal["sqlite", "mongodb", "jsonl", "http"] = "sqlite"
    sqlite: SqliteSinkConfig = field(default_factory=SqliteSinkConfig)
    mongodb: MongoSinkConfig = field(default_factory=MongoSinkConfig)
    jsonl: JsonlSinkConfig = field(default_factory=JsonlSinkConfig)
    http: HttpSinkConfig = field(default_factory=HttpSinkConfig)


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class AIConfig:
    provider: Literal["extractive", "openai"] = "extractive"
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    flush: FlushConfig = field(default_factory=FlushConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    ai: AIConfig = field(default_factory=AIConfig)
    # Where relative paths are resolved; not a TOML key.
    base_dir: str = field(default=".", metadata={"internal": True})

    @property
    def data_dir(self) -> Path:
        return (Path(self.base_dir) / _file_name(self.server.data_dir)).resolve()

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool.db"

    @property
    def sqlite_sink_path(self) -> Path:
        p = self.sink.sqlite.path
        return (Path(self.base_dir) / _file_name(p)).resolve() if p else self.data_dir / "audit.db"

    @property
    def jsonl_dir(self) -> Path:
        d = self.sink.jsonl.dir
        return ((Path(self.base_dir) / _file_name(d)).resolve() if d
                else self.data_dir / "audit-jsonl")


def _file_name(text: str) -> str:
    """A path from the file (TOML is UTF-8) as the file system name of its
    UTF-8 bytes, whatever the locale: under one that is not UTF-8 (LC_ALL=C
    with PYTHONUTF8=0, a Latin-1 one) Python encodes names in the locale's
    encoding, which made ``data_dir = "données"`` a UnicodeEncodeError
    traceback at every command, or another directory than the server's
    under a UTF-8 locale. Unchanged under a UTF-8 locale."""
    return os.fsdecode(text.encode("utf-8"))


# Durations end as dates (a token's expiry, a pause's end), formatted as
# RFC 3339 times: ten years is past any sensible setting, far from year 9999.
MAX_SECONDS = 10 * 366 * 86400


def _positive_seconds() -> tuple[Any, str]:
    return (lambda v: 0 < v <= MAX_SECONDS,
            f"must be positive and at most {MAX_SECONDS} (ten years)")


def _at_least_seconds(least: float) -> tuple[Any, str]:
    return (lambda v: least <= v <= MAX_SECONDS,
            f"must be from {least:g} to {MAX_SECONDS} (ten years)")


# MongoDB's rules for names: a database name has none of / \ . " $ (nor a
# space or NUL) and at most 63 bytes; a collection name no $ or NUL, does not
# start with "system.", and is not empty.
_MONGO_DB_BAD = set('/\\. "$\0')


def _mongo_database(name: str) -> bool:
    return 0 < len(name.encode("utf-8")) < 64 and not set(name) & _MONGO_DB_BAD


def _mongo_collection(name: str) -> bool:
    return (name.strip() != "" and "$" not in name and "\0" not in name
            and not name.startswith("system."))


_COLLECTION = (_mongo_collection, "must be a MongoDB collection name (not empty, no $ or NUL,"
               " not starting with system.)")

# The keys that name the environment variable holding a secret. A secret
# pasted into one by mistake (a MongoDB URI with its password, a token) is
# refused without being quoted: the message goes to the log.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_KEYS = frozenset({"sink.mongodb.uri_env", "sink.http.token_env", "ai.openai.api_key_env"})
# Keys whose value is never quoted in a message: those above, and the URLs,
# which may hold a password.
_UNQUOTED = _ENV_KEYS | {"sink.http.url", "ai.openai.base_url"}
_ENV_CHECK = (lambda v: v == "" or _ENV_NAME.fullmatch(v) is not None,
              "must be the name of an environment variable (letters, digits and _), not"
              " what it holds; the value is not shown")

# Range checks: key -> (predicate, message).
# BSON spends up to 5 bytes for 1 of JSON (an array of small numbers: each
# element carries its type, its index as a string and 4 bytes); MongoDB takes
# 16 MiB per document.
MONGODB_PART_MAX_BYTES = 3 * 1024 * 1024

_CHECKS: dict[str, tuple[Any, str]] = {
    # Not 0: the OS would pick a port that nothing (the log included) names.
    "server.port": (lambda v: 1 <= v <= 65535, "must be between 1 and 65535"),
    "server.data_dir": (lambda v: v != "", "must not be empty"),
    # An empty host listens on every interface: say so with 0.0.0.0 or ::
    # (one family each: a socket on :: takes IPv6 only, as asyncio's does).
    "server.host": (lambda v: v.strip() != "",
                    "must not be empty (0.0.0.0 listens on every IPv4 interface,"
                    " :: on every IPv6 one)"),
    "server.shutdown_grace_seconds": _positive_seconds(),
    "auth.token_ttl_seconds": _at_least_seconds(1),
    "auth.bcrypt_rounds": (lambda v: 4 <= v <= 31, "must be between 4 and 31"),
    "auth.login_max_failures": (lambda v: v >= 1, "must be at least 1"),
    "auth.login_window_seconds": _at_least_seconds(1),
    # (1024: the longest password a login takes, handlers.auth.MAX_PASSWORD_CHARS)
    "auth.min_password_chars": (lambda v: 8 <= v <= 1024, "must be between 8 and 1024"),
    "audit.idle_timeout_seconds": _positive_seconds(),
    "audit.max_session_seconds": _positive_seconds(),
    "audit.part_max_events": (lambda v: v >= 1, "must be at least 1"),
    "audit.part_max_bytes": (lambda v: v >= 4096, "must be at least 4096"),
    "audit.checkpoint_seconds": _positive_seconds(),
    # An empty spool's own tables and indexes take about 120 KiB (30 pages of 4 KiB):
    # the smallest limit leaves room for a few KiB of events only.
    "audit.spool_max_bytes": (lambda v: v >= 131072,
                              "must be at least 131072 (an empty spool takes about 120 KiB)"),
    "audit.keep_stored_seconds": (lambda v: 0 <= v <= MAX_SECONDS,
                                  f"must be from 0 to {MAX_SECONDS} (ten years)"),
    "audit.security_events_per_ip_per_second": (lambda v: v >= 0, "must not be negative"),
    "audit.security_events_per_ip_burst": (lambda v: v >= 1, "must be at least 1"),
    "flush.max_writes_per_second": (lambda v: v > 0, "must be positive"),
    "flush.burst": (lambda v: v >= 1, "must be at least 1"),
    "flush.backoff_base_seconds": _positive_seconds(),
    "flush.backoff_max_seconds": _positive_seconds(),
    "sink.http.timeout_seconds": _positive_seconds(),
    "ai.openai.timeout_seconds": _positive_seconds(),
    "sink.mongodb.database": (_mongo_database, "must be a MongoDB database name (1 to 63"
                              " bytes, none of / \\ . \" $, no space)"),
    "sink.mongodb.sessions_collection": _COLLECTION,
    "sink.mongodb.security_collection": _COLLECTION,
    **dict.fromkeys(_ENV_KEYS, _ENV_CHECK),
}


def _convert(key: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not (
            -(2**63) <= value < 2**63):
        # TOML's integers are 64-bit, and one past them an error; tomllib
        # takes any (a 400-digit one was math.isfinite's OverflowError, a
        # traceback for a number key).
        raise ConfigError(f"{key}: an integer past TOML's 64-bit range (-2**63 to 2**63 - 1)")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            got = (f"{_toml_type(value)} (the value is not shown)" if key in _UNQUOTED
                   else repr(value))
            raise ConfigError(f"{key}: expected a string, got {got}")
        return value
    raise ConfigError(f"{key}: unsupported setting")  # pragma: no cover - schema bug


def _toml_type(value: Any) -> str:
    """What a TOML value is, in words (bool before int: it is one)."""
    for kind, words in ((bool, "true or false"), (int, "an integer"), (float, "a number"),
                        (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return words
    return "a date or time"


def _build(cls: type[Any], data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    for name in data:
        if name not in known:
            full = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{full}: unknown key")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _convert(key, hint, value)
            check = _CHECKS.get(key)
            if check and not check[0](kwargs[name]):
                got = "" if key in _ENV_KEYS else f" (got {value!r})"
                raise ConfigError(f"{key}: {check[1]}{got}")
    return cls(**kwargs)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, 192.0.2.1"`` -> networks; ValueError on a bad entry.
    IPv4-mapped IPv6 ranges (``::ffff:10.0.0.0/104``) become their IPv4 range:
    addresses are compared in their IPv4 form."""
    out: list[IPNetwork] = []
    for part in text.split(","):
        if not part.strip():
            continue
        net = ipaddress.ip_network(part.strip(), strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            net = ipaddress.IPv4Network((mapped, max(0, net.prefixlen - 96)))
        out.append(net)
    return tuple(out)


def _validate(config: Config) -> None:
    if config.sink.type == "mongodb" and not config.sink.mongodb.uri_env:
        raise ConfigError("sink.mongodb.uri_env: must name the environment variable that"
                          " holds the MongoDB URI")
    for key, value, path in (
        ("server.data_dir", config.server.data_dir, "data_dir"),
        ("sink.sqlite.path", config.sink.sqlite.path, "sqlite_sink_path"),
        ("sink.jsonl.dir", config.sink.jsonl.dir, "jsonl_dir"),
    ):
        if "\0" in value:  # TOML's \u0000: no path has one (Path.resolve raised ValueError)
            # (Of a sink not in use too: a bad value, and it was resolved by
            # handlers.errors.without_paths, a 500 for /readyz not ready.)
            raise ConfigError(f"{key}: must not contain a NUL character")
        if key.startswith("sink.") and key.split(".")[1] != config.sink.type:
            continue  # (not used: its file system is not looked at)
        try:
            resolved = getattr(config, path)
        except RuntimeError:  # Path.resolve on a loop of symbolic links (Python < 3.13)
            raise ConfigError(f"{key}: {value!r} leads into a loop of symbolic links"
                              ) from None
        # Python 3.13's Path.resolve no longer stats the path it made, nor
        # raises for a loop: the check it did (ELOOP) is made here. Without
        # it, serve with a sink path into a loop ran on, every flush failing.
        try:
            os.stat(resolved)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{key}: {value!r} leads into a loop of symbolic links"
                                  ) from None
    try:
        config.server.proxy_networks()
    except ValueError as exc:
        raise ConfigError(f"server.trusted_proxies: {exc}") from None
    if config.flush.backoff_max_seconds < config.flush.backoff_base_seconds:
        raise ConfigError("flush.backoff_max_seconds: must not be below backoff_base_seconds")
    if config.sink.type == "sqlite" and config.sqlite_sink_path == config.spool_path.resolve():
        raise ConfigError("sink.sqlite.path: must not be the spool's file"
                          f" ({config.spool_path})")
    m = config.sink.mongodb
    if config.sink.type == "mongodb" and m.sessions_collection == m.security_collection:
        raise ConfigError("sink.mongodb.security_collection: must not be sessions_collection"
                          f" ({m.sessions_collection!r})")
    if config.sink.type == "mongodb" and config.audit.part_max_bytes > MONGODB_PART_MAX_BYTES:
        raise ConfigError(
            f"audit.part_max_bytes: at most {MONGODB_PART_MAX_BYTES} with the mongodb sink"
            " (a part's BSON can be up to 5 times its JSON, and MongoDB takes 16 MiB"
            " per document)")
    if config.sink.type == "http":
        _check_url("sink.http.url", config.sink.http.url)
    if config.ai.provider == "openai":
        _check_url("ai.openai.base_url", config.ai.openai.base_url)


def _check_url(key: str, url: str) -> None:
    """An http(s) URL with a host and, if any, a valid port. The message
    never quotes the URL: it may hold a password. The scheme in any case
    (RFC 3986: ``HTTPS://`` is ``https://``), as aiohttp takes it."""
    if not url[:8].lower().startswith(("http://", "https://")):
        raise ConfigError(f"{key}: an http:// or https:// URL is required")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        # Not the parser's words: they quote what it took for a port, which
        # is a password with a # / or ? in it, cut short.
        raise ConfigError(f"{key}: not a valid URL (its host or port cannot be read;"
                          " characters such as # / ? @ in a user or password must be"
                          " %-escaped)") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: the URL names no host")


def path_text(path: Path) -> str:
    """``path`` as text that can be stored, compared and sent. A name whose
    bytes do not decode in the file system's encoding (a Latin-1 directory
    name under UTF-8; any non-ASCII name under a locale that is not UTF-8)
    holds lone surrogates as Python text, which neither SQLite nor UTF-8
    takes. Its bytes are read as UTF-8 here (what :func:`_file_name` makes
    of the file's text, under any locale: under a Latin-1 one, its ``str``
    is those bytes read as Latin-1), and those that are not UTF-8 shown as
    ``\\xNN``; any other path is its ``str`` unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sink_where(config: Config) -> str:
    """Which sink of its type, without secrets: its file or directory, its URL
    without credentials or query, its database and collections."""
    sink = config.sink
    if sink.type == "sqlite":
        return path_text(config.sqlite_sink_path)
    if sink.type == "jsonl":
        return path_text(config.jsonl_dir)
    if sink.type == "http":
        u = urlsplit(sink.http.url)
        return urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path.rstrip("/"), "", ""))
    m = sink.mongodb
    return f"{m.database}.{m.sessions_collection}, {m.database}.{m.security_collection}"


def sink_identity(config: Config) -> str:
    """The configured sink as the spool remembers it: its type and where."""
    return f"{config.sink.type} {sink_where(config)}"


def open_window(config: Config) -> float:
    """How long after its start a session may still look open in a sink (its
    final part not there yet): the longest session, and a day for a reaper
    that was down or a final part waiting for a sink that was. Past that,
    verify takes a missing final part as removed; within it, sessions stored
    whole are remembered in the spool, so that verify can tell."""
    return config.audit.max_session_seconds + 86400


def parse_config(data: dict[str, Any], base_dir: str = ".") -> Config:
    """Build a validated :class:`Config` from a parsed TOML document."""
    config: Config = _build(Config, data, "")
    config = dataclasses.replace(config, base_dir=base_dir)
    _validate(config)
    return config


def resolve_config_path(path: str | None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path("config.toml")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration file; a missing default file (no file, nor a
    link to one) means all defaults.

    Relative paths inside it (``data_dir``, sink paths) are relative to the
    working directory, as API.md says.
    """
    # An empty --config or SESSION_AUDIT_CONFIG is no choice (as resolve_config_path
    # takes it): the default file, or all defaults without it.
    explicit = bool(path) or bool(os.environ.get(CONFIG_ENV))
    p = resolve_config_path(os.fspath(path) if path is not None else None)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        # A symbolic link to a file that is gone was a choice too: not the
        # defaults, in another directory than the operator's, without a word.
        if explicit or p.is_symlink():
            raise ConfigError(f"config file {p} does not exist") from None
        return parse_config({}, base_dir=os.getcwd())
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except ValueError:
        # tomllib's int() on more than 4300 digits (Python's limit on reading
        # integers), not a TOMLDecodeError: its words advise a Python call.
        raise ConfigError(f"{p}: not valid TOML: an integer past TOML's 64-bit range"
                          " (-2**63 to 2**63 - 1)") from None
    except RecursionError:
        # tomllib reads nested arrays and inline tables by recursion: a few
        # hundred levels were a traceback.
        raise ConfigError(f"{p}: not valid TOML: arrays or tables nested too deeply") from None
    return parse_config(data, base_dir=os.getcwd())
