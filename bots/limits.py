"""A bot profile's limits, counted for all workers together: requests per minute, requests at once, and a pause
that a ``429 Retry-After`` asks of the whole key.

A provider's quota belongs to the API key, not to a worker: with ten Celery workers each keeping its own count,
ten times the quota would go out. So the counts live in Redis (the server every worker already reaches for the
broker), changed by Lua scripts, which Redis runs one at a time: taking a token or a slot is atomic whatever
the number of workers. The scripts read Redis's own clock (``TIME``), so workers whose clocks differ agree.

- **Requests per minute**: a token bucket holding one minute's requests, refilled continuously (``rpm / 60``
  tokens a second). A phase that opens for 300 seats may send ``rpm`` requests at once, then one every
  ``60 / rpm`` seconds.
- **Requests at once**: a sorted set of leases, each with its expiry as score. A request takes a lease and gives
  it back when its reply (or error) is in. A worker killed in the middle of a call cannot give it back, so a
  lease expires on its own after the longest a request may take (the profile's timeout + a margin).
- **Cool-down**: a ``429`` with ``Retry-After`` to one seat means the key is over its quota for every seat:
  no request of the profile goes out until then.

A refusal says how long to wait (:class:`Wait`); ``bots.decisions`` decides whether to wait in place (briefly)
or to run the turn again later. Nothing here blocks.

When Redis cannot be reached the limiter **fails open**: the request goes out, and a warning is logged (at most
once a minute per process). Failing closed would turn a Redis hiccup into phase defaults for every bot seat, that
is, into missing data; failing open risks at worst some ``429`` answers, which the turn already handles (it waits
for their ``Retry-After`` within the phase's time, then its fallback). The spend budget does not depend on Redis:
it is read from the call log in PostgreSQL. (With Celery, Redis is also the broker: while it is down, few turns
run at all.)

Without a Redis URL (``PARTNERLAB_LIMITS_REDIS_URL``: the embedded default, one process) the same rules are
counted in this process's memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from django.conf import settings

from experiment.perprocess import PerProcess

if TYPE_CHECKING:
    from bots.models import BotProfile

logger = logging.getLogger(__name__)

LEASE_MARGIN = 5.0  # seconds a lease outlives the longest request (as the turn's own lease: bots.decisions)
CONCURRENCY_POLL = 0.25  # a refused slot frees when some reply comes in, which nobody can predict: look again soon
WARN_EVERY = 60.0  # seconds between two "Redis unreachable" warnings of one process
REDIS_TIMEOUT = 1.0  # seconds; a limiter that cannot answer quickly is treated as unreachable


@dataclass(frozen=True)
class Limits:
    """A profile's limits as a turn reads them once, at its claim. ``None``: no limit."""

    profile_id: int
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    lease_seconds: float = 25.0

    @classmethod
    def of(cls, profile: BotProfile) -> Limits:
        return cls(profile_id=profile.pk, max_concurrent=profile.max_concurrent,
                   requests_per_minute=profile.requests_per_minute, lease_seconds=profile.timeout_seconds + LEASE_MARGIN)


@dataclass(frozen=True)
class Grant:
    """The request may go out. Give ``lease`` back with :func:`release` when it is done (None: nothing to give)."""

    lease: str | None = None
    degraded: bool = False  # the limiter could not be asked (Redis unreachable): let through, unlimited


@dataclass(frozen=True)
class Wait:
    """Not now: try again in ``seconds``. ``reason``: ``rate``, ``concurrency`` or ``cooldown``."""

    seconds: float
    reason: str


# ---- the rules, in Redis ------------------------------------------------------------------------------------

# KEYS: bucket, leases, cool-down. ARGV: requests per minute (0: none), most at once (0: none), lease id, lease ms.
# Returns {1, 0, ""} when granted, else {0, wait ms, reason}. The bucket is only charged when the request is
# let through, so a refused request costs nothing.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cool = redis.call('PTTL', KEYS[3])
if cool > 0 then return {0, cool, 'cooldown'} end
local rpm, cap, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, math.max(1, tonumber(first[2]) - now), 'concurrency'}
  end
end
if rpm > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
  local tokens = tonumber(state[1]) or rpm
  local stamp = tonumber(state[2]) or now
  tokens = math.min(rpm, tokens + math.max(0, now - stamp) * rpm / 60000)
  if tokens < 1 then
    return {0, math.max(1, math.ceil((1 - tokens) * 60000 / rpm)), 'rate'}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'stamp', now)
  -- Idle for a minute, the bucket is full again: the key may go.
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if cap > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], lease_ms + 1000)
end
return {1, 0, ''}
"""

# KEYS: cool-down. ARGV: ms. Lengthens the pause, never shortens it (two 429s: the later end counts).
COOL_DOWN = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


def keys(limits: Limits) -> list[str]:
    """This deployment's keys for the profile: under its prefix, so that deployments sharing a Redis server
    (whose profile ids overlap) never share a bucket (issue 0; config/isolation.py)."""
    base = f"{settings.PARTNERLAB_CHANNEL_PREFIX}:bots:limits:{limits.profile_id}"
    return [f"{base}:rate", f"{base}:leases", f"{base}:cool"]


class RedisLimiter:
    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
        self._acquire = self.client.register_script(ACQUIRE)
        self._cool = self.client.register_script(COOL_DOWN)

    def acquire(self, limits: Limits) -> Grant | Wait:
        lease = uuid.uuid4().hex if limits.max_concurrent else None
        granted, wait_ms, reason = self._acquire(keys=keys(limits), args=[
            limits.requests_per_minute or 0, limits.max_concurrent or 0, lease or "", _ms(limits.lease_seconds)])
        if granted:
            return Grant(lease)
        return Wait(int(wait_ms) / 1000, reason.decode() if isinstance(reason, bytes) else str(reason))

    def release(self, limits: Limits, lease: str) -> None:
        self.client.zrem(keys(limits)[1], lease)

    def cool_down(self, limits: Limits, seconds: float) -> None:
        self._cool(keys=[keys(limits)[2]], args=[_ms(seconds)])


# ---- the same rules, in memory (the embedded default's one process) ---------------------------------------------

class LocalLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[int, tuple[float, float]] = {}  # profile -> (tokens, stamp)
        self._leases: dict[int, dict[str, float]] = {}  # profile -> lease -> expiry
        self._cool: dict[int, float] = {}  # profile -> until

    def acquire(self, limits: Limits) -> Grant | Wait:
        now, pid = time.monotonic(), limits.profile_id
        with self._lock:
            if (left := self._cool.get(pid, 0.0) - now) > 0:
                return Wait(left, "cooldown")
            leases = {k: v for k, v in self._leases.get(pid, {}).items() if v > now}
            self._leases[pid] = leases
            if limits.max_concurrent and len(leases) >= limits.max_concurrent:
                return Wait(max(0.001, min(leases.values()) - now), "concurrency")
            if rpm := limits.requests_per_minute:
                tokens, stamp = self._buckets.get(pid, (float(rpm), now))
                tokens = min(float(rpm), tokens + max(0.0, now - stamp) * rpm / 60)
                if tokens < 1:
                    return Wait(max(0.001, (1 - tokens) * 60 / rpm), "rate")
                self._buckets[pid] = (tokens - 1, now)
            lease = None
            if limits.max_concurrent:
                lease = uuid.uuid4().hex
                leases[lease] = now + limits.lease_seconds
            return Grant(lease)

    def release(self, limits: Limits, lease: str) -> None:
        with self._lock:
            self._leases.get(limits.profile_id, {}).pop(lease, None)

    def cool_down(self, limits: Limits, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._cool[limits.profile_id] = max(until, self._cool.get(limits.profile_id, 0.0))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _build() -> RedisLimiter | LocalLimiter:
    url = settings.PARTNERLAB_LIMITS_REDIS_URL
    return RedisLimiter(url) if url else LocalLimiter()


_limiter = PerProcess(_build)
_warned = {"at": -math.inf}


def limiter() -> RedisLimiter | LocalLimiter:
    return _limiter.get()


def _unreachable(exc: Exception, doing: str) -> None:
    now = time.monotonic()
    if now - _warned["at"] >= WARN_EVERY:
        _warned["at"] = now
        logger.warning("bot limits: Redis did not answer while %s (%s); requests go out without the profiles' rate and "
                       "concurrency limits until it answers again (the spend budget still holds)", doing, exc)


# ---- what the turn calls ----------------------------------------------------------------------------------------

def acquire(limits: Limits | None) -> Grant | Wait:
    """A token and a slot for one request, or how long to wait. Never blocks (but for Redis's own timeout)."""
    if limits is None:
        return Grant()
    try:
        answer = limiter().acquire(limits)  # with no limit set, it still honours a cool-down
    except redis.RedisError as exc:
        _unreachable(exc, "taking a token")
        return Grant(degraded=True)
    if isinstance(answer, Wait) and answer.reason == "concurrency":
        return Wait(min(answer.seconds, CONCURRENCY_POLL), answer.reason)
    return answer


def release(limits: Limits | None, grant: Grant) -> None:
    """Give the request's slot back (its reply or error is in). A lost release only holds the slot until its lease ends."""
    if limits is None or grant.lease is None:
        return
    try:
        limiter().release(limits, grant.lease)
    except redis.RedisError as exc:
        _unreachable(exc, "giving a slot back")


def cool_down(limits: Limits | None, seconds: float) -> None:
    """The endpoint said ``Retry-After``: no request of this profile goes out, from any worker, for ``seconds``."""
    if limits is None or seconds <= 0:
        return
    try:
        limiter().cool_down(limits, seconds)
    except redis.RedisError as exc:
        _unreachable(exc, "recording a Retry-After")
