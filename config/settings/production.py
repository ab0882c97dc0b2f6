"""Production: PostgreSQL, Redis (channel layer and Celery broker), Celery workers.

Everything secret or site-specific comes from the environment; there is no default secret.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from config.env import env_bool, env_int, env_list, env_str
from config.isolation import deployment_prefix

from .base import *  # noqa: F403
from .base import BASE_DIR

DEBUG = False
SECRET_KEY = env_str("DJANGO_SECRET_KEY")  # raises ImproperlyConfigured when missing
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# Connections come from a bounded pool per process (psycopg-pool, which Django 5.2 supports natively), not
# one per thread: Django's async handler runs each HTTP request in a thread of its own, so per-thread
# connections grew with a launch burst until PostgreSQL refused new clients ("too many clients already",
# HTTP 500 for the people arriving). A request that finds the pool empty waits up to DB_POOL_TIMEOUT
# seconds for a connection; only then does it get the "study is busy" page (experiment/busy.py), which
# retries by itself. Budget: every process holds at most DB_POOL_MAX_SIZE connections
# (docs/deployment.md, "Database connections"). Pooling replaces CONN_MAX_AGE (Django refuses both).
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 8)
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL"), conn_max_age=0, conn_health_checks=True)}
DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
    "min_size": min(env_int("DB_POOL_MIN_SIZE", 2), DB_POOL_MAX_SIZE),
    "max_size": DB_POOL_MAX_SIZE,
    "timeout": float(env_str("DB_POOL_TIMEOUT", "10")),
    # Connections above min_size go back to PostgreSQL after this long unused (psycopg's default is 10
    # minutes): after a burst, one process must not keep the connections another one now needs.
    "max_idle": float(env_str("DB_POOL_MAX_IDLE", "60")),
    "name": "partnerlab",
}

REDIS_URL = env_str("REDIS_URL")
# Every channel and key this deployment uses in Redis starts with this prefix, so that deployments sharing
# a Redis server (any db numbers: Pub/Sub ignores them) never see each other's messages (config/isolation.py).
PARTNERLAB_CHANNEL_PREFIX = deployment_prefix(
    database_name=str(DATABASES["default"].get("NAME") or ""), redis_url=REDIS_URL, secret_key=SECRET_KEY,
    explicit=env_str("PARTNERLAB_CHANNEL_PREFIX", ""))
CHANNEL_LAYERS = {
    "default": {
        # Redis Pub/Sub: a broadcast is one PUBLISH, and each web process receives it once, on one subscribed
        # connection, and hands it to its own connections. The list-based RedisChannelLayer costs four round
        # trips to send and four more per receiving connection (a cleanup script, BZPOPMIN, a backup write and
        # its removal): 3.7 times the client CPU per broadcast (docs/benchmarks.md, "Channel layer"). Neither
        # layer keeps a message for a process that is not connected: clients resynchronise from a full state
        # when they reconnect, and the truth is in PostgreSQL.
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}], "prefix": PARTNERLAB_CHANNEL_PREFIX},
    }
}
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
# The bot profiles' rate and concurrency limits are counted here, shared by every worker (bots/limits.py), under
# PARTNERLAB_CHANNEL_PREFIX like every other key of this deployment.
PARTNERLAB_LIMITS_REDIS_URL = env_str("PARTNERLAB_LIMITS_REDIS_URL", REDIS_URL)
# kombu's Redis transport with a guard against a worker exit when Redis drops during a task (config/broker.py).
# Only for redis:// URLs: naming a transport class would skip kombu's own handling of rediss:// (TLS).
if REDIS_URL.startswith("redis://"):
    CELERY_BROKER_TRANSPORT = "config.broker:Transport"
# global_keyprefix: kombu prefixes every key (queues, unacked messages, bindings) and every Pub/Sub channel
# (control broadcasts) of the broker with it.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 600, "global_keyprefix": f"{PARTNERLAB_CHANNEL_PREFIX}:"}
PARTNERLAB_SCHEDULER = "celery"
# Optional: send LLM turns to a queue of their own (docs/deployment.md), served by a worker with a thread
# pool, so that slow models never hold the slots that close phases. Unset: everything on Celery's default
# queue, which any worker started without -Q serves.
PARTNERLAB_LLM_QUEUE = env_str("PARTNERLAB_LLM_QUEUE", "")
if PARTNERLAB_LLM_QUEUE:
    CELERY_TASK_ROUTES = {"experiment.tasks.llm_decide_task": {"queue": PARTNERLAB_LLM_QUEUE}}

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
# Load balancers probe the web processes directly over plain HTTP: a redirect would read as "down".
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 60 * 60 * 24 * 30)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# collectstatic writes here; whitenoise serves from here (so it must be readable by the web processes).
STATIC_ROOT = Path(env_str("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
