"""The Celery app (production backend of experiment.scheduling)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

# Deployments set DJANGO_SETTINGS_MODULE explicitly (docs/deployment.md); the default is the embedded one.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("partnerlab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _database_connections(**_: Any) -> None:
    """Around every task, treat the database connection as Django treats it around a request: keep it while
    it is usable and younger than ``CONN_MAX_AGE``. (Celery's own Django fix-up closes it around every task
    unless ``CELERY_DB_REUSE_MAX`` is set, which the settings do: a new PostgreSQL connection per task cost
    about 10 ms of the machine's CPU, with 5-10 tasks a second at 140 groups; docs/benchmarks.md.)"""
    from django.db import close_old_connections

    close_old_connections()
