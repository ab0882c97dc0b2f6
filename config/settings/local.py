"""The embedded default: SQLite, in-memory channel layer, in-process scheduler. No other servers."""

from __future__ import annotations

from config.env import env_list, env_str

from .base import *  # noqa: F403
from .base import BASE_DIR

DEBUG = True
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "local-development-only-not-secret")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": env_str("PARTNERLAB_SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
        # IMMEDIATE: every atomic block takes the write lock up front, so concurrent submissions
        # queue instead of failing with "database is locked" halfway through.
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30,
                    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
    }
}

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
PARTNERLAB_SCHEDULER = "inprocess"
