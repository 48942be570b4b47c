"""Changes of accounts by the command line (``adduser``, ``passwd``,
``disable``, ``enable``) are security events, read by an admin at
``GET /audit/security-events``: each recorded once, whether the server ran
beside the command or started after it, across a kill -9 and a restart, and
never with a password in it. Real processes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
from live_server import Live, to_toml
from waiting import wait_for

CAROL_FIRST = "carol-first-secret-pw"
CAROL_NEXT = "carol-next-secret-pw"


async def _user_events(live: Live, http: aiohttp.ClientSession,
                       headers: dict[str, str]) -> list[dict[str, Any]]:
    async with http.get(live.base + "/audit/security-events", params={"limit": "500"},
                        headers=headers) as r:
        body = await r.json()
        assert r.status == 200, body
    return [e for e in body["events"] if e["action"].startswith("user.")]


async def _wait_user_events(live: Live, want: Counter[tuple[str, str]]
                            ) -> list[dict[str, Any]]:
    """Log in as admin and wait until the changes ``want`` are listed."""
    async with aiohttp.ClientSession() as http:
        _, headers = await live.admin_login(http)
        seen: list[dict[str, Any]] = []

        async def there() -> bool:
            seen[:] = await _user_events(live, http, headers)
            got = Counter((e["action"], e["target"]["id"]) for e in seen)
            return all(got[k] >= n for k, n in want.items())

        await wait_for(there, timeout=60, interval=0.1, message=f"{want} listed")
        return seen


async def _status(live: Live, http: aiohttp.ClientSession, token: str) -> int:
    async with http.get(live.base + "/me", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_changes_of_accounts_are_kept_until_recording_is_on_then_listed_once(
        live: Live) -> None:
    # Off (the default: API.md's security events have no such actions): a
    # change is made and takes effect, but is not recorded; it waits.
    await live.start()
    r = await live.cli("adduser", "carol", "--admin", "--password-stdin", stdin=CAROL_FIRST + "\n")
    assert r.returncode == 0, r.stderr
    async with aiohttp.ClientSession() as http:
        async with http.post(live.base + "/token",
                             json={"username": "carol", "password": CAROL_FIRST}) as resp:
            assert resp.status == 200
            carol = (await resp.json())["access_token"]
        r = await live.cli("passwd", "carol", "--password-stdin", stdin=CAROL_NEXT + "\n")
        assert r.returncode == 0, r.stderr

        async def ended() -> bool:  # the server's pass has run since the change
            return await _status(live, http, carol) == 401
        await wait_for(ended, timeout=60, interval=0.1, message="carol's session ended")
        # (the reaper may have ended it: let the revocation pass, once a
        # second, run past the change too; a check that nothing happened)
        await asyncio.sleep(1.5)
        _, headers = await live.admin_login(http)
        assert await _user_events(live, http, headers) == []

    # On: what waited is recorded at start (also a change made while no
    # server ran), and what the running server sees next; each once.
    await live.kill()
    r = await live.cli("disable", "carol")
    assert r.returncode == 0, r.stderr
    live.settings["audit"] = {"record_account_changes": True}
    live.config_path.write_text(to_toml(live.settings), encoding="utf-8")
    # A drain leaves them to the server, and says so (the spool must stay).
    r = await live.cli("drain")
    # (the three of carol's, and the admin the first start made)
    assert "4 changes of accounts still to record" in r.stdout, (r.stdout, r.stderr)
    await live.start()
    want = Counter({("user.create", "admin"): 1, ("user.create", "carol"): 1,
                    ("user.password_change", "carol"): 1, ("user.disable", "carol"): 1})
    await _wait_user_events(live, want)
    r = await live.cli("enable", "carol")
    assert r.returncode == 0, r.stderr
    want[("user.enable", "carol")] = 1
    await _wait_user_events(live, want)
    # A kill -9 and a restart record nothing again.
    await live.kill()
    await live.start()
    events = await _wait_user_events(live, want)
    assert Counter((e["action"], e["target"]["id"]) for e in events) == want
    assert len({e["event_id"] for e in events}) == len(events)
    for e in events:
        assert e["outcome"] == "success" and e["target"]["type"] == "user"
        assert e["actor"]["role"] == ("server" if e["target"]["id"] == "admin" else "cli")
    text = json.dumps(events)
    assert CAROL_FIRST not in text and CAROL_NEXT not in text and "bcrypt" not in text
    sink = (live.data_dir / "audit.db").read_bytes()
    assert CAROL_FIRST.encode() not in sink and CAROL_NEXT.encode() not in sink
