"""Check an export bundle against its manifest: every file present, unchanged, and nothing added.

    python manage.py verify_export partnerlab-session-3-csv-20261207T101500Z.zip [--manifest-sha256 HEX]

Exits 0 when the bundle is intact, 1 with the differences in plain words otherwise. ``--manifest-sha256``
also checks the manifest itself against the hash the export printed (recorded, say, in a preregistration).
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiment import export


class Command(BaseCommand):
    help = "Check an export bundle (zip or directory) against its manifest.json."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="The .zip bundle, or the directory of an --unzipped export.")
        parser.add_argument("--manifest-sha256", help="The manifest's SHA-256 as the export printed it.")

    def handle(self, *args, **o) -> None:
        path: Path = o["path"]
        if not path.exists():
            raise CommandError(f"{path} does not exist.")
        try:
            manifest, problems = export.verify_bundle(path, manifest_sha256=o["manifest_sha256"] or "")
        except export.ExportError as exc:
            raise CommandError(str(exc)) from None
        if problems:
            for line in problems:
                self.stderr.write(line)
            raise CommandError(f"{path} does not match its manifest: {len(problems)} difference(s).", returncode=1)
        self.stdout.write(self.style.SUCCESS(
            f"{path}: all {len(manifest['files'])} files match the manifest (scope {manifest.get('scope')})."))
