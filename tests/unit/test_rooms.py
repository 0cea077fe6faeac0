"""RoomManager: membership of connections, member events per user (wire contract, "Rules")."""

from __future__ import annotations

import json

import pytest

from chatd.errors import Conflict, NotFound
from chatd.rooms import LiveRoom, RoomManager
from chatd.session import Session
from chatd.store.base import RoomRecord
from tests.unit.fakes import FakePeer


def record(rid: int, name: str, *, ephemeral: bool = False) -> RoomRecord:
    return RoomRecord(
        id=rid, name=name, topic="", owner="ann", created_at=1_700_000_000.0,
        ephemeral=ephemeral, open=False,
    )  # fmt: skip


def conn(user: str) -> Session:
    s = Session(FakePeer(), "127.0.0.1", 0.0, None)
    s.user, s.user_key = user, user.lower()
    return s


@pytest.fixture
def rooms() -> RoomManager:
    m = RoomManager()
    m.load([record(1, "Lobby")])
    return m


def test_rooms_are_found_case_insensitively(rooms: RoomManager) -> None:
    assert rooms.get("lobby") is rooms.get("LOBBY") is rooms.by_id[1]
    assert rooms.get("lobby").name == "Lobby"
    with pytest.raises(NotFound):
        rooms.get("nope")


def test_first_connection_of_a_user_joins_last_one_leaves(rooms: RoomManager) -> None:
    room = rooms.get("lobby")
    a1, a2, b = conn("Ann"), conn("ANN"), conn("bob")
    assert rooms.join(room, a1) is True
    assert rooms.join(room, a2) is False  # same user, second connection
    assert rooms.join(room, b) is True
    assert room.info().members == 2 and len(room.sessions) == 3
    assert room.member_names() == ["Ann", "bob"]
    assert rooms.leave(room, a1) is False  # Ann is still there on a2
    assert room.has_user("ann")
    assert rooms.leave(room, a2) is True
    assert not room.has_user("ann") and room.info().members == 1
    assert room.member_names() == ["bob"]


def test_join_is_idempotent_per_connection(rooms: RoomManager) -> None:
    room = rooms.get("lobby")
    a = conn("ann")
    assert rooms.join(room, a) is True
    assert rooms.join(room, a) is False
    assert room.users == {"ann": 1}
    assert rooms.leave(room, a) is True
    assert room.users == {} and room.sessions == {} and rooms.rooms_of(a) == []


def test_leaving_a_room_one_is_not_in_is_a_no_op(rooms: RoomManager) -> None:
    room = rooms.get("lobby")
    a, b = conn("ann"), conn("ann")
    rooms.join(room, a)
    assert rooms.leave(room, b) is False
    assert room.users == {"ann": 1}


def test_session_knows_its_rooms(rooms: RoomManager) -> None:
    other = rooms.add(record(2, "dev"))
    a = conn("ann")
    rooms.join(rooms.get("lobby"), a)
    rooms.join(other, a)
    assert rooms.rooms_of(a) == [rooms.get("lobby"), other]


def test_remove_returns_the_members_and_forgets_the_room(rooms: RoomManager) -> None:
    room = rooms.get("lobby")
    a, b = conn("ann"), conn("bob")
    rooms.join(room, a)
    rooms.join(room, b)
    assert rooms.remove(room) == [a, b]
    assert room.deleted and rooms.rooms_of(a) == [] and rooms.rooms_of(b) == [] and room.users == {}
    assert 1 not in rooms.by_id
    with pytest.raises(NotFound):
        rooms.get("lobby")


def test_reserve_blocks_a_second_create_of_the_same_name(rooms: RoomManager) -> None:
    with pytest.raises(Conflict):
        rooms.reserve("LOBBY")
    rooms.reserve("dev")
    with pytest.raises(Conflict):
        rooms.reserve("Dev")
    rooms.release("dev")
    rooms.reserve("dev")
    room = rooms.add(record(2, "Dev"))
    assert rooms.get("dev") is room
    with pytest.raises(Conflict):
        rooms.reserve("dev")


def test_rename_keeps_identity_and_members(rooms: RoomManager) -> None:
    room = rooms.get("lobby")
    a = conn("ann")
    rooms.join(room, a)
    rooms.rename(room, "Hall")
    assert rooms.get("hall") is room and room.name == "Hall" and rooms.by_id[1] is room
    with pytest.raises(NotFound):
        rooms.get("lobby")
    assert room.has_user("ann")
    assert room.renamed_info("Lobby").previous_name == "Lobby"
    rooms.rename(room, "HALL")  # another letter case of its own name
    assert rooms.get("hall").name == "HALL"


def test_room_info_shape(rooms: RoomManager) -> None:
    info = rooms.get("lobby").info()
    assert info.name == "Lobby" and info.topic == "" and info.members == 0
    assert info.created_at == "2023-11-14T22:13:20.000Z"
    assert isinstance(rooms.get("lobby"), LiveRoom)


def test_member_list_is_kept_sorted_and_encoded_once_per_change(
    rooms: RoomManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, item 11: asking a big room for its members neither walks nor sorts it."""
    import chatd.rooms as rooms_mod

    encodes: list[int] = []
    real = rooms_mod.encode_json

    def counting_encode(value: list[str]) -> bytes:
        encodes.append(len(value))
        return real(value)

    monkeypatch.setattr(rooms_mod, "encode_json", counting_encode)
    monkeypatch.setattr(rooms_mod, "sorted", _no_sort, raising=False)
    room = rooms.get("lobby")
    names = [f"U{i:04d}" if i % 2 else f"u{i:04d}" for i in range(4000)]
    for name in reversed(names):
        rooms.join(room, conn(name))
    rooms.join(room, conn("U0001"))  # a second connection changes nothing
    first = room.members_json()
    assert [first is room.members_json() for _ in range(16)] == [True] * 16
    assert encodes == [4000]  # one encoding for 17 readers
    assert json.loads(bytes(first)) == sorted(names, key=str.lower)
    late = conn("aaa")
    rooms.join(room, late)
    assert json.loads(bytes(room.members_json()))[:2] == ["aaa", "u0000"]
    rooms.leave(room, late)
    assert room.member_names()[:1] == ["u0000"]
    assert json.loads(bytes(room.members_json())) == sorted(names, key=str.lower)
    assert encodes == [4000, 4001, 4000]


def _no_sort(*args: object, **kwargs: object) -> list[object]:
    raise AssertionError("a member list must not be sorted per call")
