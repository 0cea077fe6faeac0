"""RoomManager with several nodes (chatd/cluster.py): the member list and count are the
users the change stream says are in the room on some node (this one too); this node
reports its own users' first and last connection in a room (on_presence), and announces
nothing itself: who is first in or last out on every node is Redis's to decide
(chatd/store/redis/scripts.py ROOM_ENTER / ROOM_LEAVE)."""

from __future__ import annotations

from chatd.rooms import LiveRoom, RoomManager
from tests.unit.test_rooms import conn, record


def manager() -> tuple[RoomManager, LiveRoom, list[tuple[str, bool, str]]]:
    rooms = RoomManager()
    rooms.load([record(1, "Lobby", ephemeral=True)])
    told: list[tuple[str, bool, str]] = []
    rooms.on_presence = lambda room, key, name, entered, why: told.append((key, entered, why))
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


def test_joins_and_leaves_here_are_reported_once_per_user_and_announce_nothing() -> None:
    rooms, room, told = manager()
    rooms.remote_in(room, "n2", "ann", "Ann")
    a1, a2 = conn("Ann"), conn("ann")
    assert rooms.join(room, a1) is False  # announced, if at all, from Redis
    assert rooms.join(room, a2) is False
    assert told == [("ann", True, "")]  # this node's first connection of Ann, once
    assert room.member_names() == ["Ann"] and room.info().members == 1
    assert rooms.leave(room, a1, "left") is False
    assert rooms.leave(room, a2, "disconnected") is False
    assert told == [("ann", True, ""), ("ann", False, "disconnected")]  # the last one's reason
    assert room.member_names() == ["Ann"]  # still in on n2
    assert rooms.remote_out(room, "n2", "ann") is True
    assert room.is_empty()


def test_a_join_here_shows_in_the_list_once_the_stream_tells_it() -> None:
    rooms, room, told = manager()
    a = conn("ann")
    assert rooms.join(room, a) is False
    assert room.member_names() == [] and room.has_user("ann")  # reported, not yet read
    rooms.remote_in(room, "here", "ann", "ann")
    assert room.member_names() == ["ann"]
    assert rooms.leave(room, a) is False
    assert told == [("ann", True, ""), ("ann", False, "left")]
    assert room.member_names() == ["ann"]  # until its entry is read
    assert rooms.remote_out(room, "here", "ann") is True
    assert room.is_empty()


def test_a_refused_join_is_withdrawn_without_a_report() -> None:
    rooms, room, told = manager()
    a1, a2, b = conn("ann"), conn("ann"), conn("bob")
    rooms.join(room, a1)
    rooms.join(room, a2)
    rooms.join(room, b)
    assert sorted(s.user_key or "" for s in rooms.withdraw(room, "ann")) == ["ann", "ann"]
    assert not room.has_user("ann") and room.has_user("bob") and rooms.rooms_of(a1) == []
    assert told == [("ann", True, ""), ("bob", True, "")]
    rooms.withdraw_all()
    assert room.is_empty() and rooms.rooms_of(b) == [] and len(told) == 2


def test_the_members_elsewhere_are_replaced_by_what_redis_has() -> None:
    rooms, room, _ = manager()
    rooms.join(room, conn("ann"))
    rooms.remote_in(room, "n2", "ann", "ann")
    rooms.remote_in(room, "n2", "bob", "Bob")
    rooms.replace_remote(room, {"cid": ("Cid", {"n3", "n4"})})
    assert room.member_names() == ["Cid"]
    assert room.remote == {"cid": {"n3", "n4"}}


def test_a_removed_room_reports_this_node_s_users_as_gone() -> None:
    rooms, room, told = manager()
    rooms.join(room, conn("ann"))
    rooms.remote_in(room, "n2", "bob", "Bob")
    rooms.remove(room)
    assert told == [("ann", True, ""), ("ann", False, "")]
    assert room.remote == {} and room.member_names() == []


def test_a_connection_joining_is_a_member_from_its_user_s_entry_on() -> None:
    rooms, room, told = manager()
    a1, a2, b = conn("ann"), conn("ann"), conn("bob")
    rooms.join(room, a1)
    rooms.join(room, a2)  # Ann's entry is not read yet: this one waits for it too
    assert list(room.sessions) == [] and rooms.rooms_of(a1) == [room]
    rooms.admit(room, "ann")
    assert list(room.sessions) == [a1, a2]
    a3 = conn("ann")
    rooms.join(room, a3)  # Ann is in here: a member at once
    assert list(room.sessions) == [a1, a2, a3] and told == [("ann", True, "")]
    rooms.join(room, b)
    rooms.leave(room, b, "disconnected")  # left before its entry was read
    assert b not in room.sessions and rooms.rooms_of(b) == []
    assert told[-2:] == [("bob", True, ""), ("bob", False, "disconnected")]
