"""The Celery broker's transport: kombu's Redis transport with one guard, so that a worker survives losing Redis
while it runs a task.

The defect (kombu 5.7.0, celery 5.7.0): when a worker's broker connection drops, Celery's consumer calls
``connection.collect()`` and then ``connection.close()`` (``Consumer.on_connection_error_after_connected``).
``collect()`` first tries to close the channel, but kombu's Redis ``Channel.close`` begins by reading the pending
BRPOP reply, which raises a connection error on the dead socket; that error is swallowed and the channel stays
open. ``collect()`` then detaches the transport from its ``kombu.Connection`` (``transport.client = None``).
``close()`` closes the channel again, and this time it gets as far as putting back the task messages it holds
unacknowledged (``QoS.restore_unacked``, acks_late). That needs a new Redis connection pool, whose parameters
``Channel._connparams`` reads from ``self.connection.client``, now ``None``: ``AttributeError: 'NoneType' object has
no attribute 'hostname'``. Only connection and channel errors are ignored there, so the worker's main process
ends with "Unrecoverable error". The same happens to the acknowledgement of a task that finishes later on the old
channel (``QoS.ack`` needs a pool too).

The guard: the channel remembers the connection parameters it computed while its transport was attached and uses
them once it is detached. Everything else is kombu's own code path: restoring or acknowledging then reaches Redis
if it is back, or fails with an ordinary connection error if it is not, which kombu and Celery already handle (the
channel close ignores it and the consumer reconnects; a failed acknowledgement is logged). A message that could not
be put back stays in kombu's unacked hash, where the visibility-timeout restore puts it back later (and if Redis
lost it, the sweep hands the turn out again: ``PARTNERLAB_REARM_AFTER_SECONDS``). The jobs re-check their state, so
a message delivered twice acts once. See docs/deployment.md ("Celery workers and a Redis loss").
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        remembered: dict[bool, dict[str, Any]] = self.__dict__.setdefault("_partnerlab_connparams", {})
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous=asynchronous)
            remembered[asynchronous] = dict(params)
            return params
        if asynchronous not in remembered:  # never connected this way: nothing to reach
            raise RedisConnectionError("the broker connection of this channel is closed")
        return dict(remembered[asynchronous])


class Transport(kombu_redis.Transport):
    Channel = Channel
