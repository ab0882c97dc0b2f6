"""Write the data codebook: ``manage.py codebook --out docs/codebook.md`` (or ``.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from experiment import export


class Command(BaseCommand):
    help = "Write the codebook of the export tables (Markdown, or JSON when --out ends in .json), from the code."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out", type=Path, help="File to write (default: print to stdout).")

    def handle(self, *args, out: Path | None, **options) -> None:
        book = export.codebook()
        text = json.dumps(book, indent=2, ensure_ascii=False) + "\n" if out and out.suffix == ".json" \
            else export.codebook_markdown(book)
        if out is None:
            self.stdout.write(text)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        self.stdout.write(self.style.SUCCESS(f"Wrote {out}."))
