"""A report as one self-contained HTML page: its text and tables, and plotly charts with
plotly.js inlined, so the page opens offline and can be mailed as it is (pure)."""

from __future__ import annotations

from html import escape

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from supportlens.reports.document import Chart, Document, Table

STYLE = """
body { font-family: -apple-system, "Segoe UI", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif; margin: 2rem auto;
       max-width: 64rem; color: #1f2933; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d9e2ec; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #d9e2ec; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f0f4f8; } footer { margin-top: 2rem; color: #627d98; font-size: .8rem; }
.chart { height: 320px; }
"""


def _table(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _chart(chart: Chart) -> str:
    trace = (go.Scatter(x=chart.labels, y=chart.values, mode="lines+markers", line_color="#3e7cb1")
             if chart.kind == "line" else go.Bar(x=chart.labels, y=chart.values, marker_color="#3e7cb1"))
    figure = go.Figure(trace)
    figure.update_layout(margin=dict(l=50, r=20, t=20, b=80), yaxis_title=chart.axis, height=320,
                         template="plotly_white")
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{chart.chart_id}",
                          config={"displayModeBar": False, "responsive": True}, default_height="320px")


def render(document: Document, charts: bool = True) -> str:
    """The page; ``charts=False`` for an e-mail body, where no script runs: a chart without a
    table of its own is shown as one (the interactive page goes along as an attachment)."""
    parts = [f"<h1>{escape(document.title)}</h1>", f"<p>{escape(document.intro)}</p>"]
    for section in document.sections:
        parts.append(f"<section><h2>{escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{escape(section.text)}</p>")
        if section.chart is not None and charts:
            parts.append(f'<div class="chart">{_chart(section.chart)}</div>')
        if section.table is not None:
            parts.append(_table(section.table))
        elif section.chart is not None and not charts:
            parts.append(_table(Table(["", section.chart.axis], [[label, f"{value:,.2f}".rstrip("0").rstrip(".")] for label, value
                                                                 in zip(section.chart.labels, section.chart.values)])))
        parts.append("</section>")
    parts.append(f"<footer>{escape(document.footer)}</footer>")
    script = f'<script type="text/javascript">{get_plotlyjs()}</script>' if charts else ""
    return (f'<!DOCTYPE html>\n<html lang="{escape(document.locale)}"><head><meta charset="utf-8">'
            f"<title>{escape(document.title)}</title><style>{STYLE}</style>{script}</head>"
            f'<body>{"".join(parts)}</body></html>\n')
