"""Write a report's files: ``<report>-<period>.<locale>.html`` and ``.md``, overwritten on a second
run for the same period and locale, so a scheduled job may run again safely (idempotent per period)."""

from __future__ import annotations

from pathlib import Path

from supportlens.reports import html, markdown
from supportlens.reports.document import Document, daily_document
from supportlens.store.daily import DailyFigures

FORMATS = {"html": html.render, "md": markdown.render}


def write_report(document: Document, key: str, out_dir: Path, formats: tuple[str, ...] = ("html", "md")) -> list[Path]:
    """``key`` names the report and its period, e.g. ``daily-2026-12-06``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{key}.{document.locale}.{fmt}"
        path.write_text(FORMATS[fmt](document), encoding="utf-8")
        paths.append(path)
    return paths


def write_daily(figures: DailyFigures, locale: str, database: str, out_dir: Path,
                formats: tuple[str, ...] = ("html", "md")) -> list[Path]:
    return write_report(daily_document(figures, locale, database), f"daily-{figures.day}", out_dir, formats)
