"""Custom allocation by WebAssembly policies, end to end: the example policies in `policies/`
(and the hostile test policy in `tests/policies/`) uploaded through the service API, bound to
enrollment groups with the unmodified service SDK (`customAllocationDefinition.webhookUrl:
"wasm:NAME"`, or Berth's own `policyBinding`), and devices registered with the official Python
device SDK over MQTT against `device_server`; the hub side is read back from the `record`
driver (`GET /linkedHubs/{hub}/devices/{id}`).

What azure-iot-device 2.14.0 does with a registration a policy refuses (status "failed"):
register() raises `ClientError("Unexpected failure")` whose __cause__ is a `ServiceError("Query
Status operation returned a failed registration status with a status code of 200")`; the
errorCode and errorMessage reach the device over MQTT (in `registrationState`) but the SDK
surfaces neither, so `helpers.sdk_register_recording` reads them from the SDK's own DEBUG log of
the DPS responses it received.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from azure.iot.device.exceptions import ClientError, ServiceError

from helpers import (
    SDK_FAILED_STATUS_MESSAGE,
    assert_dps_error,
    assert_hub_device,
    assert_no_hub_device,
    custom_group,
    derive_device_key,
    dry_run,
    https_register_and_wait,
    link_record_hub,
    policy_component,
    put_lookup_table,
    random_key,
    raw,
    sdk_register_recording,
    symmetric_key_enrollment,
    unique_id,
    upload_policy,
)

# The SDK builds its TLS context with the deprecated ssl.PROTOCOL_TLSv1_2 (DPS pins TLS 1.2).
pytestmark = pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")

EXAMPLE_POLICIES = ["contoso-divisions", "tenant-by-payload", "certificate-organization", "quarantine",
                    "quarantine-rule"]
# The hostile policy's limits: 250 ms of wall time (long enough that the memory bomb meets its
# memory limit first even on a loaded machine), 32 MiB of memory.
HOSTILE_LIMITS = {"timeoutMs": 250, "memoryBytes": 32 << 20}
DEFAULT_LIMITS = {"timeoutMs": 100, "memoryBytes": 64 << 20, "moduleBytes": 16 << 20, "inputBytes": 256 << 10,
                  "outputBytes": 96 << 10, "logBytes": 16 << 10}


@pytest.fixture(scope="module")
def policies(device_server, device_client) -> dict:
    """Every example policy uploaded under its crate name, and `hostile` with HOSTILE_LIMITS.
    Returns {name: upload answer}."""
    uploaded = {}
    for name in EXAMPLE_POLICIES:
        r = upload_policy(device_client, name, policy_component(name))
        assert r.status_code == 200, f"upload of {name}: {r.status_code} {r.text()!r}"
        uploaded[name] = r.json()
    r = upload_policy(device_client, "hostile", policy_component("hostile"), **HOSTILE_LIMITS)
    assert r.status_code == 200, f"upload of hostile: {r.status_code} {r.text()!r}"
    uploaded["hostile"] = r.json()
    return uploaded


def _group_with_keys(device_client, body: dict) -> str:
    """Create the group `body` describes; returns its primary key."""
    device_client.enrollment_group.create_or_update(body["enrollmentGroupId"], body)
    return body["attestation"]["symmetricKey"]["primaryKey"]


def _assert_assigned(outcome, *, hub: str, device_id: str, payload, substatus: str = "initialAssignment") -> None:
    assert outcome.error is None, f"{outcome.registration_id}: {outcome.error!r} (received {outcome.responses!r})"
    result = outcome.result
    assert result.status == "assigned", str(result)
    state = result.registration_state
    assert state.assigned_hub == hub, str(result)
    assert state.device_id == device_id, str(result)
    assert state.sub_status == substatus, str(result)
    assert json.loads(state.response_payload) == payload, str(result)


def _assert_refused(outcome, *, error_code: int, error_message: str) -> None:
    """The SDK raised for status "failed", and the device received that status with the policy's
    error code and message."""
    err = outcome.error
    assert type(err) is ClientError, f"{outcome.registration_id}: {err!r} (result {outcome.result!r})"
    assert str(err) == "Unexpected failure", repr(err)
    assert type(err.__cause__) is ServiceError, repr(err.__cause__)
    assert str(err.__cause__) == SDK_FAILED_STATUS_MESSAGE
    final = outcome.final
    assert final["status"] == "failed", final
    state = final["registrationState"]
    assert state["registrationId"] == outcome.registration_id, final
    assert state["status"] == "failed", final
    assert state["errorCode"] == error_code, final
    assert state["errorMessage"] == error_message, final
    assert "assignedHub" not in state and "payload" not in state, final


def _unlink(device_client, *hubs: str) -> None:
    for hub in hubs:
        raw(device_client, "DELETE", f"/linkedHubs/{hub}")


# --------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------


def test_upload_answers_with_the_version_world_digest_size_and_limits(policies):
    for name in EXAMPLE_POLICIES:
        component = policy_component(name)
        answer = policies[name]
        assert answer["name"] == name, answer
        assert isinstance(answer["version"], int) and answer["version"] >= 1, answer
        world = "reprovisioning-rule" if name == "quarantine-rule" else "allocation-policy"
        assert answer["world"] == world, answer
        assert answer["sha256"] == hashlib.sha256(component).hexdigest(), answer
        assert answer["size"] == len(component), answer
        assert answer["limits"] == DEFAULT_LIMITS, answer
    assert policies["hostile"]["limits"] == {**DEFAULT_LIMITS, **HOSTILE_LIMITS}, policies["hostile"]


# --------------------------------------------------------------------------------------------
# contoso-divisions, bound the way the unmodified service SDK can: webhookUrl "wasm:NAME"
# --------------------------------------------------------------------------------------------

TOASTERS_HUB = "contoso-toasters-hub-1098.azure-devices.net"
HEATPUMPS_HUB = "contoso-heatpumps-hub-1098.azure-devices.net"
TOASTER_TWIN = {"tags": {"deviceType": "toaster"},
                "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}}
HEATPUMP_TWIN = {"tags": {"deviceType": "heatpump"},
                 "properties": {"desired": {"state": "on", "temperatureSetting": "65"}}}


def test_contoso_divisions_assigns_toasters_and_heat_pumps_to_their_division_hubs_and_refuses_others(
    device_server, device_client, policies
):
    for hub in (TOASTERS_HUB, HEATPUMPS_HUB):
        r = raw(device_client, "PUT", f"/linkedHubs/{hub}", json_body={})
        assert r.status_code in (200, 201), f"linking {hub}: {r.status_code} {r.text()!r}"
    try:
        group_id = unique_id("contoso-custom-allocated-devices")
        # The enrollment's own twin, which the policy's twin replaces.
        enrollment_twin = {"tags": {"source": "enrollment"}, "properties": {"desired": {"fromEnrollment": True}}}
        body = custom_group(group_id, hubs=[TOASTERS_HUB, HEATPUMPS_HUB], primary=random_key(64),
                            secondary=random_key(64), webhook_url="wasm:contoso-divisions",
                            initial_twin=enrollment_twin)
        created = device_client.enrollment_group.create_or_update(group_id, body)
        assert created["allocationPolicy"] == "custom", created
        assert created["customAllocationDefinition"] == {"webhookUrl": "wasm:contoso-divisions",
                                                         "apiVersion": "2021-10-01"}, created
        group_primary = body["attestation"]["symmetricKey"]["primaryKey"]
        group_secondary = body["attestation"]["symmetricKey"]["secondaryKey"]
        toaster = f"{unique_id('breakroom499')}-contoso-tstrsd-007"
        heatpump = f"{unique_id('mainbuilding167')}-contoso-hpsd-088"
        stranger = unique_id("contoso-heatpump-088")

        outcomes = sdk_register_recording(
            device_server,
            [(reg_id, derive_device_key(group_primary, reg_id), None) for reg_id in (toaster, heatpump, stranger)],
        )

        _assert_assigned(outcomes[toaster], hub=TOASTERS_HUB, device_id=toaster, payload={"division": "toasters"})
        assert_hub_device(device_client, TOASTERS_HUB, toaster, primary=derive_device_key(group_primary, toaster),
                          secondary=derive_device_key(group_secondary, toaster), twin=TOASTER_TWIN)
        assert_no_hub_device(device_client, HEATPUMPS_HUB, toaster)

        _assert_assigned(outcomes[heatpump], hub=HEATPUMPS_HUB, device_id=heatpump,
                         payload={"division": "heatpumps"})
        assert_hub_device(device_client, HEATPUMPS_HUB, heatpump, primary=derive_device_key(group_primary, heatpump),
                          secondary=derive_device_key(group_secondary, heatpump), twin=HEATPUMP_TWIN)
        assert_no_hub_device(device_client, TOASTERS_HUB, heatpump)

        _assert_refused(outcomes[stranger], error_code=400207, error_message="Unrecognized device registration.")
        assert_no_hub_device(device_client, TOASTERS_HUB, stranger)
        assert_no_hub_device(device_client, HEATPUMPS_HUB, stranger)
    finally:
        _unlink(device_client, TOASTERS_HUB, HEATPUMPS_HUB)


# --------------------------------------------------------------------------------------------
# tenant-by-payload, bound natively: policyBinding with a lookup table
# --------------------------------------------------------------------------------------------


def test_tenant_by_payload_picks_the_hub_of_the_payloads_tenant_from_the_lookup_table(
    device_server, device_client, policies
):
    fabrikam_hub = link_record_hub(device_client, "fabrikam-hub")
    contoso_hub = link_record_hub(device_client, "contoso-hub")
    try:
        # A tenant's hub as a first label or as a host name inside an object.
        put_lookup_table(device_client, "tenants", {
            "fabrikam": fabrikam_hub.split(".")[0],
            "contoso": {"hub": contoso_hub, "plan": "gold"},
        })
        group_id = unique_id("tenants")
        binding = {"allocation": "tenant-by-payload", "lookupTables": ["tenants"]}
        enrollment_twin = {"tags": {"fleet": "berth"}, "properties": {"desired": {"interval": 30}}}
        body = custom_group(group_id, hubs=[fabrikam_hub, contoso_hub], primary=random_key(64),
                            secondary=random_key(64), binding=binding, initial_twin=enrollment_twin)
        created = device_client.enrollment_group.create_or_update(group_id, body)
        assert created["policyBinding"] == binding, created
        assert "customAllocationDefinition" not in created, created
        group_primary = body["attestation"]["symmetricKey"]["primaryKey"]
        fab, con, unknown = unique_id("sensor-fab"), unique_id("sensor-con"), unique_id("sensor-initech")

        outcomes = sdk_register_recording(device_server, [
            (fab, derive_device_key(group_primary, fab), {"tenant": "fabrikam", "model": "t-1000"}),
            (con, derive_device_key(group_primary, con), {"tenant": "contoso"}),
            (unknown, derive_device_key(group_primary, unknown), {"tenant": "initech"}),
        ])

        _assert_assigned(outcomes[fab], hub=fabrikam_hub, device_id=fab, payload={"tenant": "fabrikam"})
        assert_hub_device(device_client, fabrikam_hub, fab, primary=derive_device_key(group_primary, fab), twin={
            "tags": {"fleet": "berth", "tenant": "fabrikam"}, "properties": {"desired": {"interval": 30}}})
        assert_no_hub_device(device_client, contoso_hub, fab)

        _assert_assigned(outcomes[con], hub=contoso_hub, device_id=con, payload={"tenant": "contoso"})
        assert_hub_device(device_client, contoso_hub, con, primary=derive_device_key(group_primary, con), twin={
            "tags": {"fleet": "berth", "tenant": "contoso"}, "properties": {"desired": {"interval": 30}}})
        assert_no_hub_device(device_client, fabrikam_hub, con)

        _assert_refused(outcomes[unknown], error_code=400207, error_message="unknown tenant 'initech'")
        assert_no_hub_device(device_client, fabrikam_hub, unknown)
        assert_no_hub_device(device_client, contoso_hub, unknown)
    finally:
        _unlink(device_client, fabrikam_hub, contoso_hub)


# --------------------------------------------------------------------------------------------
# certificate-organization: dry runs with synthetic certificate facts, a symmetric-key device
# --------------------------------------------------------------------------------------------

CERT_HUBS = ["contoso-ltd-hub-1.azure-devices.net", "fab-hub.azure-devices.net",
             "fabrikam-hub-7.azure-devices.net"]
CERT_ENROLLMENT_TWIN = {"tags": {"site": "lab"}, "properties": {"desired": {"interval": 5}}}


def _certificate(subject: str, *, organization=None, organizational_unit=None) -> dict:
    return {
        "subjectName": subject,
        "issuerName": "CN=Berth Test Root",
        "commonName": "d1",
        "organization": organization,
        "organizationalUnit": organizational_unit,
        "sha1Thumbprint": "A" * 40,
        "sha256Thumbprint": "B" * 64,
        "notBefore": "2025-01-01T00:00:00Z",
        "notAfter": "2026-01-01T00:00:00Z",
        "subjectAlternativeNames": [],
    }


def _dry_run_request(attestation: dict) -> dict:
    return {
        "enrollment": {"kind": "group", "id": "x509-fleet", "iotHubs": CERT_HUBS,
                       "initialTwin": CERT_ENROLLMENT_TWIN},
        "device": {"registrationId": "d1", "attestation": attestation, "protocol": "Mqtt"},
        "linkedHubs": [{"name": hub} for hub in CERT_HUBS],
    }


@pytest.mark.parametrize(
    "certificate, hub, organization",
    [
        pytest.param(_certificate("CN=d1, O=Fabrikam", organization="Fabrikam"),
                     "fabrikam-hub-7.azure-devices.net", "Fabrikam", id="organization"),
        pytest.param(_certificate("CN=d1, OU=Contoso Ltd", organizational_unit="Contoso Ltd"),
                     "contoso-ltd-hub-1.azure-devices.net", "Contoso Ltd", id="unit-when-no-organization"),
    ],
)
def test_certificate_organization_dry_run_assigns_the_hub_named_after_the_certificates_organization(
    device_client, policies, certificate, hub, organization
):
    answer = dry_run(device_client, "certificate-organization",
                     _dry_run_request({"kind": "x509", "certificate": certificate}))

    assert answer["decision"] == {
        "status": "assigned",
        "iotHubHostName": hub,
        "deviceId": None,
        "initialTwin": {"tags": {"site": "lab", "organization": organization},
                        "properties": {"desired": {"interval": 5}}},
        "payload": None,
    }, answer
    assert answer["logs"] == [{"level": "info", "message": f"d1 of '{organization}' goes to {hub}"}], answer
    assert isinstance(answer["wallTimeMicros"], int) and answer["wallTimeMicros"] > 0, answer
    assert isinstance(answer["memoryBytes"], int) and answer["memoryBytes"] > 0, answer


@pytest.mark.parametrize(
    "attestation, error_code, error_message, logs",
    [
        pytest.param({"kind": "x509", "certificate": _certificate("CN=d1, O=Ab", organization="Ab")},
                     400208, "the custom allocation named no IoT hub",
                     [{"level": "warn", "message": "no hub for organization 'Ab' (looked for 'ab' in the hub names)"}],
                     id="no-hub-names-the-organization"),
        pytest.param({"kind": "x509", "certificate": _certificate("CN=d1, O=--", organization="--")},
                     400209, "the certificate names no organization (O or OU)", [], id="no-organization"),
        pytest.param({"kind": "x509"}, 400207, "the device's certificate is unknown",
                     [{"level": "error", "message": "an X.509 device arrived without certificate facts"}],
                     id="x509-without-certificate-facts"),
        pytest.param({"kind": "symmetricKey"}, 400209, "only X.509 devices are provisioned by this policy", [],
                     id="symmetric-key-device"),
        pytest.param({"kind": "tpm", "endorsementKey": "AAAA"}, 400209,
                     "only X.509 devices are provisioned by this policy", [], id="tpm-device"),
    ],
)
def test_certificate_organization_dry_run_refuses_with_the_dps_error_code(
    device_client, policies, attestation, error_code, error_message, logs
):
    answer = dry_run(device_client, "certificate-organization", _dry_run_request(attestation))

    assert answer["decision"] == {"status": "failed", "errorCode": error_code, "errorMessage": error_message}, answer
    assert answer["logs"] == logs, answer


def test_certificate_organization_refuses_a_symmetric_key_device_with_400209(device_server, device_client, policies):
    hub = link_record_hub(device_client, "fabrikam-hub")
    try:
        group_id = unique_id("x509-only")
        body = custom_group(group_id, hubs=[hub], primary=random_key(64), secondary=random_key(64),
                            binding={"allocation": "certificate-organization"})
        group_primary = _group_with_keys(device_client, body)
        reg_id = unique_id("sym-device")

        outcome = sdk_register_recording(device_server, [(reg_id, derive_device_key(group_primary, reg_id), None)])[reg_id]

        _assert_refused(outcome, error_code=400209, error_message="only X.509 devices are provisioned by this policy")
        assert_no_hub_device(device_client, hub, reg_id)
    finally:
        _unlink(device_client, hub)


# --------------------------------------------------------------------------------------------
# quarantine + quarantine-rule: into quarantine with old firmware, out again with good firmware
# --------------------------------------------------------------------------------------------


def test_quarantine_sends_old_firmware_to_the_quarantine_hub_and_a_good_version_moves_the_device_back(
    device_server, device_client, policies
):
    quarantine_hub = link_record_hub(device_client, "quarantine")
    healthy_hub = link_record_hub(device_client, "healthy")
    try:
        group_id = unique_id("firmware")
        enrollment_twin = {"tags": {"fleet": "sensors"}, "properties": {"desired": {"interval": 60}}}
        body = custom_group(
            group_id, hubs=[quarantine_hub, healthy_hub], primary=random_key(64), secondary=random_key(64),
            webhook_url="wasm:quarantine", initial_twin=enrollment_twin,
            binding={"reprovisioning": "quarantine-rule",
                     "config": {"minimumFirmware": "1.2.0", "quarantineHub": quarantine_hub.split(".")[0]}},
        )
        # Without a rule this would keep every registered device where it is; the rule overrides
        # it for moves into and out of quarantine (Migrate), which proves the rule was consulted.
        body["reprovisionPolicy"] = {"updateHubAssignment": False, "migrateDeviceData": False}
        group_primary = _group_with_keys(device_client, body)
        reg_id = unique_id("sensor")
        key = derive_device_key(group_primary, reg_id)
        reason = "firmware 1.1.4 is below 1.2.0"
        quarantined_twin = {
            "tags": {"fleet": "sensors", "quarantine": {"reason": reason, "minimumFirmware": "1.2.0"}},
            "properties": {"desired": {"interval": 60}},
        }

        first = sdk_register_recording(device_server, [(reg_id, key, {"firmwareVersion": "1.1.4"})])[reg_id]

        _assert_assigned(first, hub=quarantine_hub, device_id=reg_id,
                         payload={"quarantined": True, "reason": reason, "minimumFirmware": "1.2.0"})
        assert_hub_device(device_client, quarantine_hub, reg_id, primary=key, twin=quarantined_twin)
        assert_no_hub_device(device_client, healthy_hub, reg_id)

        second = sdk_register_recording(device_server, [(reg_id, key, {"firmwareVersion": "1.2.0"})])[reg_id]

        # quarantine-rule answers Migrate on the way out: the device moves with its twin (the
        # quarantine tag included: the rule never rewrites the twin, the allocation returns none).
        _assert_assigned(second, hub=healthy_hub, device_id=reg_id, payload={"quarantined": False},
                         substatus="deviceDataMigrated")
        assert_hub_device(device_client, healthy_hub, reg_id, primary=key, twin=quarantined_twin)
        assert_no_hub_device(device_client, quarantine_hub, reg_id)
    finally:
        _unlink(device_client, quarantine_hub, healthy_hub)


# --------------------------------------------------------------------------------------------
# The hostile policy: a runaway call fails that registration only
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_group(device_client, policies):
    """A group bound to `hostile` (250 ms, 32 MiB) with one hub: (primary key, hub, version)."""
    hub = link_record_hub(device_client, "dhub-hostile")
    body = custom_group(unique_id("hostile"), hubs=[hub], primary=random_key(64), secondary=random_key(64),
                        webhook_url="wasm:hostile")
    primary = _group_with_keys(device_client, body)
    yield primary, hub, policies["hostile"]["version"]
    _unlink(device_client, hub)


@pytest.mark.parametrize(
    "prefix, error",
    [
        pytest.param("loop", "the policy exceeded its time limit", id="endless-loop"),
        pytest.param("bomb", "the policy exceeded its memory limit", id="memory-bomb"),
        pytest.param("trap", "the policy trapped: wasm trap: wasm `unreachable` instruction executed", id="panic"),
    ],
)
def test_hostile_policy_fails_only_the_runaway_registration_and_the_next_device_is_assigned(
    device_server, device_client, hostile_group, prefix, error
):
    primary, hub, version = hostile_group
    runaway, normal = unique_id(prefix), unique_id("normal")

    started = time.monotonic()
    failed = https_register_and_wait(device_server, runaway, derive_device_key(primary, runaway))
    elapsed = time.monotonic() - started
    assigned = https_register_and_wait(device_server, normal, derive_device_key(primary, normal))

    assert failed["status"] == "failed", failed
    state = failed["registrationState"]
    assert state["registrationId"] == runaway, failed
    assert state["errorCode"] == 400207, failed
    assert state["errorMessage"] == f"policy hostile@{version}: {error}", failed
    assert elapsed < 5, f"the runaway registration took {elapsed:.1f}s"
    assert_no_hub_device(device_client, hub, runaway)
    assert assigned["status"] == "assigned", assigned
    assert assigned["registrationState"]["assignedHub"] == hub, assigned
    assert assigned["registrationState"]["payload"] == {"ok": True}, assigned
    assert_hub_device(device_client, hub, normal, primary=derive_device_key(primary, normal))


# --------------------------------------------------------------------------------------------
# Versions: wasm:NAME@VERSION pins one, wasm:NAME follows the latest
# --------------------------------------------------------------------------------------------


def test_webhook_url_with_a_version_pins_that_version_and_without_follows_the_latest(
    device_server, device_client, policies
):
    name = unique_id("pinned")
    first = upload_policy(device_client, name, policy_component("hostile"))
    second = upload_policy(device_client, name, policy_component("contoso-divisions"))
    assert (first.status_code, second.status_code) == (200, 200), (first.text(), second.text())
    assert (first.json()["version"], second.json()["version"]) == (1, 2)
    hub = link_record_hub(device_client, "pin-toasters")
    try:
        outcomes = {}
        for url in (f"wasm:{name}@1", f"wasm:{name}"):
            reg_id = f"{unique_id('pin')}-contoso-tstrsd-007"
            primary = random_key(32)
            body = symmetric_key_enrollment(reg_id, hubs=[hub], primary=primary, allocation="custom")
            body["customAllocationDefinition"] = {"webhookUrl": url, "apiVersion": "2021-10-01"}
            device_client.enrollment.create_or_update(reg_id, body)
            outcomes[url] = (reg_id, primary, https_register_and_wait(device_server, reg_id, primary))

        # Version 1 is the hostile policy (payload {"ok": true}, no twin); 2 is contoso-divisions.
        reg_id, primary, pinned = outcomes[f"wasm:{name}@1"]
        assert pinned["status"] == "assigned", pinned
        assert pinned["registrationState"]["payload"] == {"ok": True}, pinned
        assert_hub_device(device_client, hub, reg_id, primary=primary)
        reg_id, primary, latest = outcomes[f"wasm:{name}"]
        assert latest["status"] == "assigned", latest
        assert latest["registrationState"]["payload"] == {"division": "toasters"}, latest
        assert_hub_device(device_client, hub, reg_id, primary=primary, twin=TOASTER_TWIN)
    finally:
        _unlink(device_client, hub)


# --------------------------------------------------------------------------------------------
# Upload refusals and deletion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "component, message",
    [
        pytest.param(b"\x00asm\x01\x00\x00\x00",
                     "this is a core WebAssembly module, not a component: build it for wasm32-wasip2",
                     id="core-module"),
        pytest.param(None, "the component does not compile", id="truncated-component"),
        pytest.param(b"MZ\x90\x00not wasm at all", "this is not a WebAssembly component", id="not-wasm"),
    ],
)
def test_upload_of_something_that_is_not_a_complete_component_is_refused_with_400004(
    device_client, component, message
):
    if component is None:
        whole = policy_component("contoso-divisions")
        component = whole[: len(whole) // 2]
    name = unique_id("refused")

    r = upload_policy(device_client, name, component)

    body = assert_dps_error(r, 400)
    assert body["errorCode"] == 400004, body
    assert body["message"].startswith(message), body
    assert raw(device_client, "GET", f"/policies/{name}").status_code == 404


@pytest.mark.parametrize("bound_by", ["webhookUrl", "policyBinding"])
def test_delete_of_a_policy_an_enrollment_group_uses_is_refused_with_409_until_it_is_unbound(
    device_client, policies, bound_by
):
    name = unique_id("in-use")
    assert upload_policy(device_client, name, policy_component("contoso-divisions")).status_code == 200
    hub = link_record_hub(device_client, "dhub-inuse")
    try:
        group_id = unique_id("uses-policy")
        body = custom_group(group_id, hubs=[hub], primary=random_key(64), secondary=random_key(64),
                            **({"webhook_url": f"wasm:{name}"} if bound_by == "webhookUrl"
                               else {"binding": {"allocation": name}}))
        device_client.enrollment_group.create_or_update(group_id, body)

        refused = raw(device_client, "DELETE", f"/policies/{name}")

        error = assert_dps_error(refused, 409)
        assert error["errorCode"] == 409201, error
        assert error["message"] == f"policy '{name}' is used by enrollmentGroups/{group_id}; unbind it first", error
        assert raw(device_client, "GET", f"/policies/{name}").status_code == 200

        device_client.enrollment_group.delete(group_id)
        deleted = raw(device_client, "DELETE", f"/policies/{name}")

        assert deleted.status_code == 204, deleted.text()
        assert raw(device_client, "GET", f"/policies/{name}").status_code == 404
    finally:
        _unlink(device_client, hub)
