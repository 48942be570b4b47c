"""End to end: ``python server.py`` as a subprocess, replayed over HTTP, checked in the sink.

Each test starts the real server on a free port with its own config and data
directory, talks to it with ``aiohttp.ClientSession``, and reads what the
SQLite sink (``<data_dir>/audit.db``, table ``parts``, column ``doc``) holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from live_server import free_port
from waiting import wait_for

from audit.spool import LAYOUT
from sinks.sqlite import SqliteSink

REPO = Path(__file__).resolve().parent.parent
JWT_SECRET = "e2e-jwt-secret-0123456789abcdefghijklmnop"
AUDIT_KEY = "e2e-audit-key-0123456789abcdefghijklmnopq"
ADMIN_PASSWORD = "e2e-admin-password-Zq8"
USER_PASSWORD = "e2e-user-password-Kx3"
SECRETS = (JWT_SECRET, AUDIT_KEY, ADMIN_PASSWORD, USER_PASSWORD)
DOC_TEXT = "Quarterly numbers. Revenue grew by ten percent. Costs stayed flat."

pytestmark = pytest.mark.slow


def write_config(tmp: Path, port: int, **extra: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data")},
        "auth": {"bcrypt_rounds": 4},
        "flush": {"max_writes_per_second": 1000.0, "burst": 1000},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    path = tmp / "config.toml"
    path.write_text("\n".join(lines))
    return path


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_AUDIT_")}
    env.update({
        "SESSION_AUDIT_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "SESSION_AUDIT_JWT_SECRET": JWT_SECRET,
        "SESSION_AUDIT_AUDIT_KEY": AUDIT_KEY,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def cli(config: Path, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "server.py", *args[:1], "--config", str(config), *args[1:]],
        cwd=REPO, env={**server_env(), **(env or {})}, input=stdin, capture_output=True,
        text=True, timeout=60,
    )


async def add_user(config: Path, name: str, password: str = USER_PASSWORD) -> None:
    added = await acli(config, "adduser", name, "--password-stdin", stdin=password + "\n")
    assert added.returncode == 0, added.stderr


async def acli(config: Path, *args: str, stdin: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, config, *args, stdin=stdin, env=env)


class Server:
    """One ``python server.py serve`` process; stderr kept in a file for inspection."""

    def __init__(self, tmp: Path, config: Path, port: int) -> None:
        self.tmp = tmp
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def sink_path(self) -> Path:
        return self.tmp / "data" / "audit.db"

    def _spawn(self) -> None:
        self.starts += 1
        with open(self.tmp / f"stderr-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "server.py", "serve", "--config", str(self.config)],
                cwd=REPO, env=server_env(), stdout=log, stderr=log,
            )

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._spawn()

        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     + self.stderr())
            try:
                async with http.get(self.url + "/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(healthy, timeout=60, message="/healthz")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> int:
        """SIGTERM and wait: the graceful shutdown."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None

    def stderr(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.tmp.glob("stderr-*.log")))

    # -- the sink -------------------------------------------------------------------

    def parts(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if not self.sink_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.sink_path}?mode=ro", uri=True)
        try:
            if session_id is None:
                rows = conn.execute("SELECT doc FROM parts ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT doc FROM parts WHERE session_id = ? ORDER BY part",
                                    (session_id,)).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()
        return [json.loads(r[0]) for r in rows]

    async def stored(self, session_id: str) -> list[dict[str, Any]]:
        """The session's parts once its final part is in the sink."""
        def final() -> list[dict[str, Any]] | None:
            parts = self.parts(session_id)
            return parts if parts and parts[-1]["final"] else None

        result: list[dict[str, Any]] = await wait_for(final, timeout=60,
                                                      message=f"{session_id} stored")
        return result


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.token = ""
        self.session_id = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def login(self, user: str, password: str = USER_PASSWORD) -> Client:
        async with self.http.post(self.url + "/token",
                                  data={"username": user, "password": password}) as r:
            body = await r.json()
            assert r.status == 200, body
        self.token, self.session_id = body["access_token"], body["session_id"]
        return self

    async def call(self, method: str, path: str, body: Any = None,
                   expect: int = 200) -> Any:
        async with self.http.request(method, self.url + path, json=body,
                                     headers=self.headers) as r:
            data = await r.json() if r.status != 204 else None
            assert r.status == expect, (method, path, r.status, data)
            return data

    async def create(self) -> str:
        doc = await self.call("POST", "/documents", {"title": "Q3", "content": DOC_TEXT}, 201)
        return str(doc["id"])

    async def logout(self) -> int:
        body = await self.call("POST", "/logout")
        return int(body["event_count"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
def make_server(tmp_path: Path) -> Any:
    servers: list[Server] = []

    def make(**extra: dict[str, Any]) -> Server:
        tmp = tmp_path / f"srv{len(servers)}"
        tmp.mkdir()
        port = free_port()
        srv = Server(tmp, write_config(tmp, port, **extra), port)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()
        log = srv.stderr()
        for secret in SECRETS:
            assert secret not in log, "a secret reached the server's log"


def assert_no_tokens_in_log(srv: Server, *clients: Client) -> None:
    log = srv.stderr()
    for c in clients:
        assert c.token not in log
        assert c.token.split(".")[2] not in log  # not even the signature


def actions(part_docs: list[dict[str, Any]]) -> list[str]:
    return [e["action"] for p in part_docs for e in p["events"]]


async def test_five_opens_one_stored_part_and_the_cli(
    make_server: Any, http: aiohttp.ClientSession
) -> None:
    srv = make_server()
    await srv.start(http)
    await add_user(srv.config, "alice")
    again = await acli(srv.config, "adduser", "alice", "--password-stdin",
                       stdin=USER_PASSWORD + "\n")
    assert again.returncode != 0 and "exists" in again.stderr
    # A name that differs only in case would read alike in the trail: refused too.
    alike = await acli(srv.config, "adduser", "Alice", "--password-stdin",
                       stdin=USER_PASSWORD + "\n")
    assert alike.returncode == 1 and "exists already as 'alice'" in alike.stderr
    bad_name = await acli(srv.config, "adduser", "no way", "--password-stdin", stdin="pw\n")
    assert bad_name.returncode == 2
    short = await acli(srv.config, "adduser", "carol", "--password-stdin", stdin="1234567\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr

    alice = await Client(http, srv.url).login("alice")
    doc = await alice.create()
    for _ in range(5):
        body = await alice.call("GET", f"/documents/{doc}")
        assert body["content"] == DOC_TEXT
    assert await alice.logout() == 9

    (part,) = await srv.stored(alice.session_id)
    assert part["_id"] == f"{alice.session_id}:0"
    assert part["part"] == 0 and part["final"] is True and part["seal_reason"] == "logout"
    assert part["user"] == "alice" and part["event_count"] == 9
    assert (part["first_seq"], part["last_seq"]) == (1, 9)
    assert actions([part]) == ["session.start", "token.issue", "document.create"] + [
        "document.access"] * 5 + ["session.end"]
    assert [e["seq"] for e in part["events"]] == list(range(1, 10))
    assert all(e["outcome"] == "success" for e in part["events"])
    # Written once: one row, and the server counted one part write for it.
    assert len(srv.parts()) == 1

    status = await acli(srv.config, "status")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["pending_parts"] == 0 and st["dead_letter"] == 0
    assert "active_sessions" in st and "sink" in st

    verified = await acli(srv.config, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout
    assert_no_tokens_in_log(srv, alice)

    # Tamper with one stored event: verify notices.
    srv.stop()
    conn = sqlite3.connect(srv.sink_path)
    (doc_text,) = conn.execute("SELECT doc FROM parts").fetchone()
    tampered = json.loads(doc_text)
    tampered["events"][3]["outcome"] = "failure"
    conn.execute("UPDATE parts SET doc = ?", (json.dumps(tampered),))
    conn.commit()
    conn.close()
    verified = await acli(srv.config, "verify")
    assert verified.returncode != 0
    assert alice.session_id in verified.stdout


async def test_three_concurrent_users_three_opens_each(
    make_server: Any, http: aiohttp.ClientSession
) -> None:
    srv = make_server()
    await srv.start(http)
    admin = await Client(http, srv.url).login("admin", ADMIN_PASSWORD)
    for name in ("u1", "u2", "u3"):
        r = await acli(srv.config, "adduser", name, "--password-stdin",
                       stdin=USER_PASSWORD + "\n")
        assert r.returncode == 0, r.stderr

    async def user(name: str) -> str:
        c = await Client(http, srv.url).login(name)
        doc = await c.create()
        await asyncio.gather(*(c.call("GET", f"/documents/{doc}") for _ in range(3)))
        await c.logout()
        return c.session_id

    sids = await asyncio.gather(*(user(n) for n in ("u1", "u2", "u3")))
    assert len(set(sids)) == 3
    total = 0
    for sid in sids:
        parts = await srv.stored(sid)
        assert len(parts) == 1
        acts = actions(parts)
        assert acts.count("document.access") == 3
        total += acts.count("document.access")
    assert total == 9
    # The admin API agrees, once the spool has marked the final parts stored
    # too (the sink has a part a moment before the spool marks it so).
    async def listed() -> dict[str, int] | None:
        listing = await admin.call("GET", "/audit/sessions?state=stored")
        counts = {s["session_id"]: s["event_count"] for s in listing["sessions"]}
        return counts if all(sid in counts for sid in sids) else None

    counts = await wait_for(listed, timeout=60, message="the three sessions listed as stored",
                            interval=0.1)
    assert all(counts[sid] == 7 for sid in sids)


async def test_kill_9_mid_session_then_restart(make_server: Any,
                                               http: aiohttp.ClientSession) -> None:
    srv = make_server()
    await srv.start(http)
    r = await acli(srv.config, "adduser", "bob", "--password-stdin", stdin=USER_PASSWORD + "\n")
    assert r.returncode == 0
    bob = await Client(http, srv.url).login("bob")           # 1 session.start, 2 token.issue
    doc = await bob.create()                                  # 3 document.create
    await bob.call("GET", f"/documents/{doc}")                # 4 document.access
    await bob.call("GET", f"/documents/{doc}")                # 5 document.access
    srv.kill9()
    assert srv.parts(bob.session_id) == []

    await srv.start(http)
    me = await bob.call("GET", "/me")                         # the same token still works
    assert me["session_id"] == bob.session_id
    await bob.call("GET", f"/documents/{doc}")                # 6 document.access
    assert await bob.logout() == 7                            # 7 session.end
    parts = await srv.stored(bob.session_id)
    assert len(parts) == 1
    assert actions(parts) == ["session.start", "token.issue", "document.create",
                              "document.access", "document.access", "document.access",
                              "session.end"]
    assert [e["seq"] for e in parts[0]["events"]] == list(range(1, 8))
    assert parts[0]["event_count"] == 7
    verified = await acli(srv.config, "verify")
    assert verified.returncode == 0, verified.stdout
    assert_no_tokens_in_log(srv, bob)


async def test_mixed_session_of_twelve_actions(make_server: Any,
                                               http: aiohttp.ClientSession) -> None:
    srv = make_server()
    await srv.start(http)
    r = await acli(srv.config, "adduser", "carol", "--password-stdin",
                   stdin=USER_PASSWORD + "\n")
    assert r.returncode == 0
    c = await Client(http, srv.url).login("carol")
    d1 = await c.create()                                                         # 1
    await c.call("GET", "/documents")                                             # 2
    await c.call("GET", f"/documents/{d1}")                                       # 3
    await c.call("PUT", f"/documents/{d1}", {"title": "Q3 v2", "version": 1})     # 4
    await c.call("POST", f"/documents/{d1}/chat", {"message": "How did revenue do?"})  # 5
    await c.call("POST", "/audit/events", {"action": "client.export"}, 202)       # 6
    await c.call("PUT", f"/documents/{d1}", {"title": "stale", "version": 1}, 409)  # 7
    await c.call("GET", "/documents/" + "0" * 32, expect=404)                     # 8
    d2 = await c.create()                                                         # 9
    await c.call("DELETE", f"/documents/{d1}", expect=204)                        # 10
    await c.call("GET", "/documents")                                             # 11
    await c.call("GET", f"/documents/{d2}")                                       # 12
    await c.call("GET", "/me")                                                    # not audited
    assert await c.logout() == 15
    parts = await srv.stored(c.session_id)
    acts = actions(parts)
    assert acts[:2] == ["session.start", "token.issue"] and acts[-1] == "session.end"
    assert acts[2:-1] == [
        "document.create", "document.list", "document.access", "document.update",
        "ai.interaction", "client.export", "document.update", "document.access",
        "document.create", "document.delete", "document.list", "document.access",
    ]
    outcomes = [e["outcome"] for p in parts for e in p["events"]][2:-1]
    assert outcomes.count("failure") == 2 and outcomes.count("denied") == 0


async def test_drain_while_the_server_is_stopped(make_server: Any,
                                                 http: aiohttp.ClientSession) -> None:
    # One sink write, then none for 1000 s: the second session stays pending.
    srv = make_server(flush={"max_writes_per_second": 0.001, "burst": 1})
    await srv.start(http)
    first = await Client(http, srv.url).login("admin", ADMIN_PASSWORD)
    await first.logout()
    await srv.stored(first.session_id)
    second = await Client(http, srv.url).login("admin", ADMIN_PASSWORD)
    await second.call("GET", "/documents")
    await second.logout()
    assert srv.stop() == 0
    assert srv.parts(second.session_id) == []
    assert "shutting down" in srv.stderr() and '"stopped"' in srv.stderr()
    status = await acli(srv.config, "status")
    assert json.loads(status.stdout)["pending_parts"] == 1

    # The server's spent budget is kept in the spool, and drain goes on from
    # it: it would wait 1000 s too. The budget raised, it sends at once.
    assert write_config(srv.tmp, srv.port) == srv.config
    drained = await acli(srv.config, "drain")
    assert drained.returncode == 0, drained.stderr
    assert "1/1" in drained.stderr  # the progress bar
    assert "drained" in drained.stdout
    (part,) = srv.parts(second.session_id)
    assert actions([part]) == ["session.start", "token.issue", "document.list", "session.end"]
    status = await acli(srv.config, "status")
    assert json.loads(status.stdout)["pending_parts"] == 0


async def test_a_sink_switch_is_said_by_serve_and_status(make_server: Any,
                                                       http: aiohttp.ClientSession) -> None:
    """Parts already stored stay in the old sink: serve warns once when the
    configured sink is not the one the spool was last flushed to, and status
    names the configured sink, the last server's apart."""
    srv = make_server()
    await srv.start(http)
    await (await Client(http, srv.url).login("admin", ADMIN_PASSWORD)).logout()
    assert srv.stop() == 0
    text = srv.config.read_text()
    srv.config.write_text(text + '\n[sink]\ntype = "jsonl"\n')
    status = json.loads((await acli(srv.config, "status")).stdout)
    assert status["sink"]["type"] == "jsonl"
    assert status["last_server_sink"]["type"] == "sqlite"
    await srv.start(http)
    assert srv.stop() == 0
    assert "the sink changed from sqlite (" in srv.stderr()
    # Another directory of the same type splits sessions all the same.
    srv.config.write_text(text + f'\n[sink]\ntype = "jsonl"\n[sink.jsonl]\n'
                                 f'dir = "{srv.config.parent / "elsewhere"}"\n')
    status = json.loads((await acli(srv.config, "status")).stdout)
    assert status["sink"]["where"].endswith("elsewhere")
    assert status["last_server_sink"]["type"] == "jsonl"
    await srv.start(http)
    assert srv.stop() == 0
    assert "the sink changed from jsonl (" in srv.stderr()


async def test_config_errors_name_the_key(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, server={"bogus_key": 1})
    for command in ("serve", "status", "drain"):
        r = await acli(config, command)
        assert r.returncode == 2, (command, r.stderr)
        assert "server.bogus_key" in r.stderr
    config = write_config(tmp_path, port, audit={"ack": "sometimes"})
    r = await acli(config, "serve")
    assert r.returncode == 2 and "audit.ack" in r.stderr
    config = write_config(tmp_path, port, flush={"burst": 0})
    r = await acli(config, "status")
    assert r.returncode == 2 and "flush.burst" in r.stderr


async def test_bad_numbers_in_the_config_file_are_one_line_not_a_traceback(
        tmp_path: Path) -> None:
    """Numbers TOML has and a setting cannot take: exit 2, one line naming the
    key. A 400-digit duration was an OverflowError traceback (exit 1)."""
    config = write_config(tmp_path, free_port(),
                          audit={"idle_timeout_seconds": int("9" * 400)})
    r = await acli(config, "status")
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("session-audit: audit.idle_timeout_seconds: an integer past TOML's"
                        " 64-bit range (-2**63 to 2**63 - 1)\n")
    # Past 4300 digits tomllib raises ValueError, not TOMLDecodeError.
    config = write_config(tmp_path, free_port())
    config.write_text(config.read_text() + "[audit]\npart_max_events = " + "9" * 5000 + "\n")
    r = await acli(config, "status")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"session-audit: {config}: not valid TOML: ")
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()


async def serve_refuses(config: Path, says: str, env: dict[str, str] | None = None) -> str:
    """``serve`` exits 2 with one clear message naming the cause; its stderr."""
    r = await acli(config, "serve", env=env)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


async def test_startup_problems_are_one_clear_line(tmp_path: Path) -> None:
    """A data directory that cannot be created, a port in use, a user called
    admin without the role, a short initial admin password: exit 2 with a
    message naming the cause, no traceback."""
    port = free_port()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path, port, server={"data_dir": str(blocker / "data")})
    await serve_refuses(config, "server.data_dir")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        await serve_refuses(write_config(tmp_path, taken.getsockname()[1]), "server.port")

    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, port)
    r = await acli(config, "adduser", "admin", "--password-stdin", stdin="some-password-1\n")
    assert r.returncode == 0, r.stderr
    assert (other / "data").stat().st_mode & 0o777 == 0o700  # made by adduser: owner only
    await serve_refuses(config, "adduser NAME --admin")

    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    os.chmod(shared / "data", 0o777)  # anyone could plant a jwt.key there
    await serve_refuses(write_config(shared, port), "writable by every user")
    assert list((shared / "data").iterdir()) == []

    mongo = tmp_path / "mongo"
    mongo.mkdir()
    await serve_refuses(write_config(mongo, port, sink={"type": "mongodb"}),
                        "SESSION_AUDIT_MONGODB_URI", env={"SESSION_AUDIT_MONGODB_URI": ""})

    weak = tmp_path / "weak"
    weak.mkdir()
    stderr = await serve_refuses(write_config(weak, port), "at least 8 characters",
                                 env={"SESSION_AUDIT_ADMIN_PASSWORD": "Wk7$x"})
    assert "Wk7$x" not in stderr


async def test_commands_beside_the_server_do_not_invent_its_files(tmp_path: Path) -> None:
    """verify, drain and retry-dead read the server's key and files: pointed at
    the wrong --config (or a lost audit.key) they say so. A new key would make
    every stored event look changed, and the server would chain under it."""
    config = write_config(tmp_path, free_port())
    no_key = {"SESSION_AUDIT_AUDIT_KEY": ""}  # the key comes from the data dir, or nowhere
    for command in ("verify", "drain", "retry-dead"):
        r = await acli(config, command, env=no_key)
        assert r.returncode == 2 and "is this the server's --config?" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()
    r = await acli(config, "verify")  # with the key from the environment: no sink to read
    assert r.returncode == 2 and "no sink database" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()


async def test_commands_at_once_on_a_new_data_dir(tmp_path: Path) -> None:
    """Eight adduser at once on a data dir with no spool yet: one creates the
    file, the others find it whole. (The race itself is narrow; the test of
    spool.prepare holds one process in it.)"""
    config = write_config(tmp_path, free_port())
    results = await asyncio.gather(*(
        acli(config, "adduser", f"u{i}", "--password-stdin", stdin="a-password-1\n")
        for i in range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    listed = await acli(config, "users")
    assert len(listed.stdout.splitlines()) == 8, listed.stdout


async def test_a_damaged_spool_is_one_line_for_every_command(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "spool.db").write_bytes(os.urandom(94208))  # not a database
    for command in ("serve", "status", "users", "drain", "retry-dead", "adduser"):
        args = ("adduser", "carol", "--password-stdin") if command == "adduser" else (command,)
        r = await acli(config, *args, stdin="a-password-1\n")
        assert r.returncode == 1, (command, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"session-audit: {command}:") and "not a database" in last, last


async def test_a_spool_of_a_later_release_is_refused_by_every_command(tmp_path: Path) -> None:
    """Found by an upgrade walk-through: a release from before a layout change,
    started on a spool a later release had converted, served (/healthz 200)
    and answered every login 500. The spool notes its layout (PRAGMA
    user_version) and a release that does not know it refuses in one line."""
    config = write_config(tmp_path, free_port())
    await add_user(config, "alice")
    sink = SqliteSink(tmp_path / "data" / "audit.db")  # (verify wants the sink there)
    await sink.open()
    await sink.close()
    spool = tmp_path / "data" / "spool.db"
    with contextlib.closing(sqlite3.connect(spool)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == LAYOUT
        c.execute(f"PRAGMA user_version = {LAYOUT + 1}")  # what a later release would write
    before = spool.read_bytes()
    for command in ("status", "users", "verify", "drain", "adduser", "serve"):
        args = ("adduser", "carol", "--password-stdin") if command == "adduser" else (command,)
        r = await acli(config, *args, stdin="a-password-1\n")
        assert r.returncode != 0, (command, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
        assert "written by a later release" in r.stderr, (command, r.stderr)
    assert spool.read_bytes() == before


async def test_config_before_the_command_is_used(tmp_path: Path) -> None:
    """``server.py --config F status`` reads F, like ``server.py status --config F``."""
    config = write_config(tmp_path, free_port(), server={"data_dir": str(tmp_path / "here")})
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "server.py", "--config", str(config), "status"],
        cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "here") in r.stdout, (r.stdout, r.stderr)


async def test_a_malformed_request_is_one_warning_line(make_server: Any,
                                                       http: aiohttp.ClientSession) -> None:
    """A header over the limit (32 KiB; scanners send them): a 400, and in the
    log one warning without traceback and without the header's text."""
    srv = make_server()
    await srv.start(http)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                 + b"SeCrEtToKeN" * 4000 + b"\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert b" 400 " in status
    await wait_for(lambda: "malformed HTTP request refused with 400" in srv.stderr(),
                   message="the log line")  # written after the answer
    log = srv.stderr()
    assert "Traceback" not in log and "SeCrEtToKeN" not in log


async def test_passwd_beside_a_running_server(make_server: Any,
                                              http: aiohttp.ClientSession) -> None:
    srv = make_server()
    await srv.start(http)
    await add_user(srv.config, "alice")
    before = await Client(http, srv.url).login("alice")
    # A new password, set beside the running server: logins check it at once,
    # and the session opened with the old one ends.
    changed = await acli(srv.config, "passwd", "alice", "--password-stdin",
                         stdin="a-new-password-2\n")
    assert changed.returncode == 0, changed.stderr
    assert "open sessions end" in changed.stdout
    async with http.post(srv.url + "/token", json={"username": "alice",
                                                   "password": USER_PASSWORD}) as r:
        assert r.status == 401
    await session_ends(before, "password_changed")
    last = (await srv.stored(before.session_id))[-1]
    assert last["seal_reason"] == "logout"
    assert last["events"][-1]["details"] == {"reason": "logout", "cause": "password_changed"}
    await (await Client(http, srv.url).login("alice", "a-new-password-2")).logout()
    changed = await acli(srv.config, "passwd", "alice", "--password-stdin",
                         stdin=USER_PASSWORD + "\n")
    assert changed.returncode == 0, changed.stderr
    nobody = await acli(srv.config, "passwd", "nobody", "--password-stdin",
                        stdin="whatever-password\n")
    assert nobody.returncode == 1 and "no user" in nobody.stderr
    short = await acli(srv.config, "passwd", "alice", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    long = await acli(srv.config, "passwd", "alice", "--password-stdin", stdin="x" * 1100 + "\n")
    assert long.returncode == 2 and "at most 1024 characters" in long.stderr  # login's limit

    initial = srv.tmp / "data" / "initial_admin_password"
    initial.write_text("the-generated-one\n")
    changed = await acli(srv.config, "passwd", "admin", "--password-stdin",
                         stdin="the-admins-own-1\n")
    assert changed.returncode == 0 and not initial.exists(), changed.stderr
    await (await Client(http, srv.url).login("admin", "the-admins-own-1")).logout()


async def session_ends(client: Client, cause: str) -> None:
    """The client's token is refused as session_ended (the server's check
    runs every second), and its session.end says why."""
    async def refused() -> bool:
        async with client.http.get(client.url + "/me", headers=client.headers) as r:
            if r.status == 200:
                return False
            assert r.status == 401 and (await r.json())["error"]["code"] == "session_ended"
            return True

    await wait_for(refused, timeout=60, message=f"the session to end ({cause})")


async def test_disable_enable_and_users_beside_a_running_server(
        make_server: Any, http: aiohttp.ClientSession) -> None:
    srv = make_server()
    await srv.start(http)
    await add_user(srv.config, "alice")
    await add_user(srv.config, "bob")
    alice = await Client(http, srv.url).login("alice")
    bob = await Client(http, srv.url).login("bob")

    disabled = await acli(srv.config, "disable", "alice")
    assert disabled.returncode == 0 and "disabled alice" in disabled.stdout, disabled.stderr
    await session_ends(alice, "user_disabled")
    end = (await srv.stored(alice.session_id))[-1]["events"][-1]
    assert end["action"] == "session.end"
    assert end["details"] == {"reason": "logout", "cause": "user_disabled"}
    async with http.post(srv.url + "/token", json={"username": "alice",
                                                   "password": USER_PASSWORD}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_credentials"
    await bob.call("GET", "/me")  # bob is not alice

    listed = await acli(srv.config, "users")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("\t")[0]: line.split("\t")[1:3] for line in listed.stdout.splitlines()}
    assert rows == {"admin": ["admin", "enabled"], "alice": ["user", "disabled"],
                    "bob": ["user", "enabled"]}
    assert "password" not in listed.stdout and "bcrypt" not in listed.stdout

    last = await acli(srv.config, "disable", "admin")
    assert last.returncode == 1 and "only enabled admin" in last.stderr
    nobody = await acli(srv.config, "enable", "nobody")
    assert nobody.returncode == 1 and "no user" in nobody.stderr
    enabled = await acli(srv.config, "enable", "alice")
    assert enabled.returncode == 0, enabled.stderr
    await (await Client(http, srv.url).login("alice")).logout()
    await bob.call("GET", "/me")
