"""The Celery app (production backend of experiment.scheduling)."""

from __future__ import annotations

import os

from celery import Celery

# Deployments set DJANGO_SETTINGS_MODULE explicitly (docs/deployment.md); the default is the embedded one.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("partnerlab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
