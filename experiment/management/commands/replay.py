"""Replay a finished session from its seed, its frozen design and its recorded inputs (experiment/replay.py).

    python manage.py replay SESSION_ID [--check] [--json] [--bundle PATH [--manifest-sha256 HEX]]

Nothing is written: the replay runs in a transaction that is rolled back. Without ``--check`` it reports what
it replayed and whether the result is identical; ``--check`` exits 1 on any difference, naming the first ones.
``--bundle`` also checks an export bundle against its manifest and against the database.
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiment import export, replay

SHOWN = 20


class Command(BaseCommand):
    help = "Replay a finished session from its seed and logs, and compare the result with the stored data."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("session_id", type=int)
        parser.add_argument("--check", action="store_true", help="Exit 1 on any difference (or any bundle problem).")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
        parser.add_argument("--bundle", type=Path, help="An export bundle (.zip or directory) to check as well.")
        parser.add_argument("--manifest-sha256", default="", help="The bundle manifest's SHA-256 as recorded.")

    def handle(self, *args, **o) -> None:
        if o["bundle"] and not o["bundle"].exists():
            raise CommandError(f"{o['bundle']} does not exist.")
        try:
            result = replay.replay(o["session_id"])
            bundle = (replay.bundle_problems(o["bundle"], session_id=o["session_id"],
                                             manifest_sha256=o["manifest_sha256"]) if o["bundle"] else [])
        except (replay.ReplayError, export.ExportError) as exc:
            raise CommandError(str(exc)) from None
        if o["json"]:
            self.stdout.write(json.dumps(result.as_dict() | {"bundle_problems": bundle}, indent=2, default=str))
        else:
            self._say(result, bundle, o["bundle"])
        if o["check"] and (not result.identical or bundle):
            raise CommandError(f"session {result.session_id}: the replay differs from the stored data "
                               f"({len(result.differences)} difference(s), {len(result.refused)} refused input(s), "
                               f"{len(bundle)} bundle problem(s)).", returncode=1)

    def _say(self, result: replay.Result, bundle: list[str], path: Path | None) -> None:
        rows = ", ".join(f"{n} {name}" for name, n in result.rows.items())
        self.stdout.write(f"session {result.session_id}: replayed {result.groups} group(s) from {result.inputs} "
                          f"recorded input(s); stored rows: {rows}.")
        if result.design_sha256 != result.replayed_design_sha256:
            self.stdout.write(f"design: frozen {result.design_sha256}, replayed {result.replayed_design_sha256}")
        for line in result.refused[:SHOWN]:
            self.stdout.write(f"refused: {line}")
        for d in result.differences[:SHOWN]:
            self.stdout.write(f"differs: {d}")
        if len(result.differences) > SHOWN:
            self.stdout.write(f"… and {len(result.differences) - SHOWN} more difference(s) (--json lists them all).")
        for line in bundle:
            self.stdout.write(f"bundle: {line}")
        if result.identical:
            self.stdout.write(self.style.SUCCESS(
                f"identical: every table and event stream replays as stored (design {result.design_sha256[:16]}…)."))
        if path is not None and not bundle:
            self.stdout.write(self.style.SUCCESS(f"{path}: intact, and equal to what the database exports."))
