"""The Celery app (production backend of experiment.scheduling)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init

# Deployments set DJANGO_SETTINGS_MODULE explicitly (docs/deployment.md); the default is the embedded one.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("partnerlab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _database_connections(**_: Any) -> None:
    """Around every task, treat the database connection as Django treats it around a request: give it back
    (to the process's pool in production, which keeps it open; or keep it while younger than ``CONN_MAX_AGE``).
    (Celery's own Django fix-up closes it around every task unless ``CELERY_DB_REUSE_MAX`` is set, which the
    settings do: a new PostgreSQL connection per task cost about 10 ms of the machine's CPU, with 5-10 tasks a
    second at 140 groups; docs/benchmarks.md.)"""
    from django.db import close_old_connections

    close_old_connections()


@worker_process_init.connect
def _no_inherited_pool(**_: Any) -> None:
    """A forked pool process must not use a connection pool its parent may have opened: the pool's threads
    did not survive the fork and its sockets are the parent's. Forget it (closing it would end the parent's
    connections too); the child opens its own on first use."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    DatabaseWrapper._connection_pools.clear()
