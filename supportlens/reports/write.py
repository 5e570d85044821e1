"""Write a report's files: ``daily-<day>.<locale>.html`` and ``.md``, overwritten on a second run
for the same day and locale, so a scheduled job may run again safely (idempotent per period)."""

from __future__ import annotations

from pathlib import Path

from supportlens.reports import html, markdown
from supportlens.reports.document import daily_document
from supportlens.store.daily import DailyFigures

FORMATS = {"html": html.render, "md": markdown.render}


def write_daily(figures: DailyFigures, locale: str, database: str, out_dir: Path,
                formats: tuple[str, ...] = ("html", "md")) -> list[Path]:
    document = daily_document(figures, locale, database)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"daily-{figures.day}.{locale}.{fmt}"
        path.write_text(FORMATS[fmt](document), encoding="utf-8")
        paths.append(path)
    return paths
