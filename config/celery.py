"""The Celery app (production backend of experiment.scheduling)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("partnerlab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
