"""RoomManager with members on other nodes (chatd/cluster.py): member lists, counts and
"first in, last out" are cluster-wide; this node reports its own users' first and last
connection in a room (on_presence) and nothing else."""

from __future__ import annotations

from chatd.rooms import LiveRoom, RoomManager
from tests.unit.test_rooms import conn, record


def manager() -> tuple[RoomManager, LiveRoom, list[tuple[str, bool]]]:
    rooms = RoomManager()
    rooms.load([record(1, "Lobby", ephemeral=True)])
    told: list[tuple[str, bool]] = []
    rooms.on_presence = lambda room, key, name, entered: told.append((key, entered))
    return rooms, rooms.by_id[1], told


def test_a_user_on_another_node_is_a_member_here() -> None:
    rooms, room, told = manager()
    assert rooms.remote_in(room, "n2", "bob", "Bob") is True
    assert rooms.remote_in(room, "n3", "bob", "Bob") is False  # on a third node too
    assert room.member_names() == ["Bob"] and room.info().members == 1
    assert room.has_user("bob") and not room.is_empty()
    assert rooms.remote_out(room, "n2", "bob") is False  # still on n3
    assert rooms.remote_out(room, "n3", "bob") is True
    assert room.member_names() == [] and room.is_empty()
    assert rooms.remote_out(room, "n3", "bob") is False  # told twice: no change
    assert told == []


def test_joining_here_while_in_elsewhere_announces_nobody_and_leaving_likewise() -> None:
    rooms, room, told = manager()
    rooms.remote_in(room, "n2", "ann", "Ann")
    a1, a2 = conn("Ann"), conn("ann")
    assert rooms.join(room, a1) is False  # Ann was in already (on n2)
    assert rooms.join(room, a2) is False
    assert told == [("ann", True)]  # this node's first connection of Ann, once
    assert room.member_names() == ["Ann"] and room.info().members == 1
    assert rooms.leave(room, a1) is False
    assert rooms.leave(room, a2) is False  # still in on n2: no member.left
    assert told == [("ann", True), ("ann", False)]
    assert room.member_names() == ["Ann"]
    assert rooms.remote_out(room, "n2", "ann") is True
    assert room.is_empty()


def test_leaving_here_last_while_nobody_elsewhere_is_the_user_s_departure() -> None:
    rooms, room, told = manager()
    rooms.remote_in(room, "n2", "bob", "Bob")
    a = conn("ann")
    assert rooms.join(room, a) is True
    assert room.member_names() == ["ann", "Bob"]
    assert rooms.remote_out(room, "n2", "bob") is True
    assert rooms.leave(room, a) is True
    assert room.is_empty() and told == [("ann", True), ("ann", False)]


def test_a_removed_room_reports_this_node_s_users_as_gone() -> None:
    rooms, room, told = manager()
    rooms.join(room, conn("ann"))
    rooms.remote_in(room, "n2", "bob", "Bob")
    rooms.remove(room)
    assert told == [("ann", True), ("ann", False)]
    assert room.remote == {} and room.member_names() == []
