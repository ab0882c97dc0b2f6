"""Each deployment's channels and broker keys in Redis carry a prefix of its own (config/isolation.py).

The settings are loaded in a fresh process with the documented environment, as an operator starts one;
the processes of a whole deployment playing next to another on one Redis server are in
tests/experiment/test_shared_redis.py.
"""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.isolation import deployment_prefix
from tests.livestack import PYTHON, ROOT, clean_env

SECRET = secrets.token_urlsafe(50)
BASE = {"DATABASE_URL": "postgres://partnerlab:pw@db:5432/partnerlab", "REDIS_URL": "redis://redis:6379/0",
        "DJANGO_ALLOWED_HOSTS": "partnerlab.example.org", "DJANGO_SECRET_KEY": SECRET}

_PROBE = ("import json; from django.conf import settings as s; print(json.dumps({"
          "'layer': s.CHANNEL_LAYERS['default']['CONFIG']['prefix'], "
          "'broker': s.CELERY_BROKER_TRANSPORT_OPTIONS['global_keyprefix'], 'named': s.PARTNERLAB_CHANNEL_PREFIX}))")


def _prefixes(**overrides: str) -> dict[str, str]:
    env = clean_env(DJANGO_SETTINGS_MODULE="config.settings.production", **{**BASE, **overrides})
    done = subprocess.run([PYTHON, "manage.py", "shell", "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_production_scopes_the_channel_layer_and_the_broker_with_one_prefix() -> None:
    p = _prefixes()
    assert p["layer"] == p["named"] and p["broker"] == p["named"] + ":"
    assert p["named"].startswith("pl-") and p["named"] != "asgi"


@pytest.mark.parametrize("other", [
    {"DATABASE_URL": "postgres://partnerlab:pw@db:5432/staging"},   # another database, same Redis db
    {"REDIS_URL": "redis://redis:6379/1"},                          # same database name, another Redis db
    {"DJANGO_SECRET_KEY": secrets.token_urlsafe(50)},               # a second copy of the same compose file
], ids=["database", "redis-db", "secret"])
def test_deployments_that_differ_get_different_prefixes(other: dict[str, str]) -> None:
    assert _prefixes()["named"] != _prefixes(**other)["named"]


def test_processes_of_one_deployment_agree_whatever_address_they_use() -> None:
    """A worker on another machine may reach the same database and Redis under other names or through
    PgBouncer; it must still land on its deployment's prefix, or its broadcasts would reach nobody."""
    assert _prefixes()["named"] == _prefixes(DATABASE_URL="postgres://partnerlab:other@10.0.0.5:6432/partnerlab",
                                             REDIS_URL="redis://10.0.0.6:6379/0")["named"]


def test_an_explicit_prefix_wins_and_is_checked() -> None:
    assert _prefixes(PARTNERLAB_CHANNEL_PREFIX="study-7")["named"] == "study-7"
    env = clean_env(DJANGO_SETTINGS_MODULE="config.settings.production", **BASE, PARTNERLAB_CHANNEL_PREFIX="bad prefix!")
    done = subprocess.run([PYTHON, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0 and "PARTNERLAB_CHANNEL_PREFIX" in done.stderr, done.stderr


@pytest.mark.parametrize("bad", ["bad prefix", "-leading", "x" * 41, "a/b", "é"])
def test_prefixes_the_channel_layer_would_refuse_are_refused_up_front(bad: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        deployment_prefix(database_name="d", redis_url="redis://r/0", secret_key="s", explicit=bad)


def test_the_secret_does_not_show_in_the_prefix() -> None:
    prefix = deployment_prefix(database_name="d", redis_url="redis://r/0", secret_key=SECRET)
    assert SECRET[:8] not in prefix and len(prefix) == len("pl-") + 12
