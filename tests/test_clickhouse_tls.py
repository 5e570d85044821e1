"""ClickHouse TLS settings reach the connection: a real TLS server sees whom we trust and who we are.

No ClickHouse server with TLS runs here, so the far end is a TLS listener that records the
handshake and answers every request with an HTTP error; what matters is whether the
handshake succeeded, and with which client certificate.
"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import free_port
from supportlens import store
from supportlens.config import load_settings
from supportlens.errors import UserError


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@dataclass
class TlsServer:
    url: str
    server_cert: Path
    client_cert: Path
    client_key: Path
    peers: list[str] = field(default_factory=list)  # CN of each client certificate presented


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    folder = tmp_path_factory.mktemp("tls")
    server_cert, server_key = _certificate(folder, "clickhouse-server")
    client_cert, client_key = _certificate(folder, "supportlens-sink")
    port = free_port()
    found = TlsServer(f"https://default:@127.0.0.1:{port}/", server_cert, client_cert, client_key)

    class Refusing(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            subject = dict(item[0] for item in (self.connection.getpeercert() or {}).get("subject", ()))
            found.peers.append(subject.get("commonName", ""))
            self.send_response(503)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"not really\n")

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(client_cert)
    context.verify_mode = ssl.CERT_OPTIONAL  # a client without a certificate gets in, and is recorded as such
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Refusing)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield found
    httpd.shutdown()


def _connect(server: TlsServer, **tls) -> str:
    settings = load_settings(clickhouse_dsn=server.url, **tls)
    with pytest.raises(UserError) as refused:  # the far end is no ClickHouse: every attempt ends in an error
        store.connect(settings, create_database=False)
    return refused.value.message


def test_an_untrusted_server_certificate_is_refused_before_anything_is_sent(tls_server):
    before = len(tls_server.peers)
    message = _connect(tls_server)
    assert "certificate verify failed" in message
    assert len(tls_server.peers) == before


def test_the_configured_ca_and_client_certificate_are_used(tls_server):
    before = len(tls_server.peers)
    message = _connect(tls_server, clickhouse_ca_cert=tls_server.server_cert,
                       clickhouse_client_cert=tls_server.client_cert, clickhouse_client_key=tls_server.client_key)
    assert "certificate" not in message
    assert tls_server.peers[before:] and set(tls_server.peers[before:]) == {"supportlens-sink"}


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_verification_can_be_turned_off_for_a_test_server(tls_server):
    before = len(tls_server.peers)
    message = _connect(tls_server, clickhouse_verify=False)
    assert "certificate" not in message
    assert set(tls_server.peers[before:]) == {""}  # it got in, without a client certificate


@pytest.mark.parametrize("dsn, interface", [("https://u:p@ch.internal:9440/", "https"),
                                            ("HTTPS://ch.internal:8443", "https"), ("http://ch.internal:8123", "http")])
def test_the_dsn_scheme_decides_tls_whatever_the_port(dsn, interface):
    # clickhouse-connect alone would infer TLS from ports 443 and 8443 only (the server above listens elsewhere)
    assert store.client_options(load_settings(clickhouse_dsn=dsn))["interface"] == interface
    embedded = store.client_options(load_settings())
    assert "interface" not in embedded  # the embedded engine has none, but keeps few idle threads (see the soak)
    assert embedded["chdb_options"] == {"max_thread_pool_free_size": store.EMBEDDED_IDLE_THREADS}
