"""Findings of following README.md step by step on a fresh clone: what the
command line, ``/metrics`` and ``/audit/status`` offer is what the docs name,
each a test that fails without its fix.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_fixtures import Api, api, make_api
from live_server import Live, to_toml

import server
from audit.config import ConfigError, parse_config
from audit.events import SECURITY_ACTIONS

__all__ = ["api", "make_api"]

README = Path(__file__).resolve().parent.parent / "README.md"
SPEC = README.parent / "openapi.yaml"


def test_drain_help_names_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    # README: drain exits 0, 1, 130 on Ctrl-C and 143 on SIGTERM; its --help
    # named all but the last.
    with pytest.raises(SystemExit) as exc:
        server.main(["drain", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 when all is written", "1 with dead letters", "130 on Ctrl-C",
                 "143 on SIGTERM"):
        assert code in text, code


async def test_every_metric_is_named_in_the_readme(api: Api) -> None:
    # /metrics served five families README named nowhere (active sessions,
    # the flusher's pause, parts written, summarised security events, group
    # commit batch sizes), nor the sink write outcomes failed/dead_lettered.
    readme = README.read_text(encoding="utf-8")
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert families
    for name in families:
        assert f"`{name}`" in readme, name
    for outcome in ("ok", "failed", "rate_limited", "dead_lettered"):
        assert f'session_audit_sink_writes_total{{outcome="{outcome}"}}' in text
        assert f"`{outcome}`" in readme, outcome


def _undocumented(value: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
    props = schema.get("properties", {})
    out = [f"{where}{key}" for key in value if key not in props]
    for key, sub in value.items():
        if isinstance(sub, dict) and key in props and "properties" in props[key]:
            out += _undocumented(sub, props[key], f"{where}{key}.")
    return out


async def test_every_status_field_is_in_openapi(api: Api) -> None:
    # GET /audit/status answered eight fields openapi.yaml's Status (the
    # contract README points to) did not name: accepting, spool_max_bytes,
    # events_recorded, group_commit...
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    admin = await api.admin()
    resp = await api.client.get("/audit/status", headers=admin.headers)
    assert resp.status == 200
    status = await resp.json()
    assert _undocumented(status, spec["components"]["schemas"]["Status"], "") == []


def test_port_0_is_refused_with_its_key() -> None:
    # server.port = 0 was taken: the OS picked a free port, and serve logged
    # "serving on http://127.0.0.1:0", a port no client can reach, with no
    # word of the real one anywhere.
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"port": 0}})
    assert str(info.value).startswith("server.port: must be between 1 and 65535")
    assert parse_config({"server": {"port": 1}}).server.port == 1


def test_the_serving_line_names_a_url_for_an_ipv6_host() -> None:
    # serve announced "serving on http://::1:8080", which no client takes as
    # a URL; IPv6 addresses go in brackets (RFC 3986).
    assert server.serving_url("::1", 8080) == "http://[::1]:8080"
    assert server.serving_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert server.serving_url("localhost", 8081) == "http://localhost:8081"


@pytest.mark.parametrize("name", ["Admin", "ADMIN"])
async def test_first_start_makes_no_admin_that_reads_alike_an_existing_user(
        live: Live, name: str) -> None:
    # README: a name that differs from an existing one only in case is
    # refused. adduser kept to it, but a first start beside a user "Admin"
    # (added before it) created "admin" too: two users reading alike.
    r = await live.cli("adduser", name, "--password-stdin", stdin="user-password-1\n")
    assert r.returncode == 0, r.stderr
    r = await live.cli("serve", timeout=30)  # the timeout: a guard against serving on
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"the user {name!r} would read alike the 'admin'" in r.stderr
    assert "adduser NAME --admin" in r.stderr
    r = await live.cli("users")
    assert [line.split("\t")[:2] for line in r.stdout.splitlines()] == [[name, "user"]]
    # With an admin of another name, it serves, and makes no "admin".
    r = await live.cli("adduser", "root", "--admin", "--password-stdin",
                       stdin="root-password-1\n")
    assert r.returncode == 0, r.stderr
    await live.start()
    assert await live.stop() == 0
    r = await live.cli("users")
    assert sorted(line.split("\t")[0] for line in r.stdout.splitlines()) == [name, "root"]


async def test_verify_names_the_sink_for_a_problem_of_no_session(live: Live) -> None:
    # README (jsonl): a line verify cannot place is a problem (`changed`).
    # It printed as ": changed: audit-....jsonl, byte N: ...", a line opening
    # with an empty session id.
    live.settings["sink"] = {"type": "jsonl"}
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")
    await live.start()
    assert await live.stop() == 0
    day = next((live.data_dir / "audit-jsonl").glob("audit-*.jsonl"), None)
    if day is None:  # nothing written yet: the first line of a day file
        day = live.data_dir / "audit-jsonl" / "audit-2026-01-01.jsonl"
    with day.open("a", encoding="utf-8") as f:
        f.write('{"foo": 1}\n')
    r = await live.cli("verify")
    assert r.returncode == 1, r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if "changed" in line]
    assert len(problems) == 1, r.stdout
    assert problems[0].startswith(f"sink: changed: {day.name}, byte "), problems[0]


def _readme_block(lang: str, containing: str) -> str:
    text = README.read_text(encoding="utf-8")
    blocks = text.split(f"```{lang}\n")[1:]
    found = [block.split("```", 1)[0] for block in blocks if containing in block]
    assert len(found) == 1, (lang, containing)
    return found[0]


def test_the_systemd_unit_gives_sqlite_a_writable_temporary_directory() -> None:
    # README's unit had ProtectSystem=strict without PrivateTmp: /tmp and
    # /var/tmp read-only, so SQLite could not spill a large sort or index
    # build to a temporary file ("disk I/O error"). Tried in a mount
    # namespace made like it: a start that builds the sqlite sink's index
    # over 400,000 security events never opened the sink.
    unit = _readme_block("ini", "ExecStart=")
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings.get("ProtectSystem") == "strict"
    assert settings.get("PrivateTmp") == "true"
    assert settings.get("ReadWritePaths") == "/opt/session-audit/data"


async def test_a_method_its_path_does_not_have_counts_as_unmatched(api: Api) -> None:
    # README: route is "unmatched" for any unknown path; a known path with
    # a method it does not have is counted so too.
    resp = await api.client.patch("/me")
    assert resp.status == 405
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert 'session_audit_http_requests_total{method="PATCH",route="unmatched",status="405"}' \
        in text
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert "(`unmatched` for a request no route takes: an unknown path, or a method" \
        " its path does not have)" in readme


def test_the_mongodb_indexes_are_named_as_the_sink_builds_them() -> None:
    # README named the indexes by two of their three keys ((user,
    # session_start_time), (action, ts)), with no names or directions: an
    # operator whose role lacks createIndex, making them by hand from it,
    # got other keys under other names (a warning at every open, and
    # listings without the index they are paged by).
    from sinks.mongodb import INDEXES

    readme = " ".join(README.read_text(encoding="utf-8").split())
    for _, keys, name in INDEXES:
        spec = "{" + ", ".join(f"{key}: {int(order)}" for key, order in keys) + "}"
        assert f"`{name}`: `{spec}`" in readme, (name, spec)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        server.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_every_command_and_option_the_readme_shows_exists(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Each `server.py COMMAND [--option]` README shows is one --help lists.
    readme = README.read_text(encoding="utf-8")
    shown = re.findall(r"server\.py ([a-z][a-z-]*)((?: \[?(?:--[a-z-]+|[A-Z]+)\]?)*)", readme)
    assert len({command for command, _ in shown}) >= 9
    for command, rest in shown:
        text = _help(capsys, command)
        for option in re.findall(r"--[a-z-]+", rest):
            assert option in text, (command, option)
    commands = _help(capsys)
    assert all(command in commands for command, _ in shown)


def test_the_help_shows_the_usage_lines_indented_under_the_title(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Python 3.13 strips a docstring's common indentation, 3.11 keeps it:
    # the usage lines --help shows from server.py's docstring lost their
    # indent on 3.13. The same text on both.
    text = _help(capsys)
    assert ("\n\nsession-audit: the entry point, the CLI and the app factory.\n\n"
            "    python server.py [serve] [--config PATH]\n"
            "    python server.py adduser NAME [--admin] [--password-stdin]\n"
            "    python server.py passwd NAME [--password-stdin]\n"
            "    python server.py disable NAME | enable NAME | users\n"
            "    python server.py status | verify | drain | retry-dead\n\n") in text, text


def test_every_config_key_the_readme_names_exists() -> None:
    # Each `section.key` README names is a key the configuration takes, and
    # config.toml, which README says holds every setting, has them all.
    import tomllib

    keys: set[str] = set()

    def walk(value: Any, prefix: str) -> None:
        for f in dataclasses.fields(value):
            if f.metadata.get("internal"):
                continue
            sub = getattr(value, f.name)
            if dataclasses.is_dataclass(sub):
                walk(sub, f"{prefix}{f.name}.")
            else:
                keys.add(prefix + f.name)

    walk(parse_config({}), "")
    readme = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:server|auth|audit|flush|sink|ai)\.[a-z_.]+)`", readme))
    # (not an audit action, a file or a module)
    named -= SECURITY_ACTIONS | {"ai.interaction", "audit.query", "audit.db", "audit.key",
                                 "server.py"}
    assert len(named) > 10
    assert named - keys == set()
    with (README.parent / "config.toml").open("rb") as f:
        shipped = tomllib.load(f)

    def flat(d: dict[str, Any], prefix: str) -> set[str]:
        out: set[str] = set()
        for key, value in d.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) \
                else {prefix + key}
        return out

    assert flat(shipped, "") == keys
    # Every TOML snippet README shows is a configuration the server takes.
    snippets = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(snippets) >= 4
    for snippet in snippets:
        parse_config(tomllib.loads(snippet))
