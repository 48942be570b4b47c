"""Configuration: errors name the key; defaults are API.md's."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from audit.config import CONFIG_ENV, Config, ConfigError, load_config, parse_config

# The defaults block of API.md ("Configuration"), verbatim.
API_DEFAULTS = '''
[server]
host = "127.0.0.1"
port = 8080
data_dir = "data"

[auth]
token_ttl_seconds = 3600
bcrypt_rounds = 12
login_max_failures = 5
login_window_seconds = 300

[audit]
ack = "durable"
synchronous = "full"
idle_timeout_seconds = 1800
max_session_seconds = 43200
part_max_events = 500
part_max_bytes = 1048576
checkpoint_seconds = 900
spool_max_bytes = 1073741824
on_spool_full = "reject"
keep_stored_seconds = 0
capture_ai_content = false

[flush]
max_writes_per_second = 5.0
burst = 5
backoff_base_seconds = 0.5
backoff_max_seconds = 60.0

[sink]
type = "sqlite"

[sink.sqlite]
path = ""

[sink.mongodb]
uri_env = "SESSION_AUDIT_MONGODB_URI"
database = "audit"
sessions_collection = "session_audit"
security_collection = "security_audit"

[sink.jsonl]
dir = ""

[sink.http]
url = ""
token_env = "SESSION_AUDIT_HTTP_TOKEN"
timeout_seconds = 10.0

[ai]
provider = "extractive"

[ai.openai]
base_url = "https://api.openai.com/v1"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
timeout_seconds = 60.0
'''


def as_toml_dict(config: Config) -> dict:
    d = dataclasses.asdict(config)
    d.pop("base_dir")
    return d


# Settings beyond API.md's block (documented in README.md and config.toml),
# with their defaults: additions only, so that every file written against
# API.md still loads and means the same.
EXTENSIONS = {
    "server": {"trusted_proxies": "", "shutdown_grace_seconds": 20.0},
    "auth": {"min_password_chars": 8},
    "audit": {"security_events_per_ip_per_second": 0.0, "security_events_per_ip_burst": 200,
              "record_account_changes": False},
}


def _with_extensions(api: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in api.items()}
    for section, values in EXTENSIONS.items():
        assert not set(values) & set(out[section]), "an extension must be a new key"
        out[section].update(values)
    return out


def test_defaults_equal_api_md():
    api = tomllib.loads(API_DEFAULTS)
    assert as_toml_dict(parse_config({})) == _with_extensions(api)
    assert parse_config(api) == parse_config({})


def test_shipped_config_toml_is_the_defaults():
    path = Path(__file__).resolve().parent.parent / "config.toml"
    shipped = tomllib.loads(path.read_text(encoding="utf-8"))
    assert parse_config(shipped) == parse_config({})


def test_defaults_cover_every_key():
    """Every key of the dataclasses appears in API.md's block or in
    EXTENSIONS, and every key of API.md's block in the dataclasses."""
    api = _with_extensions(tomllib.loads(API_DEFAULTS))

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert keys(as_toml_dict(parse_config({}))) == keys(api)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": {}}, "bogus"),
        ({"audit": {"part_max_event": 5}}, "audit.part_max_event"),
        ({"sink": {"mongodb": {"url": "x"}}}, "sink.mongodb.url"),
        ({"ai": {"openai": {"temperature": 1}}}, "ai.openai.temperature"),
    ],
)
def test_unknown_key_is_named(data, key):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == f"{key}: unknown key"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"server": {"port": "8080"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": True}}, "server.port"),
        ({"server": {"data_dir": ""}}, "server.data_dir"),
        ({"auth": {"bcrypt_rounds": 3}}, "auth.bcrypt_rounds"),
        ({"auth": {"min_password_chars": 7}}, "auth.min_password_chars"),
        ({"auth": {"min_password_chars": 1025}}, "auth.min_password_chars"),
        ({"audit": {"ack": "eventually"}}, "audit.ack"),
        ({"audit": {"synchronous": "off"}}, "audit.synchronous"),
        ({"audit": {"part_max_events": 0}}, "audit.part_max_events"),
        ({"audit": {"part_max_events": 2.5}}, "audit.part_max_events"),
        ({"audit": {"part_max_bytes": 100}}, "audit.part_max_bytes"),
        ({"audit": {"checkpoint_seconds": 0}}, "audit.checkpoint_seconds"),
        ({"audit": {"spool_max_bytes": 10}}, "audit.spool_max_bytes"),
        ({"audit": {"on_spool_full": "drop"}}, "audit.on_spool_full"),
        ({"audit": {"keep_stored_seconds": -1}}, "audit.keep_stored_seconds"),
        ({"audit": {"capture_ai_content": "yes"}}, "audit.capture_ai_content"),
        ({"flush": {"max_writes_per_second": 0}}, "flush.max_writes_per_second"),
        ({"flush": {"burst": 0}}, "flush.burst"),
        ({"flush": {"backoff_base_seconds": 2, "backoff_max_seconds": 1}},
         "flush.backoff_max_seconds"),
        ({"sink": {"type": "kafka"}}, "sink.type"),
        ({"sink": {"type": "http"}}, "sink.http.url"),
        ({"sink": {"http": {"timeout_seconds": 0}}}, "sink.http.timeout_seconds"),
        ({"ai": {"provider": "openai", "openai": {"base_url": "ftp://x"}}},
         "ai.openai.base_url"),
        ({"audit": 5}, "audit"),
        ({"flush": {"backoff_max_seconds": float("inf")}}, "flush.backoff_max_seconds"),
        ({"audit": {"idle_timeout_seconds": float("inf")}}, "audit.idle_timeout_seconds"),
        ({"sink": {"http": {"timeout_seconds": float("nan")}}}, "sink.http.timeout_seconds"),
        ({"server": {"host": ""}}, "server.host"),
        ({"server": {"shutdown_grace_seconds": 0}}, "server.shutdown_grace_seconds"),
        ({"server": {"host": "  "}}, "server.host"),
        ({"server": {"data_dir": "d"}, "sink": {"sqlite": {"path": "d/spool.db"}}},
         "sink.sqlite.path"),
        # TOML's "\u0000": Path.resolve raised ValueError, a traceback at start.
        ({"server": {"data_dir": "data\0x"}}, "server.data_dir"),
        ({"sink": {"sqlite": {"path": "a\0.db"}}}, "sink.sqlite.path"),
        ({"sink": {"type": "jsonl", "jsonl": {"dir": "j\0"}}}, "sink.jsonl.dir"),
        # (of a sink not in use too: a 500 for /readyz not ready, which resolved it)
        ({"sink": {"jsonl": {"dir": "j\0"}}}, "sink.jsonl.dir"),
        ({"sink": {"type": "jsonl", "sqlite": {"path": "a\0.db"}}}, "sink.sqlite.path"),
        # From a review: values that passed here and failed later, or forever.
        ({"auth": {"token_ttl_seconds": 10**12}}, "auth.token_ttl_seconds"),  # login 500
        ({"flush": {"backoff_max_seconds": 1e12}}, "flush.backoff_max_seconds"),
        ({"audit": {"keep_stored_seconds": 10**12}}, "audit.keep_stored_seconds"),
        ({"sink": {"mongodb": {"database": ""}}}, "sink.mongodb.database"),
        ({"sink": {"mongodb": {"database": "a.b"}}}, "sink.mongodb.database"),
        ({"sink": {"mongodb": {"database": "d" * 64}}}, "sink.mongodb.database"),
        ({"sink": {"mongodb": {"sessions_collection": "a$b"}}},
         "sink.mongodb.sessions_collection"),
        ({"sink": {"mongodb": {"security_collection": "system.x"}}},
         "sink.mongodb.security_collection"),
        ({"sink": {"type": "mongodb", "mongodb": {"sessions_collection": "c",
                                                   "security_collection": "c"}}},
         "sink.mongodb.security_collection"),
        # A part's BSON can be 5 times its JSON: past 16 MiB MongoDB refuses it.
        ({"sink": {"type": "mongodb"}, "audit": {"part_max_bytes": 3 * 1024 * 1024 + 1}},
         "audit.part_max_bytes"),
        ({"sink": {"type": "http", "http": {"url": "https://[::1"}}}, "sink.http.url"),
        ({"sink": {"type": "http", "http": {"url": "http://"}}}, "sink.http.url"),
        ({"sink": {"type": "http", "http": {"url": "http://u:secret@h:99999/x"}}},
         "sink.http.url"),
        # A # in the password ends the netloc there: the parser's message
        # quoted the password's start as the port.
        ({"sink": {"type": "http", "http": {"url": "http://u:secret#x@h/"}}}, "sink.http.url"),
        ({"ai": {"provider": "openai", "openai": {"base_url": "https://k:secret?@h/v1"}}},
         "ai.openai.base_url"),
        ({"ai": {"provider": "openai", "openai": {"base_url": "http://[::1"}}},
         "ai.openai.base_url"),
        # The secret itself where its variable's name goes (a common slip):
        # "the environment variable mongodb://u:secret@h/ is not set" was
        # logged at every start, the password with it.
        ({"sink": {"type": "mongodb", "mongodb": {"uri_env": "mongodb://u:secret@h/"}}},
         "sink.mongodb.uri_env"),
        ({"sink": {"http": {"token_env": "secret-token-value"}}}, "sink.http.token_env"),
        ({"ai": {"openai": {"api_key_env": "sk-secret0123"}}}, "ai.openai.api_key_env"),
        # Letters, digits and _ only, but a leading digit: no variable's name
        # (a hex token pasted there; it was taken as a name and quoted at start).
        ({"sink": {"http": {"token_env": "0secret9f8e7d6c5b4a"}}}, "sink.http.token_env"),
    ],
)
def test_bad_value_is_named(data, key):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(key + ":"), str(info.value)
    assert "secret" not in str(info.value)  # a URL's password is never quoted


@pytest.mark.parametrize(
    ("data", "key", "secret"),
    [
        # Found by a secrets hunt: a value of the wrong type was quoted
        # ("expected a string, got 73125..."), a secret pasted into a key
        # that names its variable or holds a URL's password included.
        ({"sink": {"http": {"token_env": 7312509938104472}}}, "sink.http.token_env",
         "7312509938104472"),
        ({"ai": {"openai": {"api_key_env": ["sk-secret0123"]}}}, "ai.openai.api_key_env",
         "secret"),
        ({"sink": {"mongodb": {"uri_env": {"uri": "mongodb://u:secret@h/"}}}},
         "sink.mongodb.uri_env", "secret"),
        ({"sink": {"http": {"url": ["http://u:secret@h/"]}}}, "sink.http.url", "secret"),
        ({"ai": {"openai": {"base_url": ["https://u:secret@h/v1"]}}}, "ai.openai.base_url",
         "secret"),
    ],
)
def test_a_secret_of_the_wrong_type_is_not_quoted(data, key, secret):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(key + ": expected a string"), str(info.value)
    assert secret not in str(info.value)


def test_secret_variable_names_may_be_any_name_or_empty():
    c = parse_config({"sink": {"mongodb": {"uri_env": "AUDIT_MONGO_URI_2"},
                               "http": {"token_env": ""}},
                      "ai": {"openai": {"api_key_env": "_KEY"}}})
    assert c.sink.mongodb.uri_env == "AUDIT_MONGO_URI_2" and c.sink.http.token_env == ""


def test_the_mongodb_sink_needs_a_variable_to_read_its_uri_from():
    """Found by a CLI hunt: an empty uri_env passed the checks and `serve`
    said "the environment variable  (the MongoDB URI) is not set"."""
    with pytest.raises(ConfigError, match=r"^sink\.mongodb\.uri_env: must name"):
        parse_config({"sink": {"type": "mongodb", "mongodb": {"uri_env": ""}}})
    assert parse_config({"sink": {"mongodb": {"uri_env": ""}}}).sink.type == "sqlite"


def test_part_max_bytes_is_bounded_for_mongodb_only():
    assert parse_config({"sink": {"type": "mongodb"},
                         "audit": {"part_max_bytes": 3 * 1024 * 1024}}).audit.part_max_bytes
    assert parse_config({"audit": {"part_max_bytes": 8 * 1024 * 1024}}).audit.part_max_bytes


def test_ints_are_accepted_for_floats():
    c = parse_config({"flush": {"max_writes_per_second": 10}})
    assert c.flush.max_writes_per_second == 10.0
    assert isinstance(c.flush.max_writes_per_second, float)


@pytest.mark.parametrize("key", ["audit.idle_timeout_seconds", "flush.max_writes_per_second",
                                 "audit.spool_max_bytes", "flush.burst"])
def test_an_integer_past_tomls_64_bits_is_named(key):
    """TOML's integers are 64-bit (the spec: one that cannot be held must be
    an error); tomllib takes any. A 400-digit one for a duration was an
    OverflowError traceback (math.isfinite on it); for a count, a value no
    SQLite column or float holds, taken."""
    section, name = key.split(".")
    for bad in (2**63, -(2**63) - 1, int("9" * 400)):
        with pytest.raises(ConfigError) as info:
            parse_config({section: {name: bad}})
        assert str(info.value) == (f"{key}: an integer past TOML's 64-bit range"
                                   " (-2**63 to 2**63 - 1)")
    c = parse_config({"audit": {"spool_max_bytes": 2**63 - 1, "idle_timeout_seconds": 2**20}})
    assert c.audit.spool_max_bytes == 2**63 - 1 and c.audit.idle_timeout_seconds == 2.0**20


def test_load_config_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    # No config.toml in the working directory: all defaults.
    c = load_config()
    assert c.audit == parse_config({}).audit
    assert c.spool_path == tmp_path / "data" / "spool.db"
    assert c.sqlite_sink_path == tmp_path / "data" / "audit.db"

    (tmp_path / "my.toml").write_text(
        '[audit]\npart_max_events = 7\n[sink.sqlite]\npath = "x/a.db"\n'
    )
    c = load_config(tmp_path / "my.toml")
    assert c.audit.part_max_events == 7
    assert c.sqlite_sink_path == tmp_path / "x" / "a.db"

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "my.toml"))
    assert load_config().audit.part_max_events == 7
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()
    # Set but empty (found by a CLI hunt: "config file config.toml does not
    # exist" while unset gave the defaults), and so an empty --config: no choice.
    monkeypatch.setenv(CONFIG_ENV, "")
    assert load_config().audit == parse_config({}).audit
    assert load_config("").audit == parse_config({}).audit
    (tmp_path / "config.toml").write_text("[audit]\npart_max_events = 9\n")
    assert load_config().audit.part_max_events == 9


def test_load_config_bad_toml_and_bad_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[audit\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[flush]\nburst = -1\n")
    with pytest.raises(ConfigError, match=r"^flush\.burst:"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_an_integer_of_more_digits_than_python_reads_is_not_valid_toml(tmp_path: Path):
    """Past 4300 digits tomllib's int() raises a plain ValueError (Python's
    limit on reading integers), not TOMLDecodeError: it was a traceback at
    every command, whose last line advised sys.set_int_max_str_digits()."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[audit]\npart_max_events = " + "9" * 4301 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == (f"{bad}: not valid TOML: an integer past TOML's 64-bit range"
                               " (-2**63 to 2**63 - 1)")


def test_arrays_or_tables_nested_past_pythons_recursion_limit_are_not_valid_toml(
        tmp_path: Path):
    """tomllib reads nested arrays and inline tables by recursion: nested a
    few hundred deep, a RecursionError traceback at every command, as the
    4300-digit integer was."""
    bad = tmp_path / "bad.toml"
    for value in ("[" * 2000 + "]" * 2000, "{a = " * 2000 + "1" + "}" * 2000):
        bad.write_text("[audit]\npart_max_events = " + value + "\n")
        with pytest.raises(ConfigError) as info:
            load_config(bad)
        assert str(info.value) == f"{bad}: not valid TOML: arrays or tables nested too deeply"


def test_config_is_frozen():
    c = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.audit.part_max_events = 1  # type: ignore[misc]


def test_the_access_log_leaves_out_query_strings(caplog) -> None:
    """A token a client put in the URL must not reach the log."""
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    import server

    logger = logging.getLogger("test.access")
    access = server.AccessLog(logger, "")
    request = make_mocked_request("GET", "/documents/abc?access_token=secret-jwt-value")
    with caplog.at_level(logging.INFO, logger="test.access"):
        access.log(request, web.Response(status=404, text="x"), 0.0012)
    assert '"GET /documents/abc" 404' in caplog.text
    assert "secret-jwt-value" not in caplog.text and "access_token" not in caplog.text
    logger.setLevel(logging.WARNING)  # then aiohttp skips the call altogether
    assert access.enabled is False


def test_a_log_line_ends_the_drain_progress_bar_first() -> None:
    """``drain`` redraws its bar with ``\\r`` on stderr: a log line there starts
    on a line of its own, and the bar is drawn again below it."""
    import io
    import logging

    import server

    out = io.StringIO()
    handler = server.StderrHandler(out)
    handler.setFormatter(server.JsonFormatter())
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "sink rate limited", None, None)
    out.write("\r[###...] 3/10 written")
    server.StderrHandler.progress_showing = True
    handler.emit(record)
    handler.emit(record)
    lines = out.getvalue().split("\n")
    assert lines[0] == "\r[###...] 3/10 written"
    assert all(line.startswith('{"ts"') for line in lines[1:3]) and lines[3] == ""


def test_log_lines_escape_control_characters_and_stay_quiet_on_records(monkeypatch):
    import json
    """A client's path or header can reach a log message: C0 and C1 controls
    (terminal escapes, forged line breaks) come out as JSON escapes. At
    DEBUG, the database drivers' loggers (whole statements and documents:
    audit records, captured chat) stay at INFO."""
    import io
    import logging

    import server

    record = logging.LogRecord("x", logging.WARNING, __file__, 1,
                               "GET /evil\u009b31m\u001b[2J\r\n{\"forged\": 1} é", None, None)
    line = server.JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u009b" not in line
    assert "\u001b" not in line and "é" in line
    assert json.loads(line)["msg"] == record.getMessage()

    monkeypatch.setenv("SESSION_AUDIT_LOG_LEVEL", "DEBUG")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # (and what setup_logging sets beside the root, for the tests after this
    # one in the same process: aiohttp.server's filter, the quiet loggers)
    aiohttp_server = logging.getLogger("aiohttp.server")
    filters = aiohttp_server.filters[:]
    quiet = {name: logging.getLogger(name).level for name in server.QUIET_LOGGERS}
    try:
        server.setup_logging()
        out = io.StringIO()
        root.handlers[0].stream = out  # type: ignore[attr-defined]
        logging.getLogger("aiosqlite").debug("executing INSERT ... SECRET_DETAIL")
        logging.getLogger("pymongo.command").debug("command SECRET_DETAIL")
        logging.getLogger("session_audit.test").debug("our own debug line")
        text = out.getvalue()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        aiohttp_server.filters[:] = filters
        for name, was in quiet.items():
            logging.getLogger(name).setLevel(was)
    assert "SECRET_DETAIL" not in text
    assert "our own debug line" in text


# Every character that makes a log line read otherwise than it holds: the
# line and paragraph separators (a line break to str.splitlines and older
# JavaScript) and each bidirectional control (Trojan Source: the embeddings
# and overrides U+202A-U+202E, the isolates U+2066-U+2069, the marks).
LOG_ESCAPED = ("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
               "\u2066\u2067\u2068\u2069")


@pytest.mark.parametrize("char", LOG_ESCAPED, ids=lambda c: f"U+{ord(c):04X}")
def test_log_lines_escape_line_separators_and_bidi_controls(char):
    import json
    import logging

    import server

    record = logging.LogRecord("x", logging.WARNING, __file__, 1,
                               f"GET /a{char}b \u00e9", None, None)
    line = server.JsonFormatter().format(record)
    assert char not in line and f"\\u{ord(char):04x}" in line
    assert "\u00e9" in line  # other text stays readable UTF-8
    assert json.loads(line)["msg"] == record.getMessage()


@pytest.mark.parametrize(("rounds", "warned"), [(4, True), (9, True), (10, False), (12, False)])
def test_cheap_bcrypt_rounds_are_warned_about_at_start(
    tmp_path, rounds, warned, caplog
):
    """Passwords hashed with fewer than 10 rounds are quick to guess from a
    copy of the spool (OWASP ASVS 2.4.4): allowed, for tests, but said."""
    import logging

    import server

    config = parse_config({"server": {"data_dir": str(tmp_path / "data")},
                           "auth": {"bcrypt_rounds": rounds}})
    with caplog.at_level(logging.WARNING, logger="session_audit"):
        server.create_app(config)
    assert ("auth.bcrypt_rounds" in caplog.text) is warned
