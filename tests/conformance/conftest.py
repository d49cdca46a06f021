"""Fixtures for the Berth conformance suite.

Service API: one `berth serve` process per pytest session (`berth` fixture), on a free loopback
port with a temporary data directory, talked to through the official Python service SDK
(azure-iot-deviceprovisioning).

Device API: a second `berth serve` (`device_server` fixture) on the fixed ports the official
device SDKs hard-code (443 for HTTPS and MQTT/AMQP over WebSocket, 8883 for MQTT over TLS, 5671
for AMQP over TLS), with
its own data directory and, in PostgreSQL mode, its own database. Started only when a device test
runs; it fails (never skips) when those ports cannot be bound.

Environment:
  BERTH_BIN                  path of the berth binary (default: <repo>/target/debug/berth)
  BERTH_CONFORMANCE_DB       sqlite (default) or postgres
  BERTH_TEST_POSTGRES_URL    postgres://user@host:port/db of a server we may create databases on
                             (required for BERTH_CONFORMANCE_DB=postgres; a fresh database is
                             created for the session and dropped afterwards)
  BERTH_STARTUP_TIMEOUT      seconds to wait for /healthz (default 30)
  BERTH_DEVICE_HTTPS_PORT    HTTPS port of the device server (default 443; the SDK needs 443)
  BERTH_DEVICE_MQTT_PORT     MQTT port of the device server (default 8883; the SDK needs 8883)
  BERTH_DEVICE_AMQP_PORT     AMQP port of the device server (default 5671; the SDKs need 5671)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import requests
from azure.iot.deviceprovisioning import DeviceProvisioningClient

import helpers

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "berth"

# Logs of the servers started in this session, so the terminal summary can print them on failure.
_SERVER_LOGS: list = []


@dataclass
class Berth:
    port: int
    data_dir: Path
    ca_path: Path
    connection_string: str
    log_path: Path
    db_mode: str
    # `berth` plus the flags that select this instance's data dir, port and database.
    cli: tuple = ()
    env: Optional[dict] = None

    def run_cli(self, *args: str) -> str:
        """Run `berth <args…> <instance flags>` and return its stdout (fails on non-zero exit)."""
        out = subprocess.run(
            [self.cli[0], *args, *self.cli[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.data_dir.parent),
            env=self.env,
        )
        assert out.returncode == 0, f"berth {' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}"
        return out.stdout

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def make_client(self, connection_string: Optional[str] = None) -> DeviceProvisioningClient:
        return DeviceProvisioningClient.from_connection_string(
            connection_string or self.connection_string,
            # azure-core RequestsTransport -> ConnectionConfiguration.verify -> requests `verify=`
            connection_verify=str(self.ca_path),
            # Fail fast: no retries (a 5xx must show up as a failure, not as a slow test).
            retry_total=0,
            connection_timeout=10,
            read_timeout=30,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _berth_bin() -> Path:
    path = Path(os.environ.get("BERTH_BIN") or DEFAULT_BIN)
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(
            f"berth binary not found or not executable at {path}; "
            "build it with `cargo build -p berth` or set BERTH_BIN",
            returncode=3,
        )
    return path


def _tail(path: Path, limit: int = 20000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text if len(text) <= limit else "…(truncated)…\n" + text[-limit:]


def _psql(url: str, sql: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        raise RuntimeError("psql not found on PATH (needed to create the PostgreSQL test database)")
    subprocess.run(
        [psql, url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )


def _psql_scalar(url: str, sql: str) -> str:
    out = subprocess.run(
        [shutil.which("psql") or "psql", url, "-X", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def _postgres_database():
    """Create a fresh database next to BERTH_TEST_POSTGRES_URL; returns (url, drop_fn)."""
    base = os.environ.get("BERTH_TEST_POSTGRES_URL")
    if not base:
        pytest.exit("BERTH_CONFORMANCE_DB=postgres needs BERTH_TEST_POSTGRES_URL", returncode=3)
    name = f"berth_conf_{uuid.uuid4().hex[:12]}"
    parts = urllib.parse.urlsplit(base)
    url = urllib.parse.urlunsplit(parts._replace(path="/" + name))
    _psql(base, f'CREATE DATABASE "{name}"')

    def drop() -> None:
        try:
            _psql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask test results
            print(f"warning: could not drop {name}: {exc}")

    return url, drop


def _wait_healthy(proc: subprocess.Popen, ca_path: Path, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"berth serve exited early with code {proc.returncode}; log:\n{_tail(log_path)}"
            )
        if ca_path.is_file():
            try:
                r = requests.get(f"https://localhost:{port}/healthz", verify=str(ca_path), timeout=2)
                if r.status_code == 200:
                    return
                last_error = f"/healthz answered {r.status_code}: {r.text[:200]!r}"
            except requests.RequestException as exc:
                last_error = repr(exc)
        else:
            last_error = f"{ca_path} does not exist yet"
        time.sleep(0.2)
    raise RuntimeError(
        f"berth did not become healthy within {timeout:.0f}s ({last_error}); log:\n{_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _db_mode() -> str:
    db_mode = os.environ.get("BERTH_CONFORMANCE_DB", "sqlite").strip().lower()
    if db_mode not in ("sqlite", "postgres"):
        pytest.exit(f"BERTH_CONFORMANCE_DB must be sqlite or postgres, not {db_mode!r}", returncode=3)
    return db_mode


def _server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    env["NO_COLOR"] = "1"  # plain log file
    # The CLI flags are authoritative; make sure no inherited BERTH_* setting (data dir, ports,
    # database, host name, config file, TLS files, secret key, …) overrides them.
    for var in [name for name in env if name.startswith("BERTH_")]:
        env.pop(var, None)
    return env


_SERVE_FLAGS: Optional[str] = None


def _serve_supports(binary: Path, flag: str) -> bool:
    """Whether `berth serve --help` lists `flag` (the device listeners are newer than the suite)."""
    global _SERVE_FLAGS
    if _SERVE_FLAGS is None:
        out = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60)
        _SERVE_FLAGS = out.stdout + out.stderr
    return re.search(rf"(^|\s){re.escape(flag)}\b", _SERVE_FLAGS) is not None


@contextlib.contextmanager
def _running_berth(tmp_path_factory, *, name: str, https_port: int, serve_args: tuple = (), cls=None, **fields):
    """Start `berth serve --data-dir <tmp> --https-port <https_port> [--database-url <fresh db>]
    <serve_args…>`, wait for /healthz, read its connection string, yield a `Berth` (or `cls`),
    and stop the server (and drop its database) afterwards."""
    binary = _berth_bin()
    db_mode = _db_mode()
    root = tmp_path_factory.mktemp(name)
    data_dir = root / "data"
    data_dir.mkdir()
    log_path = root / "berth.log"
    common = ["--data-dir", str(data_dir), "--https-port", str(https_port)]
    drop_db = None
    pg_url = None
    if db_mode == "postgres":
        pg_url, drop_db = _postgres_database()
        common += ["--database-url", pg_url]
    env = _server_env()

    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finally block
    _SERVER_LOGS.append(log_path)
    proc = subprocess.Popen(
        [str(binary), "serve", *common, *serve_args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(root),
    )
    try:
        ca_path = data_dir / "ca.pem"
        _wait_healthy(proc, ca_path, https_port, log_path, float(os.environ.get("BERTH_STARTUP_TIMEOUT", "30")))
        if pg_url is not None:
            # Guard against a server that silently ignores --database-url: it must have migrated
            # the fresh database.
            tables = int(
                _psql_scalar(
                    pg_url,
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                )
            )
            if tables == 0:
                raise RuntimeError(f"berth is healthy but created no tables in {pg_url}")
        out = subprocess.run(
            [str(binary), "connection-string", *common],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(root),
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"`berth connection-string` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
            )
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"`berth connection-string` must print exactly one line, got {out.stdout!r}"
        server = (cls or Berth)(
            port=https_port,
            data_dir=data_dir,
            ca_path=ca_path,
            connection_string=lines[0].strip(),
            log_path=log_path,
            db_mode=db_mode,
            cli=(str(binary), *common),
            env=env,
            **fields,
        )
        yield server
    finally:
        _stop(proc)
        log_file.write(f"\n[conftest] berth serve exited with code {proc.returncode}\n".encode())
        log_file.close()
        if drop_db is not None:
            drop_db()


@pytest.fixture(scope="session")
def berth(tmp_path_factory) -> Berth:
    """The running Berth server for the service-API tests (free HTTPS port)."""
    serve_args: tuple = ()
    # Once `serve` has an MQTT listener, give this server a free MQTT port so that it never takes
    # 8883 away from `device_server`.
    if _serve_supports(_berth_bin(), "--mqtt-port"):
        serve_args = ("--mqtt-port", str(_free_port()))
    # Likewise for AMQP: never take 5671 away from `device_server`.
    if _serve_supports(_berth_bin(), "--amqp-port"):
        serve_args += ("--amqp-port", str(_free_port()))
    with _running_berth(tmp_path_factory, name="berth", https_port=_free_port(), serve_args=serve_args) as server:
        yield server


@pytest.fixture(scope="session")
def client(berth: Berth) -> DeviceProvisioningClient:
    c = berth.make_client()
    yield c
    c.close()


@pytest.fixture
def linked_hub(client) -> str:
    """A hub linked with a connection string, unlinked again after the test."""
    host = f"{helpers.unique_id('hub')}.azure-devices.net"
    body = {
        "connectionString": helpers.hub_connection_string(host),
        "allocationWeight": 1,
        "applyAllocationPolicy": True,
        "location": "west",
    }
    r = helpers.raw(client, "PUT", f"/linkedHubs/{host}", json_body=body)
    assert r.status_code in (200, 201), f"linking {host} failed: {r.status_code} {r.text()!r}"
    yield host
    helpers.raw(client, "DELETE", f"/linkedHubs/{host}")


# --------------------------------------------------------------------------------------------
# Device API: a second server on the ports the official device SDK hard-codes
# --------------------------------------------------------------------------------------------


@dataclass
class DeviceBerth(Berth):
    """The device-API server: a `Berth` plus its ID scope and MQTT port."""

    id_scope: str = ""
    mqtt_port: int = 8883

    @property
    def ca_pem(self) -> str:
        """The CA as PEM text (what the device SDK's `server_verification_cert` takes)."""
        return self.ca_path.read_text()


def _assert_can_bind(port: int) -> None:
    """Fail (not skip) with a clear message when a fixed device port is taken or privileged."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
        except OSError as exc:
            pytest.fail(
                f"the device tests need TCP port {port} ({host}) because the official Python device "
                f"SDK hard-codes 443 (HTTPS, MQTT over WebSocket) and 8883 (MQTT); binding it failed: "
                f"{exc}. Run as root (or grant CAP_NET_BIND_SERVICE) and stop whatever listens there.",
                pytrace=False,
            )
        finally:
            s.close()


@pytest.fixture(scope="session")
def device_server(tmp_path_factory) -> DeviceBerth:
    """A second Berth on 443 (HTTPS + MQTT over WebSocket) and 8883 (MQTT over TLS), with its own
    data directory and (PostgreSQL mode) its own fresh database."""
    https_port = int(os.environ.get("BERTH_DEVICE_HTTPS_PORT", "443"))
    mqtt_port = int(os.environ.get("BERTH_DEVICE_MQTT_PORT", "8883"))
    amqp_port = int(os.environ.get("BERTH_DEVICE_AMQP_PORT", "5671"))
    _assert_can_bind(https_port)
    _assert_can_bind(mqtt_port)
    _assert_can_bind(amqp_port)
    with _running_berth(
        tmp_path_factory,
        name="berth-device",
        https_port=https_port,
        serve_args=("--mqtt-port", str(mqtt_port), "--amqp-port", str(amqp_port)),
        cls=DeviceBerth,
        mqtt_port=mqtt_port,
    ) as server:
        out = server.run_cli("id-scope")
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and re.fullmatch(r"0ne[0-9A-Fa-f]{8}", lines[0]), (
            f"`berth id-scope` must print one ID scope (0ne + 8 hex digits), got {out!r}"
        )
        server.id_scope = lines[0]
        yield server


@pytest.fixture(scope="session")
def device_client(device_server: DeviceBerth) -> DeviceProvisioningClient:
    """The service SDK client of the device server (enrollments, linked hubs, hub devices)."""
    c = device_server.make_client()
    yield c
    c.close()


@pytest.fixture
def device_hub(device_client) -> str:
    """A hub linked to the device server by host name only (`{}` body: the `record` driver)."""
    host = helpers.link_record_hub(device_client, "dhub")
    yield host
    helpers.raw(device_client, "DELETE", f"/linkedHubs/{host}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the server logs when something failed."""
    if not _SERVER_LOGS or exitstatus == 0:
        return
    for log in _SERVER_LOGS:
        terminalreporter.write_sep("=", f"berth server log ({log})")
        terminalreporter.write_line(_tail(log, 40000))


def pytest_report_header(config):
    return [
        f"berth binary: {os.environ.get('BERTH_BIN') or DEFAULT_BIN}",
        f"database: {os.environ.get('BERTH_CONFORMANCE_DB', 'sqlite')}",
    ]
