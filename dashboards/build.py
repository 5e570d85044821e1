"""Assemble every dashboard and write its JSON beside the code (``dashboards/json/<uid>.json``).

The JSON is committed: Grafana's file provisioning (deploy/compose.yaml) reads it, and a
review sees what a change does to a dashboard. Keys are sorted and the layout is fixed, so
building twice gives the same bytes, and a test fails when the files and the code disagree.

    python -m dashboards.build          # or: supportlens dashboards build
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dashboards import incidents, pipeline, problem_trends, surges
from dashboards.common import Dashboard

JSON_DIR = Path(__file__).resolve().parent / "json"


def all_dashboards() -> tuple[Dashboard, ...]:
    return (problem_trends.dashboard(), surges.dashboard(), incidents.dashboard(), pipeline.dashboard())


def render(dashboard: Dashboard) -> str:
    """The dashboard's JSON as committed: sorted keys, two-space indent, a final newline."""
    return json.dumps(dashboard.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """File name → content of every dashboard."""
    return {f"{d.uid}.json": render(d) for d in all_dashboards()}


def write(out_dir: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard and remove JSON files no dashboard builds any more; returns what changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_files()
    changed = []
    for name, content in expected.items():
        path = out_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            changed.append(path)
    for stale in sorted(set(p.name for p in out_dir.glob("*.json")) - set(expected)):
        (out_dir / stale).unlink()
        changed.append(out_dir / stale)
    return changed


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else JSON_DIR
    changed = write(out_dir)
    print(f"{len(expected_files())} dashboards in {out_dir}: " + (", ".join(p.name for p in changed) or "up to date"))


if __name__ == "__main__":
    main()
