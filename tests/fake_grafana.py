"""A stand-in for the few Grafana HTTP API endpoints ``supportlens dashboards push`` uses.

It answers as Grafana's API reference says Grafana does — 401 without valid credentials, 404
for what does not exist, 409 for a second datasource of the same name, secrets accepted in
``secureJsonData`` and shown back only as ``secureJsonFields``, ``id`` and ``version`` added
to stored dashboards — so the push logic (what it creates, updates, leaves alone, and how it
reports Grafana's refusals) is tested here, where no Grafana can be installed. The real
Grafana test is ``tests/test_grafana_live.py``.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PLUGIN = "grafana-clickhouse-datasource"


class FakeGrafana:
    def __init__(self, token: str = "good-token", plugin_installed: bool = True) -> None:
        self.token = token
        self.plugin_installed = plugin_installed
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid → {"dashboard": …, "meta": …}
        self.writes: list[tuple[str, str]] = []
        self._next_id = 1
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeGrafana:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ---- the API ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: Any, authorized: bool) -> tuple[int, Any]:
        if method == "GET" and path == "/api/health":
            return 200, {"commit": "fake", "database": "ok", "version": "12.1.0"}
        if not authorized:
            return 401, {"message": "Unauthorized"}
        if method != "GET":
            self.writes.append((method, path))
        parts = path.strip("/").split("/")[1:]  # after "api"
        match method, parts:
            case "GET", ["plugins", plugin, "settings"]:
                if plugin == PLUGIN and self.plugin_installed:
                    return 200, {"id": PLUGIN, "type": "datasource", "enabled": True}
                return 404, {"message": "Plugin not found, no installed plugin with that id"}
            case "GET", ["folders", uid]:
                return (200, self.folders[uid]) if uid in self.folders else (404, {"message": "folder not found"})
            case "POST", ["folders"]:
                folder = {"id": self._id(), "uid": body["uid"], "title": body["title"], "version": 1}
                self.folders[body["uid"]] = folder
                return 200, folder
            case "PUT", ["folders", uid]:
                self.folders[uid] = {**self.folders[uid], "title": body["title"],
                                     "version": self.folders[uid]["version"] + 1}
                return 200, self.folders[uid]
            case "GET", ["datasources", "uid", uid]:
                if uid not in self.datasources:
                    return 404, {"message": "Data source not found"}
                stored = copy.deepcopy(self.datasources[uid])
                secrets = stored.pop("secureJsonData", {})
                return 200, {**stored, "secureJsonFields": {name: True for name in secrets}}
            case "POST", ["datasources"]:
                if any(d["name"] == body["name"] for d in self.datasources.values()):
                    return 409, {"message": "data source with the same name already exists"}
                self.datasources[body["uid"]] = {"id": self._id(), "orgId": 1, "readOnly": False, "version": 1,
                                                 "basicAuth": False, "isDefault": False, **copy.deepcopy(body)}
                return 200, {"id": self._next_id, "message": "Datasource added", "name": body["name"]}
            case "PUT", ["datasources", "uid", uid]:
                stored = self.datasources[uid]
                if stored["readOnly"]:
                    return 403, {"message": "Cannot update read-only data source"}
                secrets = {**stored.get("secureJsonData", {}), **body.get("secureJsonData", {})}
                self.datasources[uid] = {**stored, **copy.deepcopy(body), "secureJsonData": secrets,
                                         "version": stored["version"] + 1}
                return 200, {"message": "Datasource updated"}
            case "GET", ["dashboards", "uid", uid]:
                if uid not in self.dashboards:
                    return 404, {"message": "Dashboard not found"}
                return 200, copy.deepcopy(self.dashboards[uid])
            case "POST", ["dashboards", "db"]:
                model = copy.deepcopy(body["dashboard"])
                old = self.dashboards.get(model["uid"])
                if old is not None and old["meta"].get("provisioned"):
                    return 400, {"message": "Cannot save provisioned dashboard"}
                model["id"] = old["dashboard"]["id"] if old else self._id()
                model["version"] = old["dashboard"]["version"] + 1 if old else 1
                self.dashboards[model["uid"]] = {"dashboard": model, "meta": {
                    "folderUid": body.get("folderUid", ""), "provisioned": False}}
                return 200, {"status": "success", "uid": model["uid"], "version": model["version"]}
        return 404, {"message": f"no route {method} {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                auth = self.headers.get("Authorization", "")
                authorized = auth == f"Bearer {fake.token}" or auth == "Basic " + base64.b64encode(
                    b"admin:admin").decode()
                status, answer = fake.handle(self.command, self.path.split("?")[0], body, authorized)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
                pass

        return Handler
