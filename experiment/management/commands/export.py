"""Export tidy data: ``manage.py export (--session ID | --experiment SLUG | --all) --out DIR``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiment import export
from experiment.export import ExportError, Options, Scope


class Command(BaseCommand):
    help = ("Write the data bundle (one file per table + codebook.md + codebook.json) for a session, an experiment "
            "or everything: a zip in DIR, or loose files with --unzipped. Recruitment ids are included (this is a "
            "staff tool) unless --pseudonymise or --omit-recruitment-ids.")

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--session", type=int, help="Session id.")
        which.add_argument("--experiment", help="Experiment slug (all its sessions).")
        which.add_argument("--all", action="store_true", help="Every session.")
        parser.add_argument("--out", required=True, type=Path, help="Directory to write into (created if missing).")
        parser.add_argument("--format", choices=export.FORMATS, default="csv", help="Table format (default csv).")
        privacy = parser.add_mutually_exclusive_group()
        privacy.add_argument("--pseudonymise", action="store_true",
                             help="Replace recruitment ids by stable pseudonyms (HMAC-SHA256 keyed with SECRET_KEY).")
        privacy.add_argument("--omit-recruitment-ids", action="store_true", help="Leave recruitment id columns out.")
        parser.add_argument("--unzipped", action="store_true", help="Write the files into DIR instead of one zip.")

    def handle(self, *args, **o) -> None:
        recruitment = "pseudonymise" if o["pseudonymise"] else "omit" if o["omit_recruitment_ids"] else "include"
        try:
            options = Options(format=o["format"], recruitment=recruitment)
            if o["session"] is not None:
                scope = Scope.session(o["session"])
            elif o["experiment"] is not None:
                scope = Scope.experiment(o["experiment"])
            else:
                scope = Scope.everything()
        except ExportError as exc:
            raise CommandError(str(exc)) from None
        out: Path = o["out"]
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out} exists and is not a directory.")
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        digests: dict[str, str] = {}
        if o["unzipped"]:
            counts = export.tables_write(scope=scope, options=options, directory=out, digests=digests)
            target = out
        else:
            target = out / export.bundle_name(scope, options)
            partial = target.with_suffix(".zip.partial")
            try:
                with open(partial, "wb") as f:
                    counts = export.bundle_write(scope=scope, options=options, out=f, digests=digests)
                # Only a complete bundle gets the final name: an interrupted export never looks finished.
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        for name, n in counts.items():
            self.stdout.write(f"  {name:<14} {n:>10} rows")
        self.stdout.write(self.style.SUCCESS(f"Wrote {target} in {seconds:.1f} s."))
        self.stdout.write(f"SHA-256 of {export.MANIFEST}: {digests[export.MANIFEST]} (record it; "
                          f"manage.py verify_export checks the bundle against it).")
