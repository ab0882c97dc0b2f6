"""Create (once) an admin account and a demo experiment with a demo session; print how to reach them."""

from __future__ import annotations

import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import connection

from experiment.models import Condition, Experiment, Session


class Command(BaseCommand):
    help = "Create the admin account and the demo experiment/session if they do not exist, and print their URLs."

    def add_arguments(self, parser):
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")

    def handle(self, *args, base_url: str, **options) -> None:
        credentials = Path(settings.PARTNERLAB_VAR_DIR) / "admin-credentials.txt"
        User = get_user_model()
        if not User.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser("admin", "admin@example.org", password)
            credentials.parent.mkdir(parents=True, exist_ok=True)
            credentials.write_text(password)
        password = credentials.read_text().strip() if credentials.exists() else "(set earlier; see manage.py changepassword admin)"
        experiment, created = Experiment.objects.get_or_create(
            slug="demo",
            defaults={"name": "Demo: partner choice with hidden vs disclosed bots", "n_rounds": 3},
        )
        if created:
            Condition.objects.create(experiment=experiment, name="hidden", disclose_identity=False)
            Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)
        session = experiment.sessions.filter(label="demo").first() or Session.objects.create(
            experiment=experiment, label="demo", capacity=1000, synthetic_fill_after=10)
        self.stdout.write(self.style.SUCCESS(f"PartnerLab is ready on {_stack()}."))
        self.stdout.write(f"  Admin:            {base_url}/admin/   user: admin   password: {password}")
        self.stdout.write(f"  Participant link: {base_url}/join/{session.code}/")
        self.stdout.write(f"  Demo session:     id {session.pk} (manage.py export --session {session.pk} --out DIR)")
        self.stdout.write("  Open the participant link alone: after 10 s in the lobby synthetic participants fill the group.")
        self.stdout.write("  Open it in two browsers within 10 s to play in the same group.")


def _stack() -> str:
    """What this process runs on, read from the settings in force (not assumed)."""
    layer = settings.CHANNEL_LAYERS["default"]
    if connection.vendor == "sqlite" and layer["BACKEND"].endswith("InMemoryChannelLayer"):
        return "the embedded default (SQLite, no other servers)"
    database = f"{connection.vendor} database {connection.settings_dict['NAME']!s}"
    prefix = layer.get("CONFIG", {}).get("prefix")
    channels = "an in-memory channel layer" if layer["BACKEND"].endswith("InMemoryChannelLayer") else (
        "Redis" + (f" (channel prefix {prefix})" if prefix else ""))
    return f"{database}, {channels}, scheduler {settings.PARTNERLAB_SCHEDULER}"
