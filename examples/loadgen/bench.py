#!/usr/bin/env python3
"""Every registration benchmark of docs/benchmarks.md, side by side, in one run.

    python3 examples/loadgen/bench.py            # builds release binaries, runs, prints tables

Starts release `berth serve` nodes on free loopback ports (SQLite; a throwaway PostgreSQL cluster
for the PostgreSQL and two-node rows), drives them with `berth-loadgen --json`, and prints
markdown tables (and writes every raw report to target/bench/). Standard library only. Bounded:
every run has a device count and every wait a timeout. Nothing leaves loopback.

Environment: BENCH_DEVICES (default 3000), BENCH_CONCURRENCY (32), BENCH_SKIP_POSTGRES=1,
BENCH_SKIP_SCALE=1, BENCH_OUT (target/bench).
"""

from __future__ import annotations

import atexit
import base64
import glob
import hashlib
import hmac
import http.client
import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BERTH = ROOT / "target" / "release" / "berth"
LOADGEN = ROOT / "target" / "release" / "berth-loadgen"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "target" / "bench"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "3000"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
API = "2021-10-01"


def free_ports(count: int) -> list:
    """`count` distinct free loopback ports (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class Node:
    """A release `berth serve` on free loopback ports."""

    def __init__(self, name: str, *, database_url: str | None = None, env: dict | None = None,
                 data_dir: Path | None = None, ports: tuple | None = None):
        self.name = name
        self.data_dir = data_dir or OUT / name
        if data_dir is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.https, self.mqtt, self.amqp = ports or free_ports(3)
        args = [str(BERTH), "serve", "--bind", "127.0.0.1", "--https-port", str(self.https), "--mqtt-port",
                str(self.mqtt), "--amqp-port", str(self.amqp), "--data-dir", str(self.data_dir)]
        if database_url:
            args += ["--database-url", database_url]
        self.log = open(self.data_dir / "log", "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "RUST_LOG": "warn,fe2o3_amqp=off", **(env or {})})
        atexit.register(self.stop)
        banner = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Trust this CA" not in banner:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"{name}: berth exited; see {self.data_dir / 'log'}")
            if ":" in line:
                key, _, value = line.strip().partition(":")
                banner[key.strip()] = value.strip()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.id_scope = banner["ID scope"]
        self.connection_string = banner["Connection string"].split()[0]
        self.ca = str(self.data_dir / "ca.pem")
        self.pid = self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush beyond what was committed."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    # -- service API ----------------------------------------------------------------------------------

    def _token(self) -> str:
        fields = dict(part.split("=", 1) for part in self.connection_string.split(";"))
        expiry = int(time.time()) + 3600
        sr = urllib.parse.quote(fields["HostName"], safe="")
        signature = base64.b64encode(hmac.new(base64.b64decode(fields["SharedAccessKey"]),
                                              f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
        return (f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(signature, safe='')}&se={expiry}"
                f"&skn={fields['SharedAccessKeyName']}")

    def api(self, method: str, path: str, body=None, content_type="application/json", query: str = ""):
        context = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection("localhost", self.https, context=context, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, f"{path}?api-version={API}{query}", body=data,
                     headers={"Authorization": self._token(), "Content-Type": content_type})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        if response.status >= 300:
            raise SystemExit(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def loadgen(node: Node, label: str, *args: str, extra_nodes=()) -> dict:
    """One loadgen run against `node`; returns its JSON report (also kept in OUT/label.json)."""
    cmd = [str(LOADGEN), "--target", f"https://127.0.0.1:{node.https}", "--mqtt-port", str(node.mqtt),
           "--id-scope", node.id_scope, "--connection-string", node.connection_string, "--ca", node.ca,
           "--server-pid", str(node.pid), "--json", *args]
    if "--prefix" not in args:
        cmd += ["--prefix", f"{label}-{int(time.time())}"]
    if "--amqp-port" not in args:
        cmd += ["--amqp-port", str(node.amqp)] if amqp_supported() else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"{label}: loadgen failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    (OUT / f"{label}.json").write_text(json.dumps(report, indent=2))
    report["label"] = label
    return report


_AMQP = None


def amqp_supported() -> bool:
    global _AMQP
    if _AMQP is None:
        _AMQP = "--amqp-port" in subprocess.run([str(LOADGEN), "--help"], capture_output=True, text=True).stdout
    return _AMQP


def row(report: dict, note: str = "") -> str:
    s = report.get("settings", {})
    lat = report.get("timeToAssignedMs") or {}
    srv = report.get("server") or {}
    cpu = srv.get("cpuMicrosPerRegistration")
    return (f"| {report['label']} | {s.get('attestation')} | {s.get('transport')} | {report['devices']} | "
            f"{report['assigned']} | {report['failed']} | {report['registrationsPerSecond']:.0f} | "
            f"{lat.get('p50', 0):.1f} / {lat.get('p95', 0):.1f} / {lat.get('p99', 0):.1f} / {lat.get('max', 0):.1f} | "
            f"{report.get('pollsPerAssigned') or 0:.2f} | {cpu if cpu is None else round(cpu)} | "
            f"{srv.get('peakRssMib') or 0:.1f} | {note} |")


HEADER = ("| run | attestation | transport | devices | assigned | failed | reg/s | time to assigned ms p50/p95/p99/max "
          "| polls/dev | server CPU µs/reg | server peak RSS MiB | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def postgres():
    """A throwaway PostgreSQL cluster; returns (url, stop)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        raise SystemExit("PostgreSQL server binaries not found (apt install postgresql), or BENCH_SKIP_POSTGRES=1")
    bin_dir = Path(bins[-1]).parent
    tmp = Path(tempfile.mkdtemp(prefix="berth-bench-pg-"))
    shutil.chown(tmp, "postgres") if os.getuid() == 0 else None
    run_as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    port = free_port()
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(tmp / "data"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True, cwd=tmp)
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(tmp / "data"), "-o",
                    f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=200", "-l",
                    str(tmp / "log"), "-w", "start"], check=True, capture_output=True, cwd=tmp)
    subprocess.run([str(bin_dir / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                    "CREATE DATABASE berth_bench"], check=True, capture_output=True)

    def stop():
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(tmp / "data"), "-m", "fast", "stop"],
                       capture_output=True, cwd=tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    return f"postgres://postgres@127.0.0.1:{port}/berth_bench", stop


def seed_enrollments(node: Node, count: int) -> None:
    """`count` individual symmetric-key enrollments through the bulk API (10 per call, 4 threads)."""
    def work(start: int, stop: int) -> None:
        for base in range(start, stop, 10):
            items = [{"registrationId": f"seed-{n}", "attestation": {"type": "symmetricKey"}}
                     for n in range(base, min(base + 10, stop))]
            node.api("POST", "/enrollments", {"mode": "create", "enrollments": items})

    threads = [threading.Thread(target=work, args=(i * count // 4, (i + 1) * count // 4)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def seed_records(db: Path, count: int) -> None:
    """`count` registration records, copied from an existing one, straight into SQLite."""
    conn = sqlite3.connect(db, timeout=60)
    template = conn.execute("SELECT id, doc, etag, created, updated, status, assigned_hub, device_id, group_key "
                            "FROM registrations LIMIT 1").fetchone()
    if template is None:
        raise SystemExit("no registration record to copy")
    tid = template[0]
    conn.execute("BEGIN")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO registrations (id_key, id, doc, etag, created, updated, status, assigned_hub, device_id, group_key) "
        "SELECT 'seed-rec-' || i, 'seed-rec-' || i, replace(?, ?, 'seed-rec-' || i), ?, ?, ?, ?, ?, "
        "replace(?, ?, 'seed-rec-' || i), ? FROM n",
        (count, template[1], tid, template[2], template[3], template[4], template[5], template[6], template[7], tid,
         template[8]),
    )
    conn.commit()
    conn.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-p", "berth", "-p", "berth-loadgen"], check=True, cwd=ROOT)
    if not (ROOT / "policies" / "dist" / "contoso-divisions.wasm").exists():
        subprocess.run(["bash", "policies/build.sh"], check=True, cwd=ROOT)
    n, c = str(DEVICES), str(CONCURRENCY)
    reports: list = []
    sections: list = []

    # -- transports and attestation, SQLite -------------------------------------------------------------
    node = Node("sqlite")
    runs = [("sym-https-fresh", ["--attestation", "symmetric-key", "--transport", "https"]),
            ("sym-https-keepalive", ["--attestation", "symmetric-key", "--transport", "https-keepalive"]),
            ("sym-mqtt", ["--attestation", "symmetric-key", "--transport", "mqtt"]),
            ("x509-https-fresh", ["--attestation", "x509", "--transport", "https"]),
            ("x509-mqtt", ["--attestation", "x509", "--transport", "mqtt"])]
    if amqp_supported():
        runs += [("sym-amqp", ["--attestation", "symmetric-key", "--transport", "amqp"]),
                 ("x509-amqp", ["--attestation", "x509", "--transport", "amqp"])]
    table = []
    for label, args in runs:
        report = loadgen(node, label, "--devices", n, "--concurrency", c, "--poll", "immediate", *args)
        reports.append(report)
        table.append(row(report))
    peak = next(r for r in reports if r["label"] == "sym-https-keepalive")["registrationsPerSecond"]
    half = loadgen(node, "sym-keepalive-half-peak", "--devices", n, "--concurrency", "256", "--rate",
                   f"{peak / 2:.0f}", "--transport", "https-keepalive", "--poll", "immediate")
    table.append(row(half, f"arrivals at half the peak ({peak / 2:.0f}/s)"))
    device_view = loadgen(node, "sym-https-retry-after", "--devices", "300", "--concurrency", "100",
                          "--transport", "https", "--poll", "retry-after")
    table.append(row(device_view, "devices honour retry-after (what a device sees)"))
    sections.append(("Transports and attestation (SQLite)", table))

    # -- a WebAssembly custom allocation policy ---------------------------------------------------------
    wasm = (ROOT / "policies" / "dist" / "contoso-divisions.wasm").read_bytes()
    node.api("PUT", "/policies/contoso-divisions", wasm, content_type="application/wasm")
    for hub in ("contoso-toasters-hub-1098.azure-devices.net", "contoso-heatpumps-hub-1098.azure-devices.net"):
        node.api("PUT", f"/linkedHubs/{hub}", {})
    group_key = base64.b64encode(os.urandom(32)).decode()
    node.api("PUT", "/enrollmentGroups/bench-custom", {
        "enrollmentGroupId": "bench-custom",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
        "allocationPolicy": "custom", "policyBinding": {"allocation": "contoso-divisions"},
        "iotHubs": ["contoso-toasters-hub-1098.azure-devices.net", "contoso-heatpumps-hub-1098.azure-devices.net"]})
    # Interleaved, twice each, so that drift of the machine and of the database hits both alike.
    pairs = []
    for attempt in (1, 2):
        hashed = loadgen(node, f"sym-keepalive-hashed-{attempt}", "--devices", n, "--concurrency", c,
                         "--transport", "https-keepalive")
        policy = loadgen(node, f"sym-keepalive-wasm-policy-{attempt}", "--devices", n, "--concurrency", c,
                         "--transport", "https-keepalive", "--setup", "false", "--enrollment-group",
                         "bench-custom", "--group-key", group_key, "--prefix",
                         f"b-contoso-tstrsd-007-{attempt}-{int(time.time()) % 100000}")
        policy["label"] = f"sym-keepalive-wasm-policy-{attempt}"
        pairs.append((hashed, policy))
    cpu = lambda r: (r.get("server") or {}).get("cpuMicrosPerRegistration") or 0  # noqa: E731
    delta = sum(cpu(p) - cpu(h) for h, p in pairs) / len(pairs)
    lines = []
    for hashed, policy in pairs:
        lines += [row(hashed, "hashed allocation"), row(policy, "WASM policy")]
    lines.append(f"| mean difference | | | | | | | | | {delta:+.0f} | | WASM policy minus hashed, µs per registration |")
    sections.append(("Allocation: built-in hashing against a WebAssembly policy (contoso-divisions)", lines))

    # -- scale of state: enrollments and records ------------------------------------------------------
    if os.environ.get("BENCH_SKIP_SCALE") != "1":
        before = loadgen(node, "scale-before", "--devices", n, "--concurrency", c, "--transport", "https-keepalive")
        t0 = time.monotonic()
        seed_enrollments(node, 100_000)
        seeded_enrollments = time.monotonic() - t0
        after_enrollments = loadgen(node, "scale-100k-enrollments", "--devices", n, "--concurrency", c,
                                    "--transport", "https-keepalive")
        node.stop()
        t0 = time.monotonic()
        seed_records(node.data_dir / "berth.db", 1_000_000)
        seeded_records = time.monotonic() - t0
        node = Node("sqlite", data_dir=node.data_dir)
        after_records = loadgen(node, "scale-1m-records", "--devices", n, "--concurrency", c,
                                "--transport", "https-keepalive")
        sections.append((f"Scale of state (SQLite; seeding took {seeded_enrollments:.0f} s for 100,000 enrollments "
                         f"through the bulk API, {seeded_records:.0f} s for 1,000,000 records by SQL)",
                         [row(before, "before seeding"), row(after_enrollments, "+100,000 enrollments"),
                          row(after_records, "+1,000,000 registration records (server restarted)")]))
    node.stop()

    # -- nothing lost: a run with --verify, the server killed (SIGKILL) mid-run and restarted -------------
    victim = Node("kill")
    ports = (victim.https, victim.mqtt, victim.amqp)
    outcome: dict = {}

    def run_through_kill() -> None:
        outcome["report"] = loadgen(victim, "kill-restart", "--devices", n, "--concurrency", c, "--transport",
                                    "https-keepalive", "--verify", "--request-timeout", "10")

    driver = threading.Thread(target=run_through_kill)
    driver.start()
    time.sleep(1.0)
    victim.kill()
    restarted = Node("kill", data_dir=victim.data_dir, ports=ports)
    driver.join(timeout=1800)
    report = outcome["report"]
    verify = report.get("verify") or {}
    sections.append(("Nothing lost: SIGKILL one second into the run, restart on the same data", [
        row(report, f"acknowledged assigned {verify.get('assignedCounted')}, records {verify.get('recordsForRun')} "
                    f"(assigned {verify.get('assignedRecords')}), acknowledged without record "
                    f"{verify.get('missing')}, record without acknowledgement {verify.get('uncounted')}")]))
    restarted.stop()

    # -- PostgreSQL, and two nodes on one PostgreSQL --------------------------------------------------
    if os.environ.get("BENCH_SKIP_POSTGRES") != "1":
        url, stop_pg = postgres()
        try:
            first = Node("pg-1", database_url=url)
            table = [row(loadgen(first, "pg-sym-https-keepalive", "--devices", n, "--concurrency", c,
                                 "--transport", "https-keepalive")),
                     row(loadgen(first, "pg-sym-https-fresh", "--devices", n, "--concurrency", c,
                                 "--transport", "https"))]
            secret = (first.data_dir / "secret.key").read_text().strip()
            second = Node("pg-2", database_url=url, env={"BERTH_SECRET_KEY": secret})
            results: dict = {}

            def drive(target: Node, label: str) -> None:
                results[label] = loadgen(target, label, "--devices", n, "--concurrency", c, "--transport",
                                         "https-keepalive")

            threads = [threading.Thread(target=drive, args=(first, "pg-two-nodes-a")),
                       threading.Thread(target=drive, args=(second, "pg-two-nodes-b"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = sum(r["registrationsPerSecond"] for r in results.values())
            for label in ("pg-two-nodes-a", "pg-two-nodes-b"):
                table.append(row(results[label], f"two nodes at once: {total:.0f} reg/s together"))
            sections.append(("PostgreSQL, one node and two nodes on one database", table))
            first.stop()
            second.stop()
        finally:
            stop_pg()

    print(f"berth-loadgen runs: {DEVICES} devices per run unless stated, concurrency {CONCURRENCY}, "
          f"loadgen and server on the same machine ({os.cpu_count()} CPUs).\n")
    for title, lines in sections:
        print(f"### {title}\n\n{HEADER}")
        for line in lines:
            print(line)
        print()


if __name__ == "__main__":
    sys.exit(main())
