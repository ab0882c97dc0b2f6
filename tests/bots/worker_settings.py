"""Settings for the Celery worker that ``test_celery_worker.py`` starts and kills: production settings with
a short broker visibility timeout, so that a message whose worker was killed is redelivered in seconds
(production keeps 600 s)."""

from config.settings.production import *  # noqa: F403

CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
