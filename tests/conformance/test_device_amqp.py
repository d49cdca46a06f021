"""Device registration over AMQP 1.0 (TLS on 5671) and AMQP over WebSocket (443, subprotocol
AMQPWSB10) with the official Azure IoT Node clients, unmodified: azure-iot-provisioning-device
1.9.1 with the azure-iot-provisioning-device-amqp transport and the symmetric-key and X.509
security clients (`node/register.js` drives them; `tests/run.sh` runs `npm ci` in `node/`).

What the Node client reports (azure-iot-provisioning-device-amqp 1.9.1, observed here):
  - assigned: `{"ok": true, "status": "assigned", …}` from register.js;
  - a SASL outcome `auth` (wrong key): `NotConnectedError`;
  - a rejected request (X.509 certificate for another registration ID): an error whose message
    is "[object Object]" (the client stringifies the AMQP error).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
import socket
import subprocess
from pathlib import Path
from typing import Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import (
    derive_device_key,
    hub_device,
    random_key,
    raw,
    symmetric_key_enrollment,
    symmetric_key_group,
    unique_id,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
TRANSPORTS = [pytest.param("amqp", id="amqp"), pytest.param("amqpws", id="amqp-ws")]


def _node() -> str:
    node = shutil.which("node")
    assert node, "node is not installed: tests/run.sh installs nodejs and runs npm ci in tests/conformance/node"
    assert (NODE_DIR / "node_modules" / "azure-iot-provisioning-device-amqp").is_dir(), (
        "the Node clients are missing: run `npm ci` in tests/conformance/node (tests/run.sh does)"
    )
    return node


def node_register(server, transport: str, **args) -> dict:
    """One registration with the official Node client; returns register.js's JSON line."""
    request = {"transport": transport, "host": "localhost", "idScope": server.id_scope, **args}
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(server.ca_path))
    out = subprocess.run(
        [_node(), str(NODE_DIR / "register.js"), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(NODE_DIR),
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"register.js printed no result (exit {out.returncode}): {out.stdout}{out.stderr}"
    return json.loads(lines[-1])


def assert_assigned(result: dict, *, hub: str, device_id: str) -> None:
    assert result["ok"] is True, result
    assert result["status"] == "assigned", result
    assert result["assignedHub"] == hub, result
    assert result["deviceId"] == device_id, result


def assert_refused(result: dict) -> None:
    assert result["ok"] is False, result
    assert result["error"]["name"] != "Timeout", f"the client hung instead of being refused: {result}"


# --------------------------------------------------------------------------------------------
# Certificates (ECDSA P-256, client-auth leaves)
# --------------------------------------------------------------------------------------------


def _cert(cn: str, *, issuer=None, ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _files(tmp_path: Path, leaf, chain=()) -> dict:
    stem = unique_id("amqp-dev")
    cert_file = tmp_path / f"{stem}.pem"
    key_file = tmp_path / f"{stem}.key"
    cert_file.write_text(_pem(leaf[0]) + "".join(_pem(c[0]) for c in chain))
    key_file.write_bytes(leaf[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {"certFile": str(cert_file), "keyFile": str(key_file)}


# --------------------------------------------------------------------------------------------
# Symmetric keys over SASL PLAIN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_symmetric_key_individual_device_registers_and_gets_its_hub_identity(
    device_server, device_client, device_hub, transport
):
    reg_id = unique_id("amqp-sym")
    primary = random_key(32)
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary, secondary=random_key(32))
    )
    try:
        result = node_register(device_server, transport, attestation="symkey", registrationId=reg_id, key=primary)
        assert_assigned(result, hub=device_hub, device_id=reg_id)
        assert result["substatus"] == "initialAssignment", result
        device = hub_device(device_client, device_hub, reg_id)
        assert device["authentication"]["type"] == "sas", device
        assert device["authentication"]["symmetricKey"]["primaryKey"] == primary, device
        record = raw(device_client, "GET", f"/registrations/{reg_id}").json()
        assert record["status"] == "assigned", record
    finally:
        device_client.enrollment.delete(reg_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_symmetric_key_group_device_registers_with_its_derived_key(device_server, device_client, device_hub, transport):
    group_id = unique_id("amqp-grp")
    group_primary = random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id, symmetric_key_group(group_id, hubs=[device_hub], primary=group_primary, secondary=random_key(64))
    )
    try:
        reg_id = unique_id("amqp-grpdev")
        result = node_register(device_server, transport, attestation="symkey", registrationId=reg_id,
                               key=derive_device_key(group_primary, reg_id))
        assert_assigned(result, hub=device_hub, device_id=reg_id)
    finally:
        device_client.enrollment_group.delete(group_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_key_is_refused_in_sasl_and_others_still_register(device_server, device_client, device_hub, transport):
    reg_id = unique_id("amqp-bad")
    primary = random_key(32)
    device_client.enrollment.create_or_update(reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary))
    try:
        refused = node_register(device_server, transport, attestation="symkey", registrationId=reg_id, key=random_key(32))
        assert_refused(refused)
        assert refused["error"]["name"] == "NotConnectedError", refused
        unknown = node_register(device_server, transport, attestation="symkey", registrationId=unique_id("amqp-nobody"),
                                key=random_key(32))
        assert_refused(unknown)
        result = node_register(device_server, transport, attestation="symkey", registrationId=reg_id, key=primary)
        assert_assigned(result, hub=device_hub, device_id=reg_id)
    finally:
        device_client.enrollment.delete(reg_id)


# --------------------------------------------------------------------------------------------
# X.509 without SASL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_individual_device_registers_and_one_with_another_name_is_refused(
    device_server, device_client, device_hub, tmp_path, transport
):
    reg_id = unique_id("amqp-x509")
    leaf = _cert(reg_id)
    device_client.enrollment.create_or_update(reg_id, {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": _pem(leaf[0])}}}},
        "allocationPolicy": "static",
        "iotHubs": [device_hub],
    })
    try:
        files = _files(tmp_path, leaf)
        result = node_register(device_server, transport, attestation="x509", registrationId=reg_id, **files)
        assert_assigned(result, hub=device_hub, device_id=reg_id)
        device = hub_device(device_client, device_hub, reg_id)
        assert device["authentication"]["type"] == "selfSigned", device
        refused = node_register(device_server, transport, attestation="x509", registrationId=unique_id("amqp-notcn"),
                                **files)
        assert_refused(refused)
    finally:
        device_client.enrollment.delete(reg_id)


def test_x509_group_device_registers_through_a_verified_root_over_amqp(device_server, device_client, device_hub, tmp_path):
    root = _cert(unique_id("amqp-root"), ca=True)
    intermediate = _cert(unique_id("amqp-int"), issuer=root, ca=True)
    ca_name = unique_id("amqpca")
    r = raw(device_client, "PUT", f"/certificates/{ca_name}", json_body={"certificate": _pem(root[0]), "isVerified": True})
    assert r.status_code == 200, r.text()
    group_id = unique_id("amqp-x509grp")
    device_client.enrollment_group.create_or_update(group_id, {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}},
        "allocationPolicy": "static",
        "iotHubs": [device_hub],
    })
    try:
        reg_id = unique_id("amqp-x509dev")
        files = _files(tmp_path, _cert(reg_id, issuer=intermediate), chain=(intermediate,))
        result = node_register(device_server, "amqp", attestation="x509", registrationId=reg_id, **files)
        assert_assigned(result, hub=device_hub, device_id=reg_id)
    finally:
        device_client.enrollment_group.delete(group_id)
        raw(device_client, "DELETE", f"/certificates/{ca_name}")


# --------------------------------------------------------------------------------------------
# Bad input on the wire: each ends only its own connection
# --------------------------------------------------------------------------------------------


def _tls_connection(server) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(server.ca_path))
    sock = socket.create_connection(("127.0.0.1", 5671), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost")


def _read_all(sock: ssl.SSLSocket, limit: int = 4096) -> bytes:
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(limit)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ssl.SSLError, ConnectionError):
        pass
    return data


@pytest.mark.parametrize("sent", [
    pytest.param(b"AMQP\x03\x01\x00\x00\x00\x00\x10\x00garbage", id="garbage-after-sasl-header"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="not-amqp"),
    pytest.param(b"AMQP\x00\x01\x00\x00", id="amqp-header-without-certificate"),
])
def test_malformed_input_ends_only_that_connection(device_server, device_client, device_hub, sent):
    with _tls_connection(device_server) as sock:
        sock.sendall(sent)
        answer = _read_all(sock)
    # The server names the protocol it speaks (the SASL header) and closes.
    assert answer.startswith(b"AMQP\x03\x01\x00\x00"), answer
    reg_id = unique_id("amqp-after")
    primary = random_key(32)
    device_client.enrollment.create_or_update(reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary))
    try:
        result = node_register(device_server, "amqp", attestation="symkey", registrationId=reg_id, key=primary)
        assert_assigned(result, hub=device_hub, device_id=reg_id)
    finally:
        device_client.enrollment.delete(reg_id)
