"""Pipeline health: is every process up, how fast records flow, how far behind the consumers
are, what is dead-lettered, how long ClickHouse inserts take, how many incidents are open.

Prometheus metrics of ``supportlens/metrics.py`` (scraped by jobs named ``supportlens*``,
the same the alert rules watch). ``$__rate_interval`` is Grafana's: at least four scrapes.
"""

from __future__ import annotations

from dashboards.common import Dashboard, Panel, PromQL, change_annotation, row, stat, timeseries

UID = "supportlens-pipeline"
JOBS = 'job=~"supportlens.*"'


def targets_up() -> Panel:
    return stat("Processes up", "Scrape targets answering, per job (gateway, worker, sink, support API).",
                PromQL(f"sum by (job) (up{{{JOBS}}})", "{{job}}"), color="green")


def incidents_open() -> Panel:
    return stat("Open incidents", "Open incidents by severity, drills left out.",
                PromQL('sum by (severity) (supportlens_incidents_open{drill="false"})', "{{severity}}"),
                warn_at=1, color="green")


def dead_letter_rate() -> Panel:
    return stat("Dead letters / s", "Records sent to the dead-letter topic, all topics.",
                PromQL("sum(rate(supportlens_dead_letters_total[$__rate_interval]))", "dead letters"),
                unit="short", warn_at=0.1, color="green")


def seconds_since_progress() -> Panel:
    return stat("Seconds since progress", "Since each component last processed a record.",
                PromQL("time() - max by (component) (supportlens_last_progress_timestamp_seconds)", "{{component}}"),
                unit="s", warn_at=300, color="green")


def records_in() -> Panel:
    return timeseries("Records read / s", "By logical topic, all processes.",
                      PromQL("sum by (topic) (rate(supportlens_events_in_total[$__rate_interval]))", "{{topic}}"),
                      unit="ops")


def records_out() -> Panel:
    return timeseries("Records written / s", "By logical topic, all processes.",
                      PromQL("sum by (topic) (rate(supportlens_events_out_total[$__rate_interval]))", "{{topic}}"),
                      unit="ops")


def consumer_lag() -> Panel:
    return timeseries("Consumer lag", "Records on the broker not yet read, by component and topic.",
                      PromQL("sum by (component, topic) (supportlens_consumer_lag_records)", "{{component}} {{topic}}"))


def dead_letters() -> Panel:
    return timeseries("Dead letters / s by source topic", "Records no stage could accept.",
                      PromQL("sum by (topic) (rate(supportlens_dead_letters_total[$__rate_interval]))", "{{topic}}"),
                      unit="ops")


def sink_write_latency() -> Panel:
    def quantile(q: float) -> PromQL:
        return PromQL(f"histogram_quantile({q}, sum by (le, table) "
                      f"(rate(supportlens_sink_write_seconds_bucket[$__rate_interval])))",
                      f"p{round(q * 100)} {{{{table}}}}")

    return timeseries("ClickHouse insert time", "One sink batch insert, p50 and p99 by table.",
                      quantile(0.5), quantile(0.99), unit="s")


def sink_rows() -> Panel:
    return timeseries("Rows written to ClickHouse / s", "By table.",
                      PromQL("sum by (table) (rate(supportlens_sink_rows_written_total[$__rate_interval]))",
                             "{{table}}"),
                      unit="ops")


def sink_trouble() -> Panel:
    return timeseries("Sink failures and held records", "Failed inserts per second (retried), and records read "
                      "but held uncommitted while ClickHouse refuses.",
                      PromQL("sum(rate(supportlens_sink_write_failures_total[$__rate_interval]))",
                             "failed inserts / s"),
                      PromQL("sum(supportlens_sink_held_records)", "held records"))


def processing_latency() -> Panel:
    return timeseries("Processing latency p99", "From a record's Kafka timestamp to its processing, by component.",
                      PromQL("histogram_quantile(0.99, sum by (le, component) "
                             "(rate(supportlens_processing_latency_seconds_bucket[$__rate_interval])))",
                             "{{component}}"),
                      unit="s")


def dashboard() -> Dashboard:
    return Dashboard(
        UID, "supportlens · Pipeline health",
        "Throughput, consumer lag, dead letters, sink latency and open incidents (Prometheus).",
        panels=(
            targets_up(), incidents_open(), dead_letter_rate(), seconds_since_progress(),
            records_in(), records_out(), consumer_lag(), dead_letters(),
            row("ClickHouse sink"),
            sink_write_latency(), sink_rows(), sink_trouble(), processing_latency(),
        ),
        annotations=(change_annotation(),),
        time_from="now-3h",
    )
