"""The offline account commands on Redis (`AdminStore`, `chatd user|token|stats --redis`).

Each change is one Lua script on the key layout of scripts.py, so it is atomic against the
nodes' own writes, and it increments `P meta users_version`: every node polls that value
(`Store.users_version`, every `db_poll_interval`) and reloads the accounts, so `chatd user
delete` closes the user's connections on every node, as on SQLite. A login right after
`chatd user add` works at once without the poll: a node reads an account it does not know
from Redis before it says no (App.refresh_user).

The scripts live here, not in scripts.py, because only this command-line path uses them;
they touch the same keys as that file's CREATE_USER and DELETE_USER (keep them in step)."""

from __future__ import annotations

import uuid
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatd.config import redis_address
from chatd.errors import Conflict
from chatd.store.base import NameHeld, StoreMissing, StoreOpenError, UserRecord
from chatd.store.redis.scripts import ALL_USERS, GET_USER
from chatd.store.redis.store import LAYOUT, _f, _user, layout_error

# ARGV: P, name, name key, pw hash, admin (0/1), now (unix seconds).
# Reply: {id} created; {0} the name is an account; {-1} a guest holds it while connected;
# {-2, held_until} a guest holds it until then. A hold that lapsed before `now` is removed
# in the same step (no server may be running to release it).
_CREATE_USER = r"""
local P = ARGV[1]
local key = ARGV[3]
if redis.call('HEXISTS', P..'users', key) == 1 then return {0} end
local held = redis.call('HGET', P..'guests', key)
if held then
  local till = cjson.decode(held)['held_until']
  if till == nil or till == cjson.null then return {-1} end
  if till > tonumber(ARGV[6]) then return {-2, till} end
  redis.call('HDEL', P..'guests', key)
end
local id = redis.call('HINCRBY', P..'meta', 'user_id', 1)
redis.call('HSET', P..'u:'..id, 'i', id, 'n', ARGV[2], 'h', ARGV[4], 'a', ARGV[5], 'tv', 0, 'c', ARGV[6])
redis.call('HSET', P..'users', key, id)
redis.call('HINCRBY', P..'meta', 'users_version', 1)
return {id}
"""

# ARGV: P, name key. Reply: 1 deleted, 0 no such account (then nothing changes).
_DELETE_USER = r"""
local P = ARGV[1]
local id = redis.call('HGET', P..'users', ARGV[2])
if not id then return 0 end
redis.call('HDEL', P..'users', ARGV[2])
redis.call('DEL', P..'u:'..id)
redis.call('HINCRBY', P..'meta', 'users_version', 1)
return 1
"""


class RedisAdmin:
    """`AdminStore` on the Redis database at ``url`` (the nodes' `--redis`).

    ``create``: a database with no chatd data yet gets its epoch (as a node's first start
    does), so `chatd user add` may come before any node; without it such a database is
    StoreMissing and nothing is written. StoreOpenError when Redis cannot be reached or
    holds another layout."""

    def __init__(
        self, url: str, *, create: bool = False, prefix: str = "chatd:", timeout: float = 5.0
    ) -> None:
        self.where = redis_address(url)
        self._p = prefix
        self._r = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        try:
            self._scripts = {
                name: self._r.register_script(src)
                for name, src in (("create", _CREATE_USER), ("delete", _DELETE_USER),
                                  ("get", GET_USER), ("all", ALL_USERS))
            }  # fmt: skip
            self._check(create)
        except RedisError as exc:
            self._r.close()
            raise StoreOpenError(f"Redis at {self.where}: {exc}") from None
        except BaseException:
            self._r.close()
            raise

    def _check(self, create: bool) -> None:
        meta = self._p + "meta"
        if create:
            self._r.hsetnx(meta, "epoch", uuid.uuid4().hex)
            self._r.hsetnx(meta, "layout", str(LAYOUT))
        m = cast(dict[str, str], self._r.hgetall(meta))
        if not m.get("epoch"):
            raise StoreMissing(f"no chatd data in Redis at {self.where}")
        if (why := layout_error(m, self.where)) is not None:
            raise StoreOpenError(why)

    def _run(self, name: str, *args: Any) -> Any:
        try:
            return self._scripts[name](args=[self._p, *args])
        except RedisError as exc:
            raise StoreOpenError(f"Redis at {self.where}: {exc}") from None

    def close(self) -> None:
        self._r.close()

    def create_user(self, name: str, pw_hash: str, admin: bool, now: float) -> UserRecord:
        reply = self._run("create", name, name.lower(), pw_hash, int(admin), _f(now))
        code = int(reply[0])
        if code == 0:
            raise Conflict(f"user {name!r} already exists")
        if code == -1:
            raise NameHeld(name, None)
        if code == -2:
            raise NameHeld(name, int(reply[1]))
        return UserRecord(code, name, pw_hash, admin, 0)

    def delete_user(self, name: str) -> bool:
        return bool(self._run("delete", name.lower()))

    def find_user(self, name: str) -> UserRecord | None:
        flat = self._run("get", name.lower())
        return _user(flat) if flat else None

    def list_users(self) -> list[UserRecord]:
        users = [_user(u) for u in self._run("all")[1]]  # {users_version, users}
        return sorted(users, key=lambda u: (u.name.lower(), u.id))
