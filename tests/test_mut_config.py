"""Configuration gaps a mutation run found: the boundaries of every range
(the last valid value is taken, the first invalid one refused), the exact
words of the errors (the key, the value where it may be shown, never where it
may be a secret), and the paths, networks and sink names built from it."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest

from audit.config import (
    CONFIG_ENV,
    MAX_SECONDS,
    ConfigError,
    load_config,
    parse_config,
    path_text,
    sink_identity,
    sink_where,
)


def _set(key: str, value: object) -> dict:
    """``{"a": {"b": {"c": value}}}`` from ``"a.b.c"``."""
    data: dict = {}
    node = data
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _get(config: object, key: str) -> object:
    for part in key.split("."):
        config = getattr(config, part)
    return config


# (key, the smallest valid value, the largest valid value); the values just
# outside are refused (below: the next integer, or 0 for a positive float).
POSITIVE_SECONDS = [
    "server.shutdown_grace_seconds", "audit.idle_timeout_seconds",
    "audit.max_session_seconds", "audit.checkpoint_seconds",
    "flush.backoff_base_seconds", "flush.backoff_max_seconds",
    "sink.http.timeout_seconds", "ai.openai.timeout_seconds",
]


@pytest.mark.parametrize("key", POSITIVE_SECONDS)
def test_a_duration_is_positive_and_at_most_ten_years(key):
    small = {"flush.backoff_max_seconds": 0.5}.get(key, 0.001)  # not below the base
    assert _get(parse_config(_set(key, small)), key) == small
    top = _set(key, MAX_SECONDS)
    if key == "flush.backoff_base_seconds":
        top["flush"]["backoff_max_seconds"] = MAX_SECONDS
    assert _get(parse_config(top), key) == MAX_SECONDS
    for bad in (0, -1, MAX_SECONDS + 0.5):
        with pytest.raises(ConfigError) as info:
            parse_config(_set(key, bad))
        assert str(info.value) == (f"{key}: must be positive and at most {MAX_SECONDS}"
                                   f" (ten years) (got {bad!r})")


@pytest.mark.parametrize(
    ("key", "least", "most"),
    [
        ("server.port", 1, 65535),
        ("auth.token_ttl_seconds", 1, MAX_SECONDS),
        ("auth.login_window_seconds", 1, MAX_SECONDS),
        ("auth.bcrypt_rounds", 4, 31),
        ("auth.min_password_chars", 8, 1024),
        ("audit.keep_stored_seconds", 0, MAX_SECONDS),
    ],
)
def test_an_integer_range_takes_both_ends_and_nothing_past_them(key, least, most):
    for good in (least, most):
        assert _get(parse_config(_set(key, good)), key) == good
    for bad in (least - 1, most + 1):
        with pytest.raises(ConfigError, match=rf"^{key}: .*\(got {bad}\)$"):
            parse_config(_set(key, bad))


@pytest.mark.parametrize(
    ("key", "least"),
    [
        ("auth.login_max_failures", 1),
        ("audit.part_max_events", 1),
        ("audit.part_max_bytes", 4096),
        ("audit.spool_max_bytes", 131072),
        ("audit.security_events_per_ip_burst", 1),
        ("flush.burst", 1),
    ],
)
def test_an_integer_minimum_is_taken_and_one_less_refused(key, least):
    assert _get(parse_config(_set(key, least)), key) == least
    with pytest.raises(ConfigError) as info:
        parse_config(_set(key, least - 1))
    assert str(info.value).startswith(f"{key}: must be at least {least}")
    assert str(info.value).endswith(f" (got {least - 1})")


def test_rates_zero_and_below():
    """The flood guard's rate is off at 0; the sink's rate must be positive."""
    key = "audit.security_events_per_ip_per_second"
    assert _get(parse_config(_set(key, 0)), key) == 0.0
    with pytest.raises(ConfigError, match=rf"^{key}: must not be negative \(got -0.5\)$"):
        parse_config(_set(key, -0.5))
    key = "flush.max_writes_per_second"
    assert _get(parse_config(_set(key, 0.01)), key) == 0.01
    with pytest.raises(ConfigError, match=rf"^{key}: must be positive \(got 0\)$"):
        parse_config(_set(key, 0))


def test_a_backoff_without_growth_is_allowed():
    """backoff_max_seconds equal to backoff_base_seconds: a constant retry
    delay, what "must not be below" says; only below is refused."""
    c = parse_config({"flush": {"backoff_base_seconds": 5, "backoff_max_seconds": 5}})
    assert c.flush.backoff_base_seconds == c.flush.backoff_max_seconds == 5.0
    with pytest.raises(ConfigError, match=r"^flush\.backoff_max_seconds: must not be below"):
        parse_config({"flush": {"backoff_base_seconds": 5, "backoff_max_seconds": 4.99}})


def test_mongodb_names_at_their_limits():
    for name in ("a", "d" * 63):
        assert parse_config(_set("sink.mongodb.database", name)).sink.mongodb.database == name
    for bad in ("", "a b", "a\0b", "a/b", "a$b", "é" * 32):  # 64 bytes
        with pytest.raises(ConfigError, match=r"^sink\.mongodb\.database: must be"):
            parse_config(_set("sink.mongodb.database", bad))
    key = "sink.mongodb.sessions_collection"
    for name in ("c", "my.system.x", "systems"):
        assert parse_config(_set(key, name)).sink.mongodb.sessions_collection == name
    for bad in ("", " ", "a\0b", "$x", "system.users"):
        with pytest.raises(ConfigError, match=rf"^{key}: must be a MongoDB collection name"):
            parse_config(_set(key, bad))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"audit": {"ack": "eventually"}},
         "audit.ack: 'eventually' is not one of 'durable', 'fast'"),
        ({"sink": {"type": "kafka"}},
         "sink.type: 'kafka' is not one of 'sqlite', 'mongodb', 'jsonl', 'http'"),
        ({"audit": {"capture_ai_content": 1}}, "audit.capture_ai_content: expected true or"
         " false, got 1"),
        ({"flush": {"burst": 2.0}}, "flush.burst: expected an integer, got 2.0"),
        ({"flush": {"burst": True}}, "flush.burst: expected an integer, got True"),
        # A boolean is no number (Python's True is 1): not a rate of 1 a second.
        ({"flush": {"max_writes_per_second": True}},
         "flush.max_writes_per_second: expected a number, got True"),
        ({"flush": {"max_writes_per_second": "5"}},
         "flush.max_writes_per_second: expected a number, got '5'"),
        ({"flush": {"max_writes_per_second": [5]}},
         "flush.max_writes_per_second: expected a number, got [5]"),
        ({"flush": {"max_writes_per_second": float("inf")}},
         "flush.max_writes_per_second: expected a finite number, got inf"),
        # Not a secret: the value is shown, as the operator wrote it.
        ({"server": {"host": 5}}, "server.host: expected a string, got 5"),
        ({"ai": {"openai": {"model": ["gpt"]}}}, "ai.openai.model: expected a string,"
         " got ['gpt']"),
        ({"server": {"port": 0}}, "server.port: must be between 1 and 65535 (got 0)"),
        # A name where the variable's name goes: the value is not shown.
        ({"sink": {"http": {"token_env": "tok en"}}},
         "sink.http.token_env: must be the name of an environment variable (letters,"
         " digits and _), not what it holds; the value is not shown"),
        ({"sink": {"type": "mongodb", "mongodb": {"uri_env": ""}}},
         "sink.mongodb.uri_env: must name the environment variable that holds the"
         " MongoDB URI"),
        ({"sink": {"type": "mongodb"}, "audit": {"part_max_bytes": 3 * 1024 * 1024 + 1}},
         f"audit.part_max_bytes: at most {3 * 1024 * 1024} with the mongodb sink (a part's"
         " BSON can be up to 5 times its JSON, and MongoDB takes 16 MiB per document)"),
        ({"sink": {"type": "http", "http": {"url": "http://u:p#w@h/"}}},
         "sink.http.url: not a valid URL (its host or port cannot be read; characters such"
         " as # / ? @ in a user or password must be %-escaped)"),
        ({"sink": {"type": "http", "http": {"url": "h.example/audit"}}},
         "sink.http.url: an http:// or https:// URL is required"),
        ({"sink": {"type": "http", "http": {"url": "https:///audit"}}},
         "sink.http.url: the URL names no host"),
    ],
)
def test_error_messages_word_for_word(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (True, "true or false"),
        (7312509938104472, "an integer"),
        (1.5, "a number"),
        (["sk-secret"], "an array"),
        ({"k": "sk-secret"}, "a table"),
        (datetime.date(2024, 1, 2), "a date or time"),
        (datetime.datetime(2024, 1, 2, 3, 4, 5), "a date or time"),
    ],
)
@pytest.mark.parametrize("key", ["sink.http.token_env", "sink.mongodb.uri_env",
                                 "ai.openai.api_key_env", "sink.http.url",
                                 "ai.openai.base_url"])
def test_a_secret_key_of_the_wrong_type_says_its_type_not_its_value(key, value, words):
    with pytest.raises(ConfigError) as info:
        parse_config(_set(key, value))
    assert str(info.value) == f"{key}: expected a string, got {words} (the value is not shown)"


def test_base_dir_is_not_a_key():
    """The directory relative paths are resolved in is the working
    directory's, never the file's to set."""
    with pytest.raises(ConfigError) as info:
        parse_config({"base_dir": "/elsewhere"})
    assert str(info.value) == "base_dir: unknown key"


def test_an_https_url_is_a_url():
    url = "https://receiver.example/audit"
    assert parse_config({"sink": {"type": "http", "http": {"url": url}}}).sink.http.url == url
    c = parse_config({"ai": {"provider": "openai", "openai": {"base_url": url}}})
    assert c.ai.openai.base_url == url


def test_relative_paths_are_resolved_in_the_directory_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_config({}).data_dir == tmp_path / "data"
    other = tmp_path / "other"
    c = parse_config({"sink": {"type": "jsonl"}}, base_dir=str(other))
    assert c.data_dir == other / "data"
    assert c.jsonl_dir == other / "data" / "audit-jsonl"
    c = parse_config({"sink": {"sqlite": {"path": "s/a.db"}, "jsonl": {"dir": "j"}}},
                     base_dir=str(other))
    assert (c.sqlite_sink_path, c.jsonl_dir) == (other / "s" / "a.db", other / "j")


def test_a_loaded_config_keeps_the_working_directory_it_was_loaded_in(
        tmp_path, monkeypatch):
    """Relative paths are the working directory's at start: a later change
    of directory does not move the spool."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    defaults = load_config()  # no file: all defaults
    (tmp_path / "a" / "c.toml").write_text('[server]\ndata_dir = "d"\n')
    from_file = load_config("c.toml")
    monkeypatch.chdir(tmp_path / "b")
    assert defaults.spool_path == tmp_path / "a" / "data" / "spool.db"
    assert from_file.spool_path == tmp_path / "a" / "d" / "spool.db"


def test_a_config_path_that_cannot_be_read_says_why(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"config file {tmp_path} cannot be read: Is a directory"


def test_a_data_dir_in_a_loop_of_symbolic_links_is_named(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"data_dir": "a/x"}}, base_dir=str(tmp_path))
    assert str(info.value) == "server.data_dir: 'a/x' leads into a loop of symbolic links"


def test_trusted_proxies_entries():
    """Entries are split on commas, blanks skipped (not the end of the list),
    host bits allowed (10.0.0.1/8 is 10.0.0.0/8), IPv4-mapped IPv6 ranges
    taken as their IPv4 range."""
    nets = parse_config({"server": {"trusted_proxies": " 10.0.0.1/8 ,, ,192.0.2.7,"
                                                        "2001:db8::1/64,::ffff:0:0/96,"
                                                        "::ffff:192.0.2.0/120"}}
                        ).server.proxy_networks()
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                    ipaddress.ip_network("2001:db8::/64"), ipaddress.ip_network("0.0.0.0/0"),
                    ipaddress.ip_network("192.0.2.0/24"))
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"trusted_proxies": "10.0.0.0/8 192.0.2.1"}})
    assert str(info.value).startswith("server.trusted_proxies: ")
    assert "10.0.0.0/8 192.0.2.1" in str(info.value)


def test_sink_where_names_the_sink_without_its_secrets(tmp_path):
    base = str(tmp_path)
    c = parse_config({}, base_dir=base)
    assert sink_where(c) == str(tmp_path / "data" / "audit.db")
    assert sink_identity(c) == f"sqlite {tmp_path / 'data' / 'audit.db'}"
    c = parse_config({"sink": {"type": "jsonl"}}, base_dir=base)
    assert sink_identity(c) == f"jsonl {tmp_path / 'data' / 'audit-jsonl'}"
    # A password with an @ left unescaped: the host is after the last one.
    c = parse_config({"sink": {"type": "http", "http": {
        "url": "https://user:p@ss@receiver.example:8443/base/audit//?key=secret#frag"}}})
    assert sink_identity(c) == "http https://receiver.example:8443/base/audit"
    c = parse_config({"sink": {"type": "mongodb", "mongodb": {
        "database": "db", "sessions_collection": "s", "security_collection": "x"}}})
    assert sink_identity(c) == "mongodb db.s, db.x"


def test_path_text_shows_bytes_that_are_not_utf8_escaped():
    name = os.fsdecode(b"/srv/audit-\xe9t\xc3\xa9")  # Latin-1 é, then UTF-8 é
    assert path_text(Path(name)) == "/srv/audit-\\xe9t\u00e9"
    assert path_text(Path("/srv/données")) == "/srv/données"


def test_a_default_config_toml_that_is_a_dangling_link_is_an_error(tmp_path, monkeypatch):
    """./config.toml a symbolic link to a file that is gone (a deployment's
    link to /etc, the target moved): the file was chosen, and is missing.
    It was taken for no file at all, and the server started on the defaults,
    its spool and sink somewhere else than the operator's, without a word."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").symlink_to(tmp_path / "etc" / "session-audit.toml")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value) == "config file config.toml does not exist"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "session-audit.toml").write_text("[audit]\npart_max_events = 3\n")
    assert load_config().audit.part_max_events == 3


def test_the_settings_of_a_sink_or_provider_not_in_use_are_not_checked_against_it(tmp_path):
    """A sink's settings are checked when it is the one in use: those of
    another (left from before a switch) stop no start, as the comment in
    _validate says of their file system; likewise the OpenAI URL under the
    extractive provider."""
    spool = tmp_path / "data" / "spool.db"
    c = parse_config({"sink": {"type": "jsonl", "sqlite": {"path": str(spool)},
                               "mongodb": {"sessions_collection": "c",
                                           "security_collection": "c"}},
                      "ai": {"openai": {"base_url": "ftp://not-used"}}},
                     base_dir=str(tmp_path))
    assert c.sink.sqlite.path == str(spool) and c.ai.openai.base_url == "ftp://not-used"
    with pytest.raises(ConfigError, match=r"^sink\.sqlite\.path: must not be the spool's"):
        parse_config({"sink": {"sqlite": {"path": str(spool)}}}, base_dir=str(tmp_path))


def test_only_the_sink_in_use_has_its_path_resolved(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    looped = {"sqlite": {"path": "a/x.db"}, "jsonl": {"dir": "a/x"}}
    for in_use, key, value in (("jsonl", "sink.jsonl.dir", "a/x"),
                               ("sqlite", "sink.sqlite.path", "a/x.db")):
        with pytest.raises(ConfigError) as info:
            parse_config({"sink": {"type": in_use, **looped}}, base_dir=str(tmp_path))
        assert str(info.value) == f"{key}: {value!r} leads into a loop of symbolic links"
    # The other's is not looked at.
    c = parse_config({"sink": {"type": "sqlite", "jsonl": {"dir": "a/x"}}},
                     base_dir=str(tmp_path))
    assert c.sink.jsonl.dir == "a/x"


def test_the_64_bit_range_takes_its_ends():
    """-2**63 and 2**63 - 1 are TOML integers: range checks speak of them."""
    key = "audit.security_events_per_ip_per_second"
    with pytest.raises(ConfigError) as info:
        parse_config(_set(key, -(2**63)))
    assert str(info.value) == f"{key}: must not be negative (got {-(2**63)})"
    assert parse_config(_set("flush.burst", 2**63 - 1)).flush.burst == 2**63 - 1


def test_config_given_on_the_command_line_wins_over_the_environment(tmp_path, monkeypatch):
    (tmp_path / "env.toml").write_text("[audit]\npart_max_events = 3\n")
    (tmp_path / "arg.toml").write_text("[audit]\npart_max_events = 4\n")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.toml"))
    assert load_config(tmp_path / "arg.toml").audit.part_max_events == 4
    assert load_config(str(tmp_path / "arg.toml")).audit.part_max_events == 4
