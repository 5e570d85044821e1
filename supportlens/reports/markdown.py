"""A report as Markdown, for chat and the plain-text part of an e-mail (pure)."""

from __future__ import annotations

from supportlens.reports.document import Document, Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in table.header) + " |",
             "|" + "|".join("---" for _ in table.header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def render(document: Document) -> str:
    lines = [f"# {document.title}", "", document.intro]
    for section in document.sections:
        lines += ["", f"## {section.title}"]
        if section.text:
            lines += ["", section.text]
        if section.table is not None:
            lines += [""] + _table(section.table)
        elif section.chart is not None:  # a chart without its table: its bars as a list
            lines += [""] + [f"- {label}: {_number(value)}" for label, value in zip(section.chart.labels, section.chart.values)]
    lines += ["", f"_{document.footer}_", ""]
    return "\n".join(lines)
