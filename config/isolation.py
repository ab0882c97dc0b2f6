"""One deployment's name in Redis: the prefix of every channel and key it uses there.

Redis Pub/Sub ignores database numbers: a ``PUBLISH`` on db 3 reaches a subscriber on db 7. The channel
layer's group names (``seat-<id>``, ``group-<id>``) count from 1 in every PostgreSQL database, so two
PartnerLab deployments on one Redis server would, without a prefix of their own, deliver each other's
participants' states. Celery's queues are lists (scoped by db number), but two deployments on the same
db number would take each other's tasks, and its control broadcasts are Pub/Sub again.

The prefix is derived from what differs between deployments and is the same for every process of one
deployment: the database name, the Redis database number, and the secret key (two copies of one
docker-compose file differ in their secret only; every process of a deployment must share it anyway, for
its sessions and signed tokens). Host names and ports are left out on purpose: a worker on another machine,
or behind PgBouncer, may reach the same database under another address, and must not land on another
prefix. ``PARTNERLAB_CHANNEL_PREFIX`` names it explicitly instead (docs/deployment.md, "Sharing a Redis
server").
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

# What the channel layer accepts in a channel name, with room for "__group__seat-<id>" after it (names are
# limited to 100 characters).
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")


def _redis_db(redis_url: str) -> str:
    parts = urlsplit(redis_url)
    return parts.path.strip("/") or "0"


def deployment_prefix(*, database_name: str, redis_url: str, secret_key: str, explicit: str = "") -> str:
    """``explicit`` when given (checked), else ``pl-`` and 12 hex digits of a hash of the deployment's identity.

    The secret is hashed with the rest and never appears in Redis; 48 bits make an accidental collision
    between two deployments on one server practically impossible (about 1 in 10^14 for a pair)."""
    if explicit:
        if not _VALID.fullmatch(explicit):
            raise ImproperlyConfigured(
                f"PARTNERLAB_CHANNEL_PREFIX={explicit!r}: use 1-40 letters, digits, '.', '_' or '-', starting with a letter or digit.")
        return explicit
    identity = "\n".join(("partnerlab-deployment", database_name, _redis_db(redis_url), secret_key))
    return "pl-" + hashlib.sha256(identity.encode()).hexdigest()[:12]
