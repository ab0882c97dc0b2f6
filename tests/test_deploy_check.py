"""Production settings pass Django's deployment checklist, and refuse to start without a secret.

Each check runs `manage.py` in a fresh process with only the documented environment (docs/deployment.md),
as an operator would; `check --deploy` needs no database or Redis connection.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest

from tests.livestack import PYTHON, ROOT, clean_env

REQUIRED = {
    "DATABASE_URL": "postgres://partnerlab:secret@db.internal:5432/partnerlab",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "DJANGO_ALLOWED_HOSTS": "partnerlab.example.org",
}


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env=clean_env(DJANGO_SETTINGS_MODULE="config.settings.production", **env))


def test_check_deploy_prints_no_warning_with_the_documented_environment() -> None:
    done = _manage("check", "--deploy", "--fail-level", "WARNING", DJANGO_SECRET_KEY=secrets.token_urlsafe(50), **REQUIRED)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNINGS" not in output and "ERRORS" not in output, output
    assert "System check identified no issues" in output, output


def test_check_deploy_notices_a_weak_secret() -> None:
    """The check above can fail: a short secret is reported (so a clean run means something)."""
    done = _manage("check", "--deploy", "--fail-level", "WARNING", DJANGO_SECRET_KEY="too-short", **REQUIRED)
    assert done.returncode != 0 and "security.W009" in done.stdout + done.stderr


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
def test_production_refuses_to_start_without_a_secret(secret: str | None) -> None:
    env = dict(REQUIRED) if secret is None else {**REQUIRED, "DJANGO_SECRET_KEY": secret}
    done = _manage("check", **env)
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "DJANGO_SECRET_KEY" in done.stderr, done.stderr


@pytest.mark.parametrize("missing", ["DATABASE_URL", "REDIS_URL"])
def test_production_refuses_to_start_without_its_services(missing: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    done = _manage("check", DJANGO_SECRET_KEY=secrets.token_urlsafe(50), **env)
    assert done.returncode != 0 and missing in done.stderr, done.stderr


_PROBE = """
from django.test import Client
c = Client(HTTP_HOST="partnerlab.example.org")
print(c.get("/healthz").status_code, c.get("/join/abc/").status_code, c.get("/join/abc/").headers.get("Location"))
"""


def test_https_redirect_spares_only_the_health_check() -> None:
    """Plain-HTTP requests are sent to https, except the load balancer's probe of /healthz."""
    done = _manage("shell", "-c", _PROBE, DJANGO_SECRET_KEY=secrets.token_urlsafe(50), **REQUIRED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["200", "301", "https://partnerlab.example.org/join/abc/"], done.stdout


ROUTE = ("from config.celery import app; from experiment import tasks; "
         "print(*(app.amqp.router.route({}, t.name)['queue'].name for t in (tasks.llm_decide_task, tasks.phase_close_task)))")


@pytest.mark.parametrize(("queue", "expected"), [("", "celery celery"), ("llm", "llm celery")])
def test_llm_turns_go_to_their_own_queue_only_when_asked(queue: str, expected: str) -> None:
    done = _manage("shell", "-c", ROUTE, DJANGO_SECRET_KEY=secrets.token_urlsafe(50), PARTNERLAB_LLM_QUEUE=queue, **REQUIRED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected
