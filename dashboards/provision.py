"""Push the dashboards to a running Grafana through its HTTP API (grafana-client).

Creates or updates, in this order, the ``supportlens`` folder, the ClickHouse and Prometheus
datasources (fixed uids, as the dashboards name them) and every dashboard. Idempotent: each
object is read first and written only when it differs, so a second push reports everything
``unchanged``. Grafana never returns a stored secret, so a changed password alone is not
seen: ``force`` writes everything again.

The compose deployment does not need this: Grafana provisions the same objects from files
(``deploy/grafana/provisioning``). Objects provisioned from files are read-only to the API;
a push that would change one says so instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import niquests
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from dashboards.common import (
    CLICKHOUSE_PLUGIN, CLICKHOUSE_UID, FOLDER_TITLE, FOLDER_UID, PROMETHEUS_UID, Dashboard,
)
from supportlens.config import Settings, redact_dsn
from supportlens.errors import UserError

Action = Literal["created", "updated", "unchanged"]
T = TypeVar("T")
TIMEOUT_S = 10.0
# Fields Grafana adds to a stored dashboard; they are not part of what we build.
SERVER_FIELDS = frozenset({"id", "version"})
MESSAGE = "supportlens dashboards push"


@dataclass(frozen=True)
class Change:
    kind: str  # folder | datasource | dashboard
    uid: str
    title: str
    action: Action


def datasources(settings: Settings) -> list[dict[str, Any]]:
    """The datasources as Grafana should hold them (with their secrets, for writing only).

    ClickHouse is reached over HTTP at ``grafana_clickhouse_dsn`` (default: ``clickhouse_dsn``
    when that is a server): the embedded engine lives inside one supportlens process and no
    Grafana can read it.
    """
    dsn = settings.grafana_clickhouse_dsn or ("" if settings.embedded_store else settings.clickhouse_dsn)
    if not dsn:
        raise UserError(
            "Grafana cannot read the embedded ClickHouse store (it lives inside one supportlens process)",
            hint="run a ClickHouse server (SUPPORTLENS_CLICKHOUSE_DSN=http://user:pass@host:8123), or tell Grafana "
            "where it is with SUPPORTLENS_GRAFANA_CLICKHOUSE_DSN",
        )
    parts = urlsplit(dsn)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"Grafana's ClickHouse must be an http(s) URL, got {redact_dsn(dsn)}",
                        hint="e.g. SUPPORTLENS_GRAFANA_CLICKHOUSE_DSN=http://supportlens:secret@clickhouse:8123")
    secure = parts.scheme == "https"
    password = parts.password or (settings.clickhouse_password.get_secret_value()
                                  if settings.clickhouse_password else "")
    clickhouse: dict[str, Any] = {
        "uid": CLICKHOUSE_UID, "name": "supportlens ClickHouse", "type": CLICKHOUSE_PLUGIN, "access": "proxy",
        "jsonData": {"defaultDatabase": settings.clickhouse_database, "host": parts.hostname,
                     "port": parts.port or (8443 if secure else 8123), "protocol": "http", "secure": secure,
                     "username": parts.username or "default"},
    }
    if password:
        clickhouse["secureJsonData"] = {"password": password}
    prometheus = {
        "uid": PROMETHEUS_UID, "name": "supportlens Prometheus", "type": "prometheus", "access": "proxy",
        "url": settings.grafana_prometheus_url, "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }
    return [clickhouse, prometheus]


def connect(settings: Settings) -> GrafanaApi:
    """A client with the configured credentials, after Grafana answered; UserError otherwise."""
    url = settings.grafana_url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"SUPPORTLENS_GRAFANA_URL must be an http(s) URL, got {redact_dsn(url)!r}",
                        hint="e.g. http://127.0.0.1:3000")
    credential: str | tuple[str, str] | None = None
    if settings.grafana_token is not None:
        credential = settings.grafana_token.get_secret_value()
    elif settings.grafana_user:
        credential = (settings.grafana_user,
                      settings.grafana_password.get_secret_value() if settings.grafana_password else "")
    elif not parts.username:
        raise UserError("no Grafana credentials", hint="set SUPPORTLENS_GRAFANA_TOKEN to a service account token "
                        "(role Admin), or SUPPORTLENS_GRAFANA_USER and SUPPORTLENS_GRAFANA_PASSWORD")
    grafana = GrafanaApi.from_url(url, credential, timeout=TIMEOUT_S)
    # /api/health answers without credentials: a wrong URL and wrong credentials are told apart
    health = _call(settings, "reach Grafana", lambda: grafana.client.GET("/health"))
    if not isinstance(health, dict) or "database" not in health:
        raise UserError(f"{redact_dsn(url)} does not answer like Grafana (GET /api/health)",
                        hint="check SUPPORTLENS_GRAFANA_URL: Grafana's base URL, e.g. http://127.0.0.1:3000")
    return grafana


def push(settings: Settings, dashboards: Iterable[Dashboard], *, force: bool = False) -> list[Change]:
    """Create or update the folder, the datasources and ``dashboards``; returns what happened to each."""
    wanted_datasources = datasources(settings)
    grafana = connect(settings)
    _require_plugin(settings, grafana)
    changes = [_folder(settings, grafana, force)]
    changes += [_datasource(settings, grafana, model, force) for model in wanted_datasources]
    changes += [_dashboard(settings, grafana, d.to_json(), force) for d in dashboards]
    return changes


def _folder(settings: Settings, grafana: GrafanaApi, force: bool) -> Change:
    stored = _get(settings, f"read folder {FOLDER_UID}", lambda: grafana.folder.get_folder(FOLDER_UID))
    if stored is None:
        _call(settings, "create the folder", lambda: grafana.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID))
        return Change("folder", FOLDER_UID, FOLDER_TITLE, "created")
    if stored.get("title") == FOLDER_TITLE and not force:
        return Change("folder", FOLDER_UID, FOLDER_TITLE, "unchanged")
    _call(settings, "update the folder",
          lambda: grafana.folder.update_folder(FOLDER_UID, title=FOLDER_TITLE, overwrite=True))
    return Change("folder", FOLDER_UID, FOLDER_TITLE, "updated")


def datasource_differs(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether Grafana's datasource differs from ours in anything we set.

    Keys Grafana or a person added to ``jsonData`` are left alone; of the secrets only their
    presence can be compared (Grafana returns ``secureJsonFields``, never the values).
    """
    for key, value in wanted.items():
        if key == "secureJsonData":
            fields = stored.get("secureJsonFields") or {}
            if not all(fields.get(name) for name in value):
                return True
        elif key == "jsonData":
            have = stored.get("jsonData") or {}
            if any(have.get(k) != v for k, v in value.items()):
                return True
        elif stored.get(key) != value:
            return True
    return False


def _datasource(settings: Settings, grafana: GrafanaApi, wanted: dict[str, Any], force: bool) -> Change:
    uid, name = wanted["uid"], wanted["name"]
    stored = _get(settings, f"read datasource {uid}", lambda: grafana.datasource.get_datasource_by_uid(uid))
    if stored is None:
        _call(settings, f"create datasource {name!r}", lambda: grafana.datasource.create_datasource(wanted),
              hint=f"a datasource named {name!r} with another uid may exist: rename or delete it")
        return Change("datasource", uid, name, "created")
    if not force and not datasource_differs(stored, wanted):
        return Change("datasource", uid, name, "unchanged")
    if stored.get("readOnly"):
        raise UserError(f"datasource {name!r} is provisioned from files, so push cannot change it",
                        hint="change it in Grafana's provisioning files (deploy/grafana/provisioning/datasources)")
    _call(settings, f"update datasource {name!r}", lambda: grafana.datasource.update_datasource_by_uid(uid, wanted))
    return Change("datasource", uid, name, "updated")


def dashboard_differs(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether the stored dashboard (``GET /api/dashboards/uid/…``) differs from ``wanted`` or sits elsewhere."""
    model = {k: v for k, v in stored.get("dashboard", {}).items() if k not in SERVER_FIELDS}
    return model != wanted or stored.get("meta", {}).get("folderUid") != FOLDER_UID


def _dashboard(settings: Settings, grafana: GrafanaApi, wanted: dict[str, Any], force: bool) -> Change:
    uid, title = wanted["uid"], wanted["title"]
    stored = _get(settings, f"read dashboard {uid}", lambda: grafana.dashboard.get_dashboard(uid))
    if stored is not None and not force and not dashboard_differs(stored, wanted):
        return Change("dashboard", uid, title, "unchanged")
    if stored is not None and stored.get("meta", {}).get("provisioned"):
        raise UserError(f"dashboard {title!r} is provisioned from files, so push cannot change it",
                        hint="rebuild the files (supportlens dashboards build); Grafana reloads them by itself")
    body = {"dashboard": wanted, "folderUid": FOLDER_UID, "overwrite": True, "message": MESSAGE}
    _call(settings, f"save dashboard {title!r}", lambda: grafana.dashboard.update_dashboard(body))
    return Change("dashboard", uid, title, "created" if stored is None else "updated")


def _require_plugin(settings: Settings, grafana: GrafanaApi) -> None:
    found = _get(settings, "read the ClickHouse plugin",
                 lambda: grafana.client.GET(f"/plugins/{CLICKHOUSE_PLUGIN}/settings"))
    if found is None:
        raise UserError(
            f"Grafana at {redact_dsn(settings.grafana_url)} has no {CLICKHOUSE_PLUGIN} plugin",
            hint=f"install it: grafana cli plugins install {CLICKHOUSE_PLUGIN} (Docker: "
            f"GF_INSTALL_PLUGINS={CLICKHOUSE_PLUGIN}), then restart Grafana",
        )


def _get(settings: Settings, what: str, request: Callable[[], T]) -> T | None:
    """The object, or None when Grafana has none (404)."""

    def fetch() -> T | None:
        try:
            return request()
        except GrafanaClientError as exc:
            if exc.status_code == 404:
                return None
            raise

    return _call(settings, what, fetch)


def _call(settings: Settings, what: str, request: Callable[[], T], hint: str = "") -> T:
    """Run one API request; Grafana's and the network's failures become a UserError saying what failed."""
    where = redact_dsn(settings.grafana_url)
    try:
        return request()
    except GrafanaUnauthorizedError:
        raise UserError(f"Grafana at {where} refused the credentials ({what})",
                        hint="check SUPPORTLENS_GRAFANA_TOKEN (a service account token, role Admin) or "
                        "SUPPORTLENS_GRAFANA_USER / _PASSWORD") from None
    except GrafanaClientError as exc:
        if exc.status_code == 403:
            raise UserError(f"Grafana at {where} does not allow this account to {what}",
                            hint="the service account needs the Admin role: push writes datasources") from None
        raise UserError(f"Grafana at {where} refused to {what}: {exc.message}", hint=hint) from None
    except (niquests.exceptions.RequestException, GrafanaException) as exc:
        # grafana-client wraps timeouts and some HTTP errors; a refused connection comes as niquests' own
        raise UserError(f"cannot {what} at {where}: {_first_line(exc)}",
                        hint="check SUPPORTLENS_GRAFANA_URL and that Grafana is up "
                        "(docker compose -f deploy/compose.yaml up grafana)") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
