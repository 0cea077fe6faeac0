"""The offline account commands on Redis (`AdminStore`, `chatd user|token|stats --redis`).

Each change is the nodes' own script (scripts.py's CREATE_USER and DELETE_USER, called
"told"), so it is atomic against the nodes' own writes and cannot drift from them. It goes
on the change stream, where every running node reads the account again at once (as for
another node's change: `chatd user delete` closes the user's connections on every node),
and it increments `P meta users_version`, which every node polls too (`Store.users_version`,
every `db_poll_interval`), as on SQLite. A login right after `chatd user add` works at once
either way: a node reads an account it does not know from Redis before it says no
(App.refresh_user)."""

from __future__ import annotations

import uuid
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatd.config import redis_address
from chatd.store.base import StoreMissing, StoreOpenError, UserRecord
from chatd.store.redis.scripts import ALL_USERS, CREATE_USER, DELETE_USER, GET_USER
from chatd.store.redis.store import LAYOUT, _f, _user, created_user, layout_error


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
                for name, src in (("create", CREATE_USER), ("delete", DELETE_USER),
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
        # No node of its own ("") and told ("1"): every node applies it (scripts.py).
        reply = self._run("create", name, name.lower(), pw_hash, int(admin), _f(now), "", "1")
        return created_user(reply, name, pw_hash, admin)

    def delete_user(self, name: str) -> bool:
        return bool(self._run("delete", name.lower(), "", "1"))

    def find_user(self, name: str) -> UserRecord | None:
        flat = self._run("get", name.lower())
        return _user(flat) if flat else None

    def list_users(self) -> list[UserRecord]:
        users = [_user(u) for u in self._run("all")[1]]  # {users_version, users}
        return sorted(users, key=lambda u: (u.name.lower(), u.id))
