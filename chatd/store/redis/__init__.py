"""The Redis store (issue 11, `--redis`): everything durable in one Redis database, so
several chatd nodes can share it. Importing this package needs redis-py (`chatd[redis]`)."""

from chatd.store.redis.store import RedisStore, RedisStoreError

__all__ = ["RedisStore", "RedisStoreError"]
