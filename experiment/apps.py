from django.apps import AppConfig


class ExperimentConfig(AppConfig):
    name = "experiment"
    verbose_name = "Experiments"
    default_auto_field = "django.db.models.BigAutoField"
