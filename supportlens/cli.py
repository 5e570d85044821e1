"""The ``supportlens`` command line: settings are resolved here, once, and passed down."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from supportlens.cli_changes import changes_app
from supportlens.cli_funnels import funnels
from supportlens.cli_reports import report_app
from supportlens.cli_support import paths as paths_verb
from supportlens.config import Settings, load_settings
from supportlens.contracts import KIND_NAMES, InvalidRecord, decode
from supportlens.errors import UserError
from supportlens.fit import fit
from supportlens.log_redaction import keep_secrets_out_of_logs
from supportlens.simulator.scenarios import SCENARIOS

app = typer.Typer(
    help="supportlens: correlate client and server spans, diagnose fault reports, declare incidents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
db_app = typer.Typer(help="The ClickHouse store: tables and their migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
dashboards_app = typer.Typer(help="Grafana dashboards as code: build their JSON, push them to Grafana.",
                             no_args_is_help=True)
app.add_typer(dashboards_app, name="dashboards")
accounts_app = typer.Typer(help="Customer accounts (tier, contacts, channel, locale) on the compacted `accounts` topic.",
                           no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
gateway_key_app = typer.Typer(help="API keys of the client apps that send to the gateway.", no_args_is_help=True)
app.add_typer(gateway_key_app, name="gateway-key")
app.add_typer(report_app, name="report")
app.add_typer(changes_app, name="changes")
app.command("funnels")(funnels)
app.command("paths")(paths_verb)

console = Console()
err_console = Console(stderr=True)


@app.callback()
def _settings(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML settings file.")] = None,
    bootstrap: Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers.")] = None,
    topic_prefix: Annotated[Optional[str], typer.Option(help="Prefix of every topic name.")] = None,
    partitions: Annotated[Optional[int], typer.Option(help="Partitions per topic.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Local state directory.")] = None,
    clickhouse_dsn: Annotated[Optional[str], typer.Option(help="ClickHouse DSN (default: embedded chDB).")] = None,
) -> None:
    ctx.obj = load_settings(
        config,
        kafka_bootstrap=bootstrap,
        topic_prefix=topic_prefix,
        partitions=partitions,
        state_dir=state_dir,
        clickhouse_dsn=clickhouse_dsn,
    )
    keep_secrets_out_of_logs(ctx.obj.secret_values())


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the resolved settings (secrets masked)."""
    settings: Settings = ctx.obj
    table = Table("setting", "value", title="supportlens settings")
    for key, value in settings.public_view().items():
        table.add_row(key, str(value))
    console.print(fit(table, ids={"setting"}))


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create missing topics and align retention/compaction; checks co-partitioning."""
    from supportlens.topics import TOPICS, provision

    settings: Settings = ctx.obj
    changes = provision(settings)
    table = Table("topic", "action", "detail", "purpose", title=f"topics on {settings.kafka_bootstrap}")
    purposes = {settings.topic(spec.name): spec.purpose for spec in TOPICS}
    for change in changes:
        table.add_row(change.topic, change.action, change.detail, purposes.get(change.topic, ""))
    console.print(fit(table, ids={"topic"}, optional=("purpose",)))


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """Show the pipeline's topics and their partition counts."""
    from supportlens.topics import TOPICS, admin_client, check_reachable, existing_partitions

    settings: Settings = ctx.obj
    admin = admin_client(settings)
    check_reachable(admin, settings)
    have = existing_partitions(admin)
    table = Table("topic", "key", "partitions", "join group", "purpose")
    for spec in TOPICS:
        name = settings.topic(spec.name)
        table.add_row(name, spec.key, str(have.get(name, "missing")), spec.join.value if spec.join else "", spec.purpose)
    console.print(fit(table, ids={"topic"}, optional=("purpose",)))


@app.command()
def simulate(
    ctx: typer.Context,
    scenario: Annotated[str, typer.Option(help=f"One of: {', '.join(SCENARIOS)}.")] = "normal",
    rate: Annotated[float, typer.Option(help="Requests per simulated second at the daily peak.")] = 200.0,
    duration: Annotated[int, typer.Option(help="Simulated seconds of traffic.")] = 60,
    users: Annotated[int, typer.Option(help="Simulated end users.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same run.")] = 7,
    speed: Annotated[float, typer.Option(help="Simulated seconds per wall second (time compression); 0 = as fast as possible.")] = 1.0,
    start: Annotated[Optional[datetime], typer.Option(help="Simulated start time, UTC (default: now).")] = None,
    labels: Annotated[Path, typer.Option(help="Where the ground-truth labels (JSON lines) go.")] = Path("labels.jsonl"),
) -> None:
    """Send realistic traffic (spans, fault reports, behaviour, accounts) to Kafka."""
    from supportlens.simulator.run import SimulateOptions, simulate as run_simulation

    settings: Settings = ctx.obj
    options = SimulateOptions(scenario, rate, duration, seed, users, speed, start, labels)
    with _progress() as bar:
        task = bar.add_task(f"simulating {scenario}", total=duration, sent=0)
        summary = run_simulation(
            settings, options, progress=lambda done, total, sent: bar.update(task, completed=done, sent=sent)
        )
    table = Table("topic", "records", title=f"{scenario}: {summary.requests:,} requests, labels in {labels}")
    for topic, count in summary.counts.items():
        table.add_row(settings.topic(topic), f"{count:,}")
    console.print(fit(table, ids={"topic"}))


@app.command()
def validate(
    kind: Annotated[str, typer.Option(help="span | fault-report | behaviour | account")],
    path: Annotated[Path, typer.Argument(help="A JSON-lines file, one record per line.", exists=True, dir_okay=False)],
) -> None:
    """Check records against the event contracts; every problem is listed with its line and field."""
    types = {name.replace(" ", "-").replace("-event", ""): cls for cls, name in KIND_NAMES.items()}
    if kind not in types:
        raise UserError(f"unknown kind {kind!r}", hint=f"use one of {', '.join(types)}")
    bad = 0
    total = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            total += 1
            try:
                decode(line.rstrip(b"\n"), types[kind])
            except InvalidRecord as exc:
                bad += 1
                console.print(f"[red]line {number}[/]: {exc.reason}")
    console.print(f"{total - bad} of {total} records valid")
    if bad:
        raise typer.Exit(1)


@app.command()
def demo(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option(help="Requests per simulated second at the daily peak.")] = 80.0,
    window: Annotated[int, typer.Option(help="Simulated seconds of each outage's part of the day.")] = 300,
    out: Annotated[Path, typer.Option(help="Where labels, the topics' events and the logs go.")] = Path("out/demo"),
) -> None:
    """Replay a past day through Kafka and the pipeline: correlation, diagnoses, incidents, VIP notices, a drill."""
    from supportlens.demo import run_demo

    run_demo(ctx.obj, console, rate=rate, window_s=window, out_dir=out, progress=_progress)


@app.command()
def worker(
    ctx: typer.Context,
    catalog: Annotated[Optional[Path], typer.Option(help="Problem catalog (TOML); default: the bundled one.")] = None,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the stream processors: correlate spans, diagnose fault reports, detect surges, manage incidents."""
    from streams.catalog import DEFAULT_PATH, load_catalog
    from streams.correlate import Timing
    from streams.detect import EngineConfig
    from streams.incidents import DEFAULT_POLICY_PATH, load_policy
    from streams.notices import Notifier, load_templates
    from streams.surge import SurgeParams
    from streams.worker import run_worker

    settings: Settings = ctx.obj
    timing = Timing(settings.correlation_settle_s, settings.correlation_grace_s, settings.correlation_retain_s)
    params = SurgeParams()
    engine = EngineConfig(SurgeParams(warmup_buckets=settings.surge_warmup_s // params.bucket_s))
    policy = load_policy(settings.incident_policy or DEFAULT_POLICY_PATH)
    problems = load_catalog(catalog or DEFAULT_PATH)
    notifier = Notifier(load_templates(), problems, settings.status_page_url)
    run_worker(settings, problems, timing, policy, engine, notifier, loglevel)


@app.command()
def gateway(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve the ingest endpoints (OTLP/HTTP traces, fault reports, behaviour) and report status."""
    from supportlens.gateway.server import run_gateway

    run_gateway(ctx.obj, loglevel)


@gateway_key_app.command("new")
def gateway_key_new(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Option("--app", help="The client app the key is for, e.g. ios.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Make a new API key for a client app: print it once, with the lines that let the gateway accept it.

    The key is not stored anywhere; the keys file gets only its SHA-256. Give an app a second key
    to replace the first: both work until the old hash is removed from the file.
    """
    from supportlens.gateway.access import APP_NAME, key_sha256, keys_file_lines, load_client_apps, new_key
    from supportlens.gateway.ratelimit import RateLimit

    settings: Settings = ctx.obj
    if not APP_NAME.match(app_name):
        raise UserError(f"--app {app_name[:80]!r} is not an app name", hint="use 1 to 64 letters, digits, '-' or '_'")
    key = new_key()
    digest = key_sha256(key)
    keys_file = settings.gateway_api_keys_file
    known: tuple[str, ...] = ()
    if keys_file is not None and keys_file.is_file():
        try:
            default = RateLimit(settings.gateway_rate_per_s, settings.gateway_rate_burst)
            known = next((a.key_sha256 for a in load_client_apps(keys_file, default) if a.name == app_name), ())
        except UserError as exc:  # the new key is still good; the operator edits the file anyway
            err_console.print(f"[yellow]note:[/] {escape(exc.message)}", highlight=False)
    lines = keys_file_lines(app_name, (*known, digest))
    if as_json:
        print(msgspec.json.encode({"app": app_name, "key": key, "key_sha256": digest, "keys_file_lines": lines}).decode())
        return
    where = str(keys_file) if keys_file else "the gateway's keys file (gateway_api_keys_file)"
    console.print(f"New API key for app [bold]{app_name}[/] (shown only now; supportlens keeps only its hash):\n",
                  highlight=False)
    print(f"  {key}\n")
    console.print("The app sends it as `Authorization: Bearer <key>` or `X-Supportlens-Key: <key>`; an "
                  "OpenTelemetry exporter with:\n", highlight=False, markup=False)
    print(f"  OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20{key}\n")
    if known:
        console.print(f"App {app_name} has {len(known)} key(s) in {where}: replace its key_sha256 line with the one "
                      "below, restart the gateways, and remove the old hash once no client sends the old key:\n",
                      highlight=False, markup=False)
    else:
        console.print(f"Add to {where}, then restart the gateways:\n", highlight=False, markup=False)
    print(lines)


@app.command()
def sink(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Write every topic to ClickHouse (batched; offsets committed after each insert)."""
    from supportlens.serve import run_sink_process

    run_sink_process(ctx.obj, loglevel)


@app.command()
def notify(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Deliver customer notifications (signed webhook or e-mail, with retries) until SIGINT/SIGTERM."""
    from sinks.notifications import run_notify

    run_notify(ctx.obj, loglevel)


@app.command()
def serve(
    ctx: typer.Context,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Run the stream worker beside.")] = True,
    sink: Annotated[bool, typer.Option("--sink/--no-sink", help="Run the ClickHouse sink in this process.")] = True,
    loglevel: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the worker, the ClickHouse sink and the support API together (the one-machine setup)."""
    from supportlens.serve import run_serve

    run_serve(ctx.obj, with_worker=worker, with_sink=sink, loglevel=loglevel)


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Create or update the tables (numbered migrations, each applied once) and their retention."""
    from supportlens import store

    settings: Settings = ctx.obj
    applied = store.migrate(store.connect(settings), settings)
    where = f"{store.redact_dsn(settings.clickhouse_dsn)} database {settings.clickhouse_database}"
    console.print(f"{where}: " + (", ".join(applied) if applied else "up to date"))


@db_app.command("status")
def db_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Rows in every table (as queries see them: each row once)."""
    from supportlens.support.access import open_support
    from supportlens.support.render import counts_table

    settings: Settings = ctx.obj
    counts = open_support(settings).table_counts()
    if as_json:
        print(msgspec.json.encode(counts).decode())
    else:
        console.print(counts_table(counts, settings.clickhouse_database))


@dashboards_app.command("build")
def dashboards_build(
    out: Annotated[Optional[Path], typer.Option(help="Where the JSON goes (default: dashboards/json).")] = None,
) -> None:
    """Write every dashboard's JSON (sorted, so a change reads as a small diff)."""
    from dashboards.build import JSON_DIR, all_dashboards, write

    target = out or JSON_DIR
    changed = write(target)
    console.print(f"{len(all_dashboards())} dashboards in {target}: "
                  + (", ".join(path.name for path in changed) or "up to date"))


@dashboards_app.command("push")
def dashboards_push(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(
        "--force", help="Write everything again, also what looks unchanged "
        "(Grafana never shows a stored password, so a new one alone is not seen).")] = False,
) -> None:
    """Create or update the folder, the ClickHouse and Prometheus datasources and every dashboard in Grafana."""
    from collections import Counter

    from dashboards.build import all_dashboards
    from dashboards.provision import push
    from supportlens.config import redact_dsn

    settings: Settings = ctx.obj
    changes = push(settings, all_dashboards(), force=force)
    table = Table("kind", "uid", "title", "action", title=f"Grafana at {redact_dsn(settings.grafana_url)}")
    for change in changes:
        table.add_row(change.kind, change.uid, change.title, change.action)
    console.print(fit(table, ids={"uid"}))
    counts = Counter(change.action for change in changes)
    console.print(", ".join(f"{counts[a]} {a}" for a in ("created", "updated", "unchanged")))


@app.command()
def lookup(
    ctx: typer.Context,
    ip: Annotated[Optional[str], typer.Option("--ip", help="A client IP: that client's timeline.")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="A user id: that user's timeline.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="An account id: that account's timeline.")] = None,
    request: Annotated[Optional[str], typer.Option("--request", help="A request id: its call chain.")] = None,
    report: Annotated[Optional[str], typer.Option("--report", help="A fault report id: what was said and answered.")] = None,
    since: Annotated[str, typer.Option(help="How far back, e.g. 30m, 24h, 7d.")] = "24h",
    until: Annotated[str, typer.Option(help="End of the window: now, an ISO time, or 2h (ago).")] = "now",
    limit: Annotated[int, typer.Option(help="At most this many requests and reports.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """What happened to a customer (by IP, user, account), a request or a fault report."""
    from supportlens.store.lookup import LookupInputError, parse_duration, parse_until
    from supportlens.support import render
    from supportlens.support.access import open_support

    given = {k: v for k, v in (("ip", ip), ("user", user), ("account", account), ("request", request),
                               ("report", report)) if v is not None}
    if len(given) != 1:
        raise LookupInputError("give exactly one of --ip, --user, --account, --request or --report",
                               hint="e.g. supportlens lookup --ip 203.0.113.7 --since 24h")
    (kind, key), = given.items()
    end = parse_until(until)
    start = end - parse_duration(since) * 1_000_000
    support = open_support(ctx.obj)
    if kind == "request":
        result: Any = support.request_chain(key)
        view: Any = render.chain_view(result)
    elif kind == "report":
        result = support.report_detail(key)
        view = render.report_view(result)
    else:
        result = support.timeline(kind, key, start, end, limit)
        view = render.timeline_table(result)
    if as_json:
        print(msgspec.json.encode(result).decode())
    else:
        console.print(view)


@app.command()
def top(
    ctx: typer.Context,
    by: Annotated[str, typer.Option(help="service | region | network | connection | app_version | platform")] = "service",
    since: Annotated[str, typer.Option(help="How far back, e.g. 24h, 7d.")] = "7d",
    until: Annotated[str, typer.Option(help="End of the window: now, an ISO time, or 2h (ago).")] = "now",
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The problems that hit the most users, by a dimension (global trends)."""
    from supportlens.store.lookup import parse_duration, parse_until
    from supportlens.support.access import open_support
    from supportlens.support.render import top_table

    end = parse_until(until)
    result = open_support(ctx.obj).top_problems(by, end - parse_duration(since) * 1_000_000, end, limit)
    if as_json:
        print(msgspec.json.encode(result).decode())
    else:
        console.print(top_table(result))


@app.command()
def incidents(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Also incidents resolved long ago.")] = False,
    since: Annotated[str, typer.Option(help="Resolved incidents of this window are shown too, e.g. 24h, 7d.")] = "24h",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Open incidents, and those resolved recently, with their latest transition and its reason."""
    import time

    from supportlens.incident_desk import current_incidents, read_incidents
    from supportlens.store.lookup import parse_duration

    horizon = int(time.time() * 1_000_000) - parse_duration(since) * 1_000_000
    shown = [e for e in current_incidents(read_incidents(ctx.obj))
             if all_ or e.transition != "resolved" or e.at_us >= horizon]
    if as_json:
        print(msgspec.json.encode(shown).decode())
        return
    from supportlens.support.render import incidents_table

    console.print(incidents_table(shown))


@app.command()
def declare(
    ctx: typer.Context,
    title: Annotated[str, typer.Option(help="One line: what is wrong.")],
    service: Annotated[Optional[str], typer.Option(help="The affected service.")] = None,
    region: Annotated[Optional[str], typer.Option(help="The affected region.")] = None,
    network: Annotated[Optional[str], typer.Option(help="The affected network (ISP).")] = None,
    app_version: Annotated[Optional[str], typer.Option(help="The affected app version.")] = None,
    platform: Annotated[Optional[str], typer.Option(help="The affected platform.")] = None,
    severity: Annotated[Optional[str], typer.Option(help="sev1 … sev4 (default: by policy).")] = None,
    by: Annotated[Optional[str], typer.Option(help="Who declares (default: your login name).")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Declare an incident by hand; surges in its dimensions join it."""
    import getpass
    import time

    from supportlens.incident_desk import declare as send_declaration

    dimensions = {k: v for k, v in (("service", service), ("region", region), ("network", network),
                                    ("app_version", app_version), ("platform", platform)) if v}
    event = send_declaration(ctx.obj, title=title, dimensions=dimensions, by=by or getpass.getuser(),
                             reason=reason or "declared by a person", severity=severity,
                             now_us=int(time.time() * 1_000_000))
    console.print(f"declared [bold]{event.incident_id}[/] ({event.severity}): {event.title}")


@app.command()
def resolve(
    ctx: typer.Context,
    incident_id: Annotated[str, typer.Argument(help="The incident, as `supportlens incidents` lists it.")],
    by: Annotated[Optional[str], typer.Option(help="Who resolves (default: your login name).")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Resolve an incident by hand; its end is announced like an automatic resolution."""
    import getpass
    import time

    from supportlens.incident_desk import resolve as send_resolution

    event = send_resolution(ctx.obj, incident_id, by=by or getpass.getuser(), reason=reason,
                            now_us=int(time.time() * 1_000_000))
    console.print(f"resolved [bold]{event.incident_id}[/]: {event.reason}")


@accounts_app.command("import")
def accounts_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="CSV: account_id,name,tier,locale,channel,webhook_url,contact_emails,service_manager")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only check the file; send nothing.")] = False,
) -> None:
    """Load accounts from a CSV file; each bad row is named with its line, the good ones are imported.

    Exit code 1 when any row was bad (the good ones are still imported), 2 when the file cannot be read.
    """
    from supportlens.accounts import produce_accounts, read_accounts_file

    settings: Settings = ctx.obj
    parsed = read_accounts_file(path)
    for problem in parsed.problems:
        err_console.print(str(problem), style="red", markup=False, highlight=False, soft_wrap=True)
    good = [account for _, account in parsed.accounts]
    topic = settings.topic("accounts")
    if dry_run:
        console.print(f"{len(good):,} accounts valid, {_rows(parsed.bad_rows)} with problems (nothing sent)")
    else:
        sent = produce_accounts(settings, good) if good else 0
        vip = sum(account.tier == "vip" for account in good)
        console.print(f"imported {sent:,} accounts ({vip:,} VIP) to {topic}")
    if parsed.problems:
        err_console.print(f"{_rows(parsed.bad_rows)} not imported: fix them and import the file again "
                          "(accounts already imported are replaced, never doubled)")
        raise typer.Exit(1)


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


@accounts_app.command("list")
def accounts_list(
    ctx: typer.Context,
    vip: Annotated[bool, typer.Option("--vip", help="Only VIP accounts.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The accounts as the pipeline sees them (the latest record of each on the compacted topic)."""
    from supportlens.accounts import read_accounts

    accounts = [a for a in read_accounts(ctx.obj) if a.tier == "vip" or not vip]
    if as_json:
        print(msgspec.json.encode(accounts).decode())
        return
    from supportlens.support.render import accounts_table

    console.print(accounts_table(accounts))


@app.command()
def drill(
    ctx: typer.Context,
    incident: Annotated[str, typer.Option("--incident", help="The recorded incident to replay (`supportlens incidents --all`).")],
    speed: Annotated[float, typer.Option(help="Recorded seconds per wall second; 0 = as fast as possible.")] = 60.0,
    lead: Annotated[str, typer.Option(help="Replay from this long before the incident's start, e.g. 15m.")] = "15m",
    tail: Annotated[str, typer.Option(help="Replay until this long after its end, e.g. 5m.")] = "5m",
    drill_id: Annotated[Optional[str], typer.Option(help="The drill's id (default: a new random one).")] = None,
) -> None:
    """Replay a past incident's recorded spans and fault reports into Kafka as a drill (time-shifted, marked)."""
    from supportlens.drill import DrillOptions, run_drill
    from supportlens.support.access import open_support

    settings: Settings = ctx.obj
    options = DrillOptions(incident, speed, _seconds(lead, "--lead"), _seconds(tail, "--tail"), drill_id or "")
    support = open_support(settings)
    with _progress("recorded s") as bar:
        task = bar.add_task(f"drill of {incident}", total=None, sent=0)
        summary = run_drill(settings, support, options,
                            progress=lambda done, total, sent: bar.update(task, completed=done, total=total, sent=sent))
    since, until = summary.window_us
    table = Table("topic", "replayed", "records", title=f"drill {summary.drill_id} of {summary.incident.incident_id}: "
                  f"{summary.incident.title or summary.incident.root_key}")
    # spans travel in batch records, so what was replayed and the records it took differ
    for topic, unit in (("client-spans", "spans"), ("server-spans", "spans"), ("fault-reports", "reports")):
        table.add_row(settings.topic(topic), f"{summary.counts.get(topic, 0):,} {unit}",
                      f"{summary.records.get(topic, 0):,}")
    console.print(fit(table, ids={"topic"}))
    console.print(f"replayed {_utc(since)} – {_utc(until)} (recorded) as {_utc(summary.drill_start_us)} – "
                  f"{_utc(summary.drill_start_us + until - since)}; every id is now drill-{summary.drill_id}-<id>, "
                  "every record carries supportlens.drill=true")
    if summary.logs_lost:
        console.print(f"{summary.logs_lost:,} fault reports replayed without their client log: ClickHouse keeps "
                      "only its length for reports that did not come through the gateway")
    if summary.refused:
        err_console.print(f"{summary.refused:,} records not sent, the contracts refused them: "
                          + "; ".join(summary.skipped[:3]))
    console.print("what the pipeline declares from it: `supportlens incidents` (marked drill); "
                  f"its requests: `supportlens lookup --request drill-{summary.drill_id}-<request id>`")


def _seconds(text: str, flag: str) -> int:
    from supportlens.store.lookup import LookupInputError, parse_duration

    if text.strip() in ("0", "0s", "0m"):
        return 0
    try:
        return parse_duration(text)
    except LookupInputError as exc:
        raise UserError(f"{flag}: {exc.message}", hint=exc.hint) from None


def _utc(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _progress(unit: str = "sim s") -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit + " · {task.fields[sent]:,} records", style="dim"),
        TimeElapsedColumn(),
        console=err_console,
    )


def main() -> None:
    """Entry point: user mistakes become a message and a hint, with exit code 2.

    Usage errors (a bad flag value) are typer's own, already short and clear.
    """
    try:
        app(prog_name="supportlens")
    except UserError as exc:
        # escaped: messages quote what the user wrote, e.g. a TOML table `[apps.ios]`, which is no markup
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
