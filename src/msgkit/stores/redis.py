"""A dedup store in Redis: one string key per idempotency key, expired by Redis itself.

Keys are ``msgkit:dedup:<key>`` (the prefix is configurable; the Redis Streams transport uses other
names). The value is ``c:<token>`` while claimed, ``d:<token>`` once done; the key's TTL is the
lease, then the dedup window. Every operation is one Lua script, so each is atomic and costs one
round trip. Works with Redis 6.2+ and with Redis Cluster (each script touches one key).
"""

from __future__ import annotations

import uuid
from typing import Any

from msgkit.errors import BrokerUnavailableError
from msgkit.stores.base import DONE, Claim, ClaimStatus, DedupStore, check_seconds

DEFAULT_PREFIX = "msgkit:dedup:"

# KEYS[1] key; ARGV[1] token, ARGV[2] lease in ms. Returns {1} claimed, {2} done, {3, pttl} busy.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return {1, 0}
end
if string.sub(v, 1, 2) == 'd:' then return {2, 0} end
return {3, redis.call('PTTL', KEYS[1])}
"""

# ARGV[1] token, ARGV[2] ms, ARGV[3] new state prefix ('d:' mark done, 'c:' extend).
_SET_IF_MINE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= 'c:' .. ARGV[1] and (ARGV[3] == 'c:' or v ~= 'd:' .. ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[3] .. ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDedupStore(DedupStore):
    """Claims in Redis. Pass a URL (the store owns its client) or a ``redis.asyncio.Redis`` client.

    Needs the ``redis`` package (``pip install "msgkit[redis]"``).
    """

    def __init__(self, redis: str | Any, *, prefix: str = DEFAULT_PREFIX) -> None:
        import redis.asyncio as aioredis

        self._owned = isinstance(redis, str)
        self._client: aioredis.Redis = aioredis.Redis.from_url(redis) if isinstance(redis, str) else redis
        self._prefix = prefix
        self._claim = self._client.register_script(_CLAIM)
        self._set_if_mine = self._client.register_script(_SET_IF_MINE)
        self._release = self._client.register_script(_RELEASE)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisDedupStore(prefix={self._prefix!r})"

    async def _run(self, script: Any, key: str, *args: object) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await script(keys=[self._prefix + key], args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BrokerUnavailableError(f"dedup store unreachable: {exc}") from exc

    async def claim(self, key: str, lease: float) -> Claim:
        token = uuid.uuid4().hex
        status, pttl = await self._run(self._claim, key, token, _ms(check_seconds("lease", lease)))
        if status == 1:
            return Claim(ClaimStatus.CLAIMED, token)
        if status == 2:
            return DONE
        return Claim(ClaimStatus.BUSY, retry_after=max(int(pttl), 1) / 1000)

    async def mark_done(self, key: str, token: str, keep_for: float) -> bool:
        ms = _ms(check_seconds("keep_for", keep_for))
        return bool(await self._run(self._set_if_mine, key, token, ms, "d:"))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._run(self._release, key, token))

    async def extend(self, key: str, token: str, lease: float) -> bool:
        return bool(await self._run(self._set_if_mine, key, token, _ms(check_seconds("lease", lease)), "c:"))

    async def close(self) -> None:
        if self._owned and not self._closed:
            self._closed = True
            await self._client.aclose()
