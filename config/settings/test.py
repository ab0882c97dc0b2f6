"""Settings for the test suite.

The suite runs against the production services (PostgreSQL, Redis channel layer) whenever they are
reachable, and on the embedded default otherwise. `PARTNERLAB_TEST_SERVICES` decides:

- ``require`` (CI): PostgreSQL and Redis must answer, or the run stops with an error: never a skip.
- ``auto`` (default): use them when they answer; otherwise SQLite + in-memory layer, said loudly.
- ``none``: embedded default only.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid

import dj_database_url

from .local import *  # noqa: F403

DEBUG = False
SECRET_KEY = "test-only-not-secret"  # noqa: S105
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
LOGGING = {"version": 1, "disable_existing_loggers": False}

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _answers(url: str, default_port: int) -> bool:
    parsed = dj_database_url.urlparse.urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), 1):
            return True
    except OSError:
        return False


_mode = os.environ.get("PARTNERLAB_TEST_SERVICES", "auto")
if _mode not in {"auto", "require", "none"}:
    raise RuntimeError(f"PARTNERLAB_TEST_SERVICES must be auto, require or none, not {_mode!r}")
_pg = _mode != "none" and _answers(TEST_DATABASE_URL, 5432)
_redis = _mode != "none" and _answers(TEST_REDIS_URL, 6379)
if _mode == "require" and not (_pg and _redis):
    raise RuntimeError(
        "PARTNERLAB_TEST_SERVICES=require but "
        + ", ".join(n for n, ok in (("PostgreSQL at " + TEST_DATABASE_URL, _pg), ("Redis at " + TEST_REDIS_URL, _redis)) if not ok)
        + " did not answer. Start them (see docs/deployment.md) or unset the variable."
    )
PRODUCTION_SERVICES = _pg and _redis
if PRODUCTION_SERVICES:
    DATABASES = {"default": dj_database_url.parse(TEST_DATABASE_URL)}
    # A fresh prefix per run: no leftovers from an earlier run (or keys of a run in parallel) can reach this one.
    PARTNERLAB_CHANNEL_PREFIX = f"plt-{uuid.uuid4().hex[:8]}"
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",  # as in production
            "CONFIG": {"hosts": [{"address": TEST_REDIS_URL, "socket_timeout": 15}], "prefix": PARTNERLAB_CHANNEL_PREFIX},
        }
    }
    CELERY_BROKER_URL = TEST_REDIS_URL
    PARTNERLAB_LIMITS_REDIS_URL = TEST_REDIS_URL  # the bots' limits are counted in Redis, as in production
elif _mode == "auto":
    print(
        "\n*** PostgreSQL/Redis not reachable: running on the embedded default (SQLite, in-memory layer);"
        " production-stack tests will be skipped. CI sets PARTNERLAB_TEST_SERVICES=require. ***\n",
        file=sys.stderr,
    )
if not PRODUCTION_SERVICES:
    # A file, not Django's default in-memory test database: that one is shared between threads through
    # SQLite's shared cache, whose table locks fail at once instead of waiting ("database table is
    # locked"), and the game's threads (consumers, scheduler, LLM turns) write at the same time, as they
    # do on the embedded default's db.sqlite3. pytest-django creates and deletes the file.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"partnerlab-test-{os.getpid()}.sqlite3")}

PARTNERLAB_SCHEDULER = "inprocess"
