"""Names are decided in Redis (issue 11: "names are unique across nodes"), so a node that
has not read another node's change yet still answers as one server would: a guest login
of a name registered on another node is `unauthorized` (not a `conflict`), and a register
of a name a guest holds on another node is a `conflict` that says so. A node lagging past
its catch-up bound is made certain by holding its stream reader (with a short bound)."""

from __future__ import annotations

import pytest

from tests.helpers import clients
from tests.wire.test_cluster_membership import Readers, two_nodes

pytestmark = pytest.mark.one_node("starts its own nodes on its own Redis")

PASSWORD = "correct horse battery"
LAG_BOUND = 0.3  # seconds a lagging node's catch-up waits before it answers from memory


async def test_a_guest_login_of_a_name_registered_on_a_node_not_yet_read_is_unauthorized(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (ca, cb):
        a.store.timeout = LAG_BOUND
        await readers.hold(a)  # a has not read b's register when the login comes
        await cb.ok("register", user="Jade", password=PASSWORD)
        err = await ca.error("login", "unauthorized", user="jade")
        assert err["message"] == "that name is registered: log in with its password"
        readers.release(a)
        a.store.timeout = 5.0  # no longer lagging: the usual bound
        await ca.error("login", "unauthorized", user="jade")  # and once it has read it
        assert (await ca.ok("login", user="jade", password=PASSWORD))["user"] == "Jade"


async def test_a_register_of_a_name_held_on_a_node_not_yet_read_is_a_held_conflict(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (ca, cb):
        b.store.timeout = LAG_BOUND
        await readers.hold(b)  # b has not read a's hold when the register comes
        await ca.ok("login", user="jade")
        err = await cb.error("register", "conflict", user="Jade", password=PASSWORD)
        assert err["message"] == "the name 'Jade' is held by a guest while connected", err
        readers.release(b)
        b.store.timeout = 5.0  # no longer lagging: the usual bound
        await ca.ok("logout")
        assert (await cb.ok("register", user="Jade", password=PASSWORD)) == {"user": "Jade"}


async def test_a_guest_login_of_a_name_held_on_a_node_not_yet_read_says_how_long_it_is_held(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contract: a conflict for a held name says until when; a lagging node learns of the
    hold from Redis's refusal, with the hold's end."""
    readers = Readers(monkeypatch)
    async with two_nodes(redis_url) as (a, b), clients(a.port, b.port) as (ca, cb):
        b.store.timeout = LAG_BOUND
        await readers.hold(b)  # b has not read a's hold when the login comes
        await ca.ok("login", user="jade")
        err = await cb.error("login", "conflict", user="Jade")
        assert err["message"] == "the name 'Jade' is held by a guest while connected", err
        readers.release(b)
        b.store.timeout = 5.0
