"""The audit trail against an attacker: what the threat hunt found.

Each test is an attack that worked: a client, a logged-in user or a holder
of a stolen token making its own or somebody else's security events vanish
from the record, or a record saying less than it seems to.
"""

from __future__ import annotations

from typing import Any

from api_fixtures import USER_PASSWORD, Api, MakeApi, expect_error, make_api

from audit.spool import connect
from handlers.auth import change_user_sync

__all__ = ["make_api"]

# One client IP may have 3 security events recorded one by one, then (nearly)
# none: the rest are counted into summaries.
FLOOD = {"security_events_per_ip_burst": 3, "security_events_per_ip_per_second": 0.001}


async def _spend_the_budget(api: Api) -> None:
    for i in range(3):
        resp = await api.client.get("/me", headers={"Authorization": f"Bearer junk{i}"})
        await expect_error(resp, 401, "invalid_token")


async def _summary(api: Api, action: str) -> dict[str, Any]:
    assert await api.engine.record_summaries() >= 1
    (summary,) = [e for e in await api.security(action)
                  if e["details"].get("reason") == "over_budget"]
    details: dict[str, Any] = summary["details"]
    return details


async def test_a_flood_summary_says_when_it_names_only_some_session_ids(
    make_api: MakeApi,
) -> None:
    """A holder of bob's stolen token, once bob logged out, replays it behind
    twenty ended sessions of its own from the same address: the summary of
    the 22 ``auth.session_ended`` named 20 session ids, none of them bob's,
    and nothing said that some were left out (usernames have
    ``more_usernames``)."""
    api = await make_api(audit=FLOOD)
    await api.add_user("mallory")
    await api.add_user("bob")
    ended = []
    for _ in range(21):
        who = await api.login("mallory")
        assert (await api.client.post("/logout", headers=who.headers)).status == 200
        ended.append(who)
    bob = await api.login("bob")
    assert (await api.client.post("/logout", headers=bob.headers)).status == 200
    await _spend_the_budget(api)
    for who in [*ended, bob]:
        resp = await api.client.get("/me", headers=who.headers)
        await expect_error(resp, 401, "session_ended")

    d = await _summary(api, "auth.session_ended")
    assert d["count"] == 22
    assert d["usernames"] == ["bob", "mallory"]
    assert len(d["session_ids"]) == 20 and bob.session_id not in d["session_ids"]
    assert d["more_session_ids"] is True
    assert d["reasons"] == {"session_ended": 22}


async def test_a_flood_summary_keeps_why_each_login_failed(make_api: MakeApi) -> None:
    """The right password of a disabled account is recorded as
    ``auth.login_failed`` with reason ``user_disabled``: the sign that the
    password is known. Sent from an address past its budget, it was counted
    into a summary whose reason is ``over_budget`` alone, the same as a
    wrong guess's: an attacker spending the budget first (3 junk tokens
    here) hid that it held the password."""
    api = await make_api(audit=FLOOD)
    await api.add_user("carol")
    conn = connect(api.config.spool_path, "normal")
    try:
        assert change_user_sync(conn, "carol", disabled=True)
    finally:
        conn.close()
    await _spend_the_budget(api)
    for password in ("wrong-password-1", USER_PASSWORD, "wrong-password-2"):
        resp = await api.client.post("/token", json={"username": "carol", "password": password})
        await expect_error(resp, 401, "invalid_credentials")  # the answer does not tell

    d = await _summary(api, "auth.login_failed")
    assert (d["count"], d["usernames"]) == (3, ["carol"])
    assert d["reasons"] == {"invalid_credentials": 2, "user_disabled": 1}
    assert d["more_session_ids"] is False


def test_reasons_survive_a_refused_commit_and_stay_bounded(monkeypatch: Any) -> None:
    from audit.ratelimit import FloodGuard

    monkeypatch.setattr(FloodGuard, "MAX_USERS", 2)
    guard = FloodGuard(rate=1e-9, burst=1, clock=lambda: 0.0)
    assert guard.admit("ip", "auth.invalid_token", 1.0, reason="malformed")
    guard.admit("ip", "auth.invalid_token", 2.0, reason="wrong_algorithm")
    taken = guard.take_summaries()  # and the spool refuses them
    for reason in ("wrong_algorithm", "bad_signature", "missing_claim", None):
        guard.admit("ip", "auth.invalid_token", 3.0, reason=reason)
    guard.restore(taken)
    (c,) = guard.take_summaries()
    assert c.count == 5 == sum(c.reasons.values())
    assert c.reasons == {"wrong_algorithm": 2, "bad_signature": 1, "other": 2}
