"""Per-user send limits and failed-login limits across two `chatd serve --redis` nodes
(issue 11; protocol.md Limits, "Several nodes"), real processes on a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import Client
from tests.process import chatd_serving

pytestmark = pytest.mark.one_node("starts its own node processes on its own Redis")

SECRET = "a-secret-shared-by-every-node-0123456789"
PASSWORD = "correct horse battery"


def node(url: str) -> tuple[str, ...]:
    return ("serve", "--redis", url, "--port", "0", "--secret", SECRET, "--rate-limit", "4")


async def test_a_user_who_spent_its_burst_on_one_node_is_limited_on_the_other(
    redis_url: str,
) -> None:
    async with chatd_serving(*node(redis_url)) as a, chatd_serving(*node(redis_url)) as b:
        on_a, on_b = await Client.connect(a.port), await Client.connect(b.port)
        await on_a.ok("register", user="ann", password=PASSWORD)
        token = (await on_a.ok("login", user="ann", password=PASSWORD))["token"]
        await on_b.ok("auth", token=token)
        # A room on each node: the budget is the user's, whatever the room.
        await on_a.ok("room.create", room="dev")
        await on_b.ok("room.create", room="ops")
        for i in range(12):  # the burst: 3 x 4
            await on_a.ok("msg.send", room="dev", text=f"a{i}")
        await asyncio.sleep(0.3)  # node a has settled
        sent = 0
        for i in range(12):  # alone, node b would take all 12 (its own burst)
            frame = await on_b.call("msg.send", room="ops", text=f"b{i}")
            if frame["type"] == "ok":
                sent += 1
            else:
                assert frame["code"] == "rate_limited" and frame["retry_after"] > 0
            await asyncio.sleep(0.05)
        # The first passes before node b hears of the spent budget; then about 4/s.
        assert 1 <= sent <= 6, sent
        await on_a.close()
        await on_b.close()


async def test_failed_logins_on_one_node_lock_the_account_on_the_other(redis_url: str) -> None:
    async with chatd_serving(*node(redis_url)) as a, chatd_serving(*node(redis_url)) as b:
        c = await Client.connect(a.port)
        await c.ok("register", user="bea", password=PASSWORD)
        await c.close()
        for _ in range(5):  # login_failures_per_minute, each from a fresh connection
            c = await Client.connect(a.port)
            await c.error("login", "unauthorized", user="bea", password="wrong password!")
            await c.close()
        await asyncio.sleep(0.3)
        c = await Client.connect(b.port)
        frame = await c.error("login", "rate_limited", user="bea", password="wrong again!!")
        assert frame["retry_after"] > 0
        await c.close()


async def test_simultaneous_wrong_guesses_split_over_two_nodes_meet_one_limit(
    redis_url: str,
) -> None:
    """Issue 11: 40 wrong passwords for one account sent at the same moment, half to each
    node: the checks in flight on both nodes count, so at most 5 are checked (alone, each
    node would check 5)."""
    async with chatd_serving(*node(redis_url)) as a, chatd_serving(*node(redis_url)) as b:
        c = await Client.connect(a.port)
        await c.ok("register", user="cid", password=PASSWORD)
        await c.close()
        guessers = [await Client.connect((a, b)[i % 2].port) for i in range(40)]
        results = await asyncio.wait_for(
            asyncio.gather(*(
                g.call("login", user="cid", password=f"wrong guess {i:02}")
                for i, g in enumerate(guessers)
            )),
            60,
        )  # fmt: skip
        codes = [r["code"] for r in results]
        assert set(codes) <= {"unauthorized", "rate_limited"}, codes
        assert codes.count("unauthorized") <= 5, codes.count("unauthorized")
        assert all(0 < r["retry_after"] <= 60 for r in results if r["code"] == "rate_limited")
        # The account is locked on both nodes, even for its right password.
        for served in (a, b):
            late = await Client.connect(served.port)
            await late.error("login", "rate_limited", user="cid", password=PASSWORD)
            await late.close()
        for g in guessers:
            await g.close()
