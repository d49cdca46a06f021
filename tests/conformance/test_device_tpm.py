"""TPM attestation end to end: the official Node TPM client (azure-iot-security-tpm 1.9.3 through
tss.js) against Debian's swtpm as the device's TPM, over HTTPS (azure-iot-provisioning-device-http)
and over AMQP and AMQP over WebSocket (azure-iot-provisioning-device-amqp, SASL "TPM").

tss.js talks to /dev/tpm0 when present, else to a simulator on TCP 127.0.0.1:2323 with the plain
TPM command framing, which `swtpm socket --tpm2 --server type=tcp,port=2323 --ctrl
type=tcp,port=2324 --flags not-need-init,startup-clear` serves (started here, once per session).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest
import requests

from helpers import hub_device, link_record_hub, raw, unique_id
from test_device_amqp import assert_refused, node_register, _node, NODE_DIR

TPM_TRANSPORTS = [pytest.param("http", id="https"), pytest.param("amqp", id="amqp"),
                  pytest.param("amqpws", id="amqp-ws")]


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory):
    binary = shutil.which("swtpm")
    assert binary, "swtpm is not installed: tests/run.sh installs the Debian packages swtpm and swtpm-tools"
    for port in (2323, 2324):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, (
                f"port {port} is taken (another TPM simulator?); the Node TPM client needs 2323/2324"
            )
    state = tmp_path_factory.mktemp("swtpm")
    proc = subprocess.Popen(
        [binary, "socket", "--tpm2", "--server", "type=tcp,port=2323", "--ctrl", "type=tcp,port=2324",
         "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={state}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 2323)) == 0:
                break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("swtpm did not start listening on 127.0.0.1:2323")
    yield
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def tpm_device(swtpm) -> dict:
    """The simulated TPM's endorsement key (Base64 TPM2B_PUBLIC) and derived registration ID."""
    out = subprocess.run([_node(), str(NODE_DIR / "register.js"), json.dumps({"operation": "tpm-info"})],
                         capture_output=True, text=True, timeout=120, cwd=str(NODE_DIR))
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["ok"], info
    return info


def _enroll(device_client, registration_id: str, endorsement_key: str, hub: str, status: str = "enabled") -> None:
    device_client.enrollment.create_or_update(registration_id, {
        "registrationId": registration_id,
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": endorsement_key}},
        "allocationPolicy": "static",
        "iotHubs": [hub],
        "provisioningStatus": status,
    })


@pytest.mark.parametrize("transport", TPM_TRANSPORTS)
def test_tpm_device_registers_and_its_hub_key_rolls(device_server, device_client, device_hub, tpm_device, transport):
    reg_id = tpm_device["registrationId"]
    _enroll(device_client, reg_id, tpm_device["endorsementKey"], device_hub)
    try:
        result = node_register(device_server, transport, attestation="tpm", registrationId=reg_id)
        assert result["ok"] is True, result
        state = result["registrationState"]
        assert state["status"] == "assigned", result
        assert state["assignedHub"] == device_hub, result
        assert state["deviceId"] == reg_id, result
        blob = state["tpm"]["authenticationKey"]
        assert isinstance(blob, str) and len(blob) > 1000, state
        device = hub_device(device_client, device_hub, reg_id)
        assert device["authentication"]["type"] == "sas", device
        first_key = device["authentication"]["symmetricKey"]["primaryKey"]

        again = node_register(device_server, transport, attestation="tpm", registrationId=reg_id)
        assert again["ok"] is True, again
        device = hub_device(device_client, device_hub, reg_id)
        assert device["authentication"]["symmetricKey"]["primaryKey"] != first_key, "the key rolls"
        assert again["registrationState"]["tpm"]["authenticationKey"] != blob
    finally:
        device_client.enrollment.delete(reg_id)


@pytest.mark.parametrize("transport", TPM_TRANSPORTS)
def test_tpm_device_whose_endorsement_key_is_not_enrolled_is_refused(device_server, device_client, device_hub,
                                                                     tpm_device, transport):
    # No enrollment for the TPM's registration ID at all.
    refused = node_register(device_server, transport, attestation="tpm", registrationId=tpm_device["registrationId"])
    assert_refused(refused)


def test_tpm_device_with_another_endorsement_key_enrolled_is_refused_over_https(device_server, device_client,
                                                                               device_hub, tpm_device):
    import base64
    reg_id = tpm_device["registrationId"]
    other = bytearray(base64.b64decode(tpm_device["endorsementKey"]))
    other[-2] ^= 0x10
    _enroll(device_client, reg_id, base64.b64encode(bytes(other)).decode(), device_hub)
    try:
        body = {"registrationId": reg_id,
                "tpm": {"endorsementKey": tpm_device["endorsementKey"], "storageRootKey": tpm_device["endorsementKey"]}}
        r = requests.put(f"{device_server.base_url}/{device_server.id_scope}/registrations/{reg_id}/register",
                         params={"api-version": "2021-06-01"}, json=body, verify=str(device_server.ca_path), timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["errorCode"] == 401002, r.text
        assert "not the one enrolled" in r.json()["message"], r.text
        refused = node_register(device_server, "http", attestation="tpm", registrationId=reg_id)
        assert_refused(refused)
    finally:
        device_client.enrollment.delete(reg_id)


@pytest.mark.parametrize("ek", [pytest.param("not base64!", id="not-base64"), pytest.param("AAEC", id="truncated"),
                                pytest.param("", id="empty")])
def test_a_malformed_endorsement_key_is_refused_with_400(device_server, device_client, device_hub, tpm_device, ek):
    reg_id = tpm_device["registrationId"]
    _enroll(device_client, reg_id, tpm_device["endorsementKey"], device_hub)
    try:
        body = {"registrationId": reg_id, "tpm": {"endorsementKey": ek, "storageRootKey": tpm_device["endorsementKey"]}}
        r = requests.put(f"{device_server.base_url}/{device_server.id_scope}/registrations/{reg_id}/register",
                         params={"api-version": "2021-06-01"}, json=body, verify=str(device_server.ca_path), timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["errorCode"] == 400004, r.text
        assert "tpm.endorsementKey" in r.json()["message"], r.text
    finally:
        device_client.enrollment.delete(reg_id)


@pytest.mark.parametrize("transport", [pytest.param("http", id="https"), pytest.param("amqp", id="amqp")])
def test_a_disabled_tpm_enrollment_yields_disabled(device_server, device_client, device_hub, tpm_device, transport):
    reg_id = tpm_device["registrationId"]
    _enroll(device_client, reg_id, tpm_device["endorsementKey"], device_hub, status="disabled")
    try:
        result = node_register(device_server, transport, attestation="tpm", registrationId=reg_id)
        assert result.get("status") != "assigned", result
        record = raw(device_client, "GET", f"/registrations/{reg_id}")
        assert record.status_code in (200, 404), record.text()
        if record.status_code == 200:
            assert record.json()["status"] != "assigned", record.json()
        assert hub_device(device_client, device_hub, reg_id) is None
    finally:
        device_client.enrollment.delete(reg_id)
