"""The ClickHouse store: connecting, numbered migrations, retention.

One code path for both deployments: the embedded engine (chDB, ``chdb:///path``; only
one process may open a path) and a ClickHouse server (``http://host:8123``). Every
table lives in ``settings.clickhouse_database``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import clickhouse_connect
import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from supportlens.config import Settings, redact_dsn
from supportlens.errors import UserError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
EMBEDDED_IDLE_THREADS = 16  # idle threads the embedded engine may keep (ClickHouse's default: 1,000)

# The column each table's retention counts from.
TTL_COLUMNS: dict[str, str] = {
    "spans": "start",
    "requests": "start",
    "fault_reports": "received_at",
    "report_diagnoses": "received_at",
    "behaviour": "ts",
    "dead_letters": "at",
    "problem_trends": "minute",
    "surges": "at",
    "incidents": "started_at",
    "changes": "started_at",
    "notifications": "created_at",
    "notification_deliveries": "at",
    "misuse_detections": "at",
}

# The tables a row count means something for (views and indexes left out).
DATA_TABLES: tuple[str, ...] = tuple(TTL_COLUMNS)


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        chunks = re.split(r";[ \t]*$", self.sql, flags=re.MULTILINE)
        return [chunk.strip() for chunk in chunks if _has_code(chunk)]


def _has_code(chunk: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in chunk.splitlines())


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration in ``migrations/``, in number order (``0001_spans.sql`` …)."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        number, _, name = path.stem.partition("_")
        found.append(Migration(int(number), name, path.read_text()))
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return tuple(found)


class StoreLocked(UserError):
    """The embedded store is open in another process."""


def connect(settings: Settings, *, create_database: bool = True) -> Client:
    """A client on ``settings.clickhouse_database``, creating the database if asked.

    Raises :class:`UserError` when the server cannot be reached, and
    :class:`StoreLocked` when another process holds the embedded store.
    """
    database = settings.clickhouse_database
    try:
        if create_database:
            _client(settings, None).command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        return _client(settings, database)
    except ClickHouseError as exc:
        raise _explain(settings, exc) from None


def _client(settings: Settings, database: str | None) -> Client:
    return clickhouse_connect.get_client(dsn=settings.clickhouse_dsn, database=database, **client_options(settings))


def client_options(settings: Settings) -> dict[str, Any]:
    """clickhouse-connect's arguments beyond the DSN: the password and, for a server, TLS.

    An ``https://`` DSN turns TLS on; these say whom to trust and who we are.
    """
    options: dict[str, Any] = {}
    if settings.clickhouse_password is not None:
        options["password"] = settings.clickhouse_password.get_secret_value()
    if settings.embedded_store:
        # ClickHouse keeps up to 1,000 idle threads for good, each with its allocator cache; in a
        # sink-shaped experiment a burst of parallel part removals left ~100 of them (+35 MB RSS).
        # The first connection of a process starts the engine with these.
        options["chdb_options"] = {"max_thread_pool_free_size": EMBEDDED_IDLE_THREADS}
        return options
    # clickhouse-connect infers TLS from the port (443, 8443), not from the DSN's scheme:
    # https://host:9440 would go out as plain HTTP, password and all
    options["interface"] = "https" if settings.clickhouse_dsn.lower().startswith("https:") else "http"
    if settings.clickhouse_ca_cert is not None:
        options["ca_cert"] = str(settings.clickhouse_ca_cert)
    if settings.clickhouse_client_cert is not None:
        options["client_cert"] = str(settings.clickhouse_client_cert)
    if settings.clickhouse_client_key is not None:
        options["client_cert_key"] = str(settings.clickhouse_client_key)
    if not settings.clickhouse_verify:
        options["verify"] = False
    return options


def _explain(settings: Settings, exc: Exception) -> UserError:
    message = str(exc)
    if settings.embedded_store and ("EmbeddedServer" in message or "Unable to open the chdb" in message):
        return StoreLocked(
            f"the embedded ClickHouse store ({settings.clickhouse_dsn}) is open in another process",
            hint="while `supportlens serve` runs, reach the store through it (lookups do so by themselves); "
            "otherwise stop the other process",
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return UserError(
        f"cannot use ClickHouse at {redact_dsn(settings.clickhouse_dsn)}: {first_line[:300]}",
        hint="check SUPPORTLENS_CLICKHOUSE_DSN and that the server is up",
    )


def migrate(client: Client, settings: Settings) -> list[str]:
    """Apply the migrations not yet recorded, then bring retention to the configured TTLs.

    Idempotent. Returns the names of what was applied. A recorded migration whose file
    changed since is refused: migrations are history, a change is a new number.
    """
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(number UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY number"
    )
    recorded = {row[0]: (row[1], row[2]) for row in client.query(
        "SELECT number, name, checksum FROM schema_migrations FINAL"
    ).result_rows}
    applied = []
    for migration in migrations():
        if migration.number in recorded:
            name, checksum = recorded[migration.number]
            if checksum != migration.checksum:
                raise UserError(
                    f"migration {migration.number:04d}_{migration.name} was changed after it was applied",
                    hint="restore the file and add the change as a new numbered migration",
                )
            continue
        for statement in migration.statements():
            client.command(statement)
        client.insert(
            "schema_migrations", [[migration.number, migration.name, migration.checksum]],
            column_names=["number", "name", "checksum"],
        )
        applied.append(f"{migration.number:04d}_{migration.name}")
    applied.extend(apply_retention(client, settings))
    return applied


def apply_retention(client: Client, settings: Settings) -> list[str]:
    """Set each table's TTL to ``settings.clickhouse_ttl_days``; only what differs is altered."""
    current = dict(client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"
    ).result_rows)
    changed = []
    for table, column in TTL_COLUMNS.items():
        days = settings.clickhouse_ttl_days[table]
        has_ttl = " TTL " in current.get(table, "")
        wanted = f"toDateTime({column}) + toIntervalDay({days})"
        if days == 0:
            if has_ttl:
                client.command(f"ALTER TABLE {table} REMOVE TTL")
                changed.append(f"{table}: keep forever")
        elif wanted not in current.get(table, ""):
            # Existing parts are dropped by merges as they age; no rewrite of the table now.
            client.command(
                f"ALTER TABLE {table} MODIFY TTL toDateTime({column}) + INTERVAL {int(days)} DAY",
                settings={"materialize_ttl_after_modify": 0},
            )
            changed.append(f"{table}: keep {days} days")
    return changed


class TableCounts(msgspec.Struct, frozen=True):
    """Rows per data table as queries see them (``rows``: each key once), and as stored
    (``stored``: also re-delivered copies a merge has not yet collapsed)."""

    rows: dict[str, int]
    stored: dict[str, int]


def table_counts(client: Client) -> TableCounts:
    rows, stored = {}, {}
    for table in DATA_TABLES:
        rows[table] = client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
        stored[table] = client.query(f"SELECT count() FROM {table}").result_rows[0][0]
    return TableCounts(rows, stored)
