"""Sinks: where records leave the pipeline (the console today; ClickHouse and notifications next)."""
