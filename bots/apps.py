import logging

from django.apps import AppConfig


class BotsConfig(AppConfig):
    name = "bots"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The openai client's HTTP library logs every request at INFO; every call is already recorded as an
        # LLMCall, and hundreds of bots would drown the log. Only when the deployment did not set a level.
        http_log = logging.getLogger("httpx2")
        if http_log.level == logging.NOTSET:
            http_log.setLevel(logging.WARNING)
