"""Check an export bundle against its manifest: every file present, unchanged, and nothing added.

    python manage.py verify_export partnerlab-session-3-csv-20261207T101500Z.zip [--manifest-sha256 HEX]

Exits 0 when the bundle is intact, 1 with the differences in plain words otherwise. ``--manifest-sha256``
also checks the manifest itself against the hash the export printed (recorded, say, in a preregistration).
"""

from __future__ import annotations

import hashlib
import zipfile
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
            manifest, problems = export.verify_bundle(path)
        except export.ExportError as exc:
            raise CommandError(str(exc)) from None
        if o["manifest_sha256"]:
            if path.is_dir():
                raw = (path / export.MANIFEST).read_bytes()
            else:
                with zipfile.ZipFile(path) as archive:
                    raw = archive.read(export.MANIFEST)
            actual = hashlib.sha256(raw).hexdigest()
            if actual != o["manifest_sha256"].strip().lower():
                problems.insert(0, f"{export.MANIFEST} was changed: its SHA-256 is {actual}, not the recorded "
                                   f"{o['manifest_sha256'].strip()}.")
        if problems:
            for line in problems:
                self.stderr.write(line)
            raise CommandError(f"{path} does not match its manifest: {len(problems)} difference(s).", returncode=1)
        self.stdout.write(self.style.SUCCESS(
            f"{path}: all {len(manifest['files'])} files match the manifest (scope {manifest.get('scope')})."))
