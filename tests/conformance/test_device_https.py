"""The device registration API over HTTPS (wire-protocol.md §3), with plain `requests` over real TLS
to localhost:443, trusting the server's CA: register + poll, retry-after, status lookup, errors."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest
import requests

from helpers import (
    DEVICE_API_VERSION,
    EMPTY_TWIN,
    assert_hub_device,
    assert_no_hub_device,
    derive_device_key,
    device_sas_token,
    link_record_hub,
    parse_utc,
    random_key,
    raw,
    symmetric_key_enrollment,
    symmetric_key_group,
    unique_id,
)

TIMEOUT = 15
OPERATION_ID = re.compile(r"[A-Za-z0-9.-]+")


# --------------------------------------------------------------------------------------------
# Raw requests
# --------------------------------------------------------------------------------------------


def _url(server, path: str) -> str:
    return f"{server.base_url}{path}"


def _headers(token: Optional[str]) -> dict:
    headers = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = token
    return headers


def register(server, reg_id: str, token: Optional[str], *, body=None, data: Optional[bytes] = None,
             scope: Optional[str] = None) -> requests.Response:
    """PUT /{idScope}/registrations/{id}/register. `body` defaults to {"registrationId": id};
    `data` sends raw bytes instead."""
    if data is None:
        data = json.dumps(body if body is not None else {"registrationId": reg_id}).encode()
    return requests.put(
        _url(server, f"/{scope or server.id_scope}/registrations/{reg_id}/register"),
        params={"api-version": DEVICE_API_VERSION},
        headers=_headers(token),
        data=data,
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def poll(server, reg_id: str, operation_id: str, token: Optional[str], *, session=requests) -> requests.Response:
    """GET /{idScope}/registrations/{id}/operations/{operationId}."""
    return session.get(
        _url(server, f"/{server.id_scope}/registrations/{reg_id}/operations/{operation_id}"),
        params={"api-version": DEVICE_API_VERSION},
        headers=_headers(token),
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def status_lookup(server, reg_id: str, token: Optional[str]) -> requests.Response:
    """POST /{idScope}/registrations/{id} (Device Registration Status Lookup)."""
    return requests.post(
        _url(server, f"/{server.id_scope}/registrations/{reg_id}"),
        params={"api-version": DEVICE_API_VERSION},
        headers=_headers(token),
        data=json.dumps({"registrationId": reg_id}).encode(),
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def wire_header_names(response: requests.Response) -> list:
    """Header names exactly as they came over the wire (requests' own dict is case-insensitive)."""
    return list(response.raw.headers.keys())


def assert_retry_after(response: requests.Response, *, low: int = 2, high: int = 5) -> int:
    """A `retry-after` header, named in lowercase on the wire, holding an integer in [low, high]."""
    names = wire_header_names(response)
    matching = [name for name in names if name.lower() == "retry-after"]
    assert matching == ["retry-after"], f"expected one lowercase retry-after header, got {names!r}"
    value = response.headers["retry-after"]
    assert re.fullmatch(r"[0-9]+", value), f"retry-after must be integer seconds, got {value!r}"
    assert low <= int(value) <= high, f"retry-after {value} outside [{low}, {high}]"
    return int(value)


def assert_device_error(response: requests.Response, status: int, error_code: Optional[int] = None) -> dict:
    """The HTTP status and the DPS error body {errorCode, trackingId, message, timestampUtc}."""
    assert response.status_code == status, f"expected HTTP {status}, got {response.status_code}: {response.text!r}"
    try:
        body = response.json()
    except ValueError as exc:
        raise AssertionError(f"error body is not JSON: {response.text!r}") from exc
    assert isinstance(body, dict), body
    code = body.get("errorCode")
    assert isinstance(code, int) and not isinstance(code, bool), f"errorCode must be an int: {body!r}"
    assert code // 1000 == status, f"errorCode {code} does not match HTTP status {status}: {body!r}"
    if error_code is not None:
        assert code == error_code, f"expected errorCode {error_code}: {body!r}"
    assert isinstance(body.get("trackingId"), str) and body["trackingId"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    parse_utc(body.get("timestampUtc"))
    header = response.headers.get("x-ms-error-code")
    assert header == str(code), f"x-ms-error-code header {header!r} must repeat errorCode {code}"
    return body


def assert_accepted(response: requests.Response, reg_id: str) -> str:
    """202 {operationId, status: assigning, registrationState: {registrationId, status: assigning}}
    with a retry-after header; returns the operationId."""
    assert response.status_code == 202, f"{response.status_code}: {response.text!r}"
    body = response.json()
    assert isinstance(body.get("operationId"), str) and OPERATION_ID.fullmatch(body["operationId"]), body
    assert body["status"] == "assigning", body
    assert body["registrationState"]["registrationId"] == reg_id, body
    assert body["registrationState"]["status"] == "assigning", body
    assert_retry_after(response)
    return body["operationId"]


def poll_until_done(server, reg_id: str, operation_id: str, token: str, *, limit: float = 30) -> dict:
    """Poll as a device does: a first poll right away, then as `retry-after` says. Every 202
    must be well-formed; returns the final 200 body."""
    deadline = time.monotonic() + limit
    wait = 0.2
    while True:
        time.sleep(wait)
        r = poll(server, reg_id, operation_id, token)
        if r.status_code == 200:
            body = r.json()
            assert body["operationId"] == operation_id, body
            return body
        assert r.status_code == 202, f"poll answered {r.status_code}: {r.text!r}"
        body = r.json()
        assert body["operationId"] == operation_id, body
        assert body["status"] == "assigning", body
        assert body["registrationState"]["registrationId"] == reg_id, body
        assert body["registrationState"]["status"] == "assigning", body
        wait = assert_retry_after(r)
        assert time.monotonic() + wait < deadline, f"{reg_id} still assigning after {limit}s"


def register_and_wait(server, reg_id: str, key: str) -> dict:
    token = device_sas_token(server.id_scope, reg_id, key)
    operation_id = assert_accepted(register(server, reg_id, token), reg_id)
    return poll_until_done(server, reg_id, operation_id, token)


def _enroll(device_client, hub: str, **kwargs) -> tuple:
    reg_id = unique_id(kwargs.pop("prefix", "https"))
    primary, secondary = random_key(32), random_key(32)
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[hub], primary=primary, secondary=secondary, **kwargs)
    )
    return reg_id, primary, secondary


def _assert_assigned_state(state: dict, *, reg_id: str, hub: str, device_id: str) -> None:
    assert state["registrationId"] == reg_id, state
    assert state["assignedHub"] == hub, state
    assert state["deviceId"] == device_id, state
    assert state["status"] == "assigned", state
    assert state["substatus"] == "initialAssignment", state
    created = parse_utc(state["createdDateTimeUtc"])
    updated = parse_utc(state["lastUpdatedDateTimeUtc"])
    assert updated >= created, state
    assert isinstance(state["etag"], str) and state["etag"], state


# --------------------------------------------------------------------------------------------
# Register, poll, status lookup
# --------------------------------------------------------------------------------------------


def test_register_returns_202_then_poll_returns_200_assigned_and_hub_device_exists(
    device_server, device_client, device_hub
):
    reg_id, primary, secondary = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = register(device_server, reg_id, token, body={"registrationId": reg_id, "payload": {"modelId": "dtmi:x;1"}})
    operation_id = assert_accepted(r, reg_id)
    final = poll_until_done(device_server, reg_id, operation_id, token)

    assert final["status"] == "assigned", final
    _assert_assigned_state(final["registrationState"], reg_id=reg_id, hub=device_hub, device_id=reg_id)
    assert_hub_device(device_client, device_hub, reg_id, primary=primary, secondary=secondary, twin=EMPTY_TWIN)


def test_register_and_poll_answer_with_lowercase_integer_retry_after_between_2_and_5(
    device_server, device_client, device_hub
):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = register(device_server, reg_id, token)

    assert r.status_code == 202, r.text
    assert_retry_after(r)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    # Every 202 on the poll route carries the same header (checked inside poll_until_done).
    final = poll_until_done(device_server, reg_id, assert_accepted(r, reg_id), token)
    assert final["status"] == "assigned", final


def test_status_lookup_returns_the_stored_registration_state(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    final = register_and_wait(device_server, reg_id, primary)

    r = status_lookup(device_server, reg_id, device_sas_token(device_server.id_scope, reg_id, primary))

    assert r.status_code == 200, r.text
    state = r.json()
    _assert_assigned_state(state, reg_id=reg_id, hub=device_hub, device_id=reg_id)
    for field in ("createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"):
        assert state[field] == final["registrationState"][field], (field, state, final)


def test_status_lookup_before_any_registration_returns_404(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)

    r = status_lookup(device_server, reg_id, device_sas_token(device_server.id_scope, reg_id, primary))

    assert_device_error(r, 404)


def test_secondary_key_and_c_sdk_lowercase_percent_encoding_authenticate(device_server, device_client, device_hub):
    reg_id, _, secondary = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, secondary, lowercase_percent_encoding=True)
    assert "%2f" in token

    operation_id = assert_accepted(register(device_server, reg_id, token), reg_id)
    final = poll_until_done(device_server, reg_id, operation_id, token)

    assert final["status"] == "assigned", final


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(None, id="null"),
        pytest.param('{"modelId":"dtmi:berth:thermostat;1"}', id="json-text-as-java-sends"),
        pytest.param(42, id="number"),
        pytest.param(["a", {"b": 1}], id="array"),
    ],
)
def test_any_json_payload_value_is_accepted(device_server, device_client, device_hub, payload):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = register(device_server, reg_id, token, body={"registrationId": reg_id, "payload": payload})

    operation_id = assert_accepted(r, reg_id)
    assert poll_until_done(device_server, reg_id, operation_id, token)["status"] == "assigned"


def test_sdk_request_quirks_are_accepted(device_server, device_client, device_hub):
    # The docs' curl sample sends "Content-Encoding: utf-8"; Node sends a {} body on the GET
    # poll; SDKs in the field send api-versions back to 2017-08-31-preview (§1.7, §3.2).
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)
    r = requests.put(
        _url(device_server, f"/{device_server.id_scope}/registrations/{reg_id}/register"),
        params={"api-version": "2017-08-31-preview"},
        headers={**_headers(token), "Content-Encoding": "utf-8"},
        data=json.dumps({"registrationId": reg_id}).encode(),
        verify=str(device_server.ca_path),
        timeout=TIMEOUT,
    )
    operation_id = assert_accepted(r, reg_id)

    time.sleep(0.5)
    r = requests.get(
        _url(device_server, f"/{device_server.id_scope}/registrations/{reg_id}/operations/{operation_id}"),
        params={"api-version": "2019-03-31"},
        headers=_headers(token),
        data=b"{}",
        verify=str(device_server.ca_path),
        timeout=TIMEOUT,
    )

    assert r.status_code in (200, 202), r.text
    assert r.json()["operationId"] == operation_id


def test_token_without_skn_as_the_python_device_sdk_sends_authenticates(device_server, device_client, device_hub):
    # azure-iot-device 2.x signs sr and se but sends no skn field at all.
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary, skn=None)
    assert "skn=" not in token

    operation_id = assert_accepted(register(device_server, reg_id, token), reg_id)
    final = poll_until_done(device_server, reg_id, operation_id, token)

    assert final["status"] == "assigned", final


def test_group_device_key_derived_from_the_group_secondary_key_authenticates(
    device_server, device_client, device_hub
):
    group_id = unique_id("https-grp")
    group_primary, group_secondary = random_key(64), random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id, symmetric_key_group(group_id, hubs=[device_hub], primary=group_primary, secondary=group_secondary)
    )
    reg_id = unique_id("https-grpdev")

    final = register_and_wait(device_server, reg_id, derive_device_key(group_secondary, reg_id))

    assert final["status"] == "assigned", final
    _assert_assigned_state(final["registrationState"], reg_id=reg_id, hub=device_hub, device_id=reg_id)
    assert_hub_device(
        device_client,
        device_hub,
        reg_id,
        primary=derive_device_key(group_primary, reg_id),
        secondary=derive_device_key(group_secondary, reg_id),
    )


# --------------------------------------------------------------------------------------------
# Allocation (cheap over HTTPS, so enough devices for a statistical check)
# --------------------------------------------------------------------------------------------


def test_hashed_allocation_follows_the_linked_hubs_allocation_weights(device_server, device_client):
    # 60 devices over hubs weighted 1 and 3: the heavy hub's count is Binomial(60, 0.75), mean 45.
    # "light gets at least one and heavy gets more than half" fails by chance with p < 1e-5.
    light = link_record_hub(device_client, "dhub-hw1", allocation_weight=1)
    heavy = link_record_hub(device_client, "dhub-hw3", allocation_weight=3)
    try:
        group_id = unique_id("https-hashed")
        group_primary = random_key(64)
        device_client.enrollment_group.create_or_update(
            group_id,
            symmetric_key_group(
                group_id, hubs=[light, heavy], primary=group_primary, secondary=random_key(64), allocation="hashed"
            ),
        )
        reg_ids = [unique_id("https-hashed-dev") for _ in range(60)]

        with ThreadPoolExecutor(max_workers=10) as pool:
            finals = list(pool.map(lambda r: register_and_wait(device_server, r, derive_device_key(group_primary, r)), reg_ids))

        hubs = [final["registrationState"]["assignedHub"] for final in finals]
        assert all(final["status"] == "assigned" for final in finals), finals
        assert set(hubs) <= {light, heavy}, set(hubs)
        assert hubs.count(light) >= 1, (hubs.count(light), hubs.count(heavy))
        assert hubs.count(heavy) > 30, (hubs.count(light), hubs.count(heavy))
    finally:
        raw(device_client, "DELETE", f"/linkedHubs/{light}")
        raw(device_client, "DELETE", f"/linkedHubs/{heavy}")


def test_geo_latency_allocation_assigns_one_of_the_enrollment_hubs(device_server, device_client):
    west = link_record_hub(device_client, "dhub-geo-w")
    east = link_record_hub(device_client, "dhub-geo-e")
    try:
        reg_id = unique_id("https-geo")
        primary = random_key(32)
        device_client.enrollment.create_or_update(
            reg_id, symmetric_key_enrollment(reg_id, hubs=[west, east], primary=primary, allocation="geoLatency")
        )

        final = register_and_wait(device_server, reg_id, primary)

        assert final["status"] == "assigned", final
        hub = final["registrationState"]["assignedHub"]
        assert hub in (west, east), final
        assert_hub_device(device_client, hub, reg_id, primary=primary)
    finally:
        raw(device_client, "DELETE", f"/linkedHubs/{west}")
        raw(device_client, "DELETE", f"/linkedHubs/{east}")


@pytest.mark.parametrize(
    "migrate, substatus", [pytest.param(True, "deviceDataMigrated", id="migrate"), pytest.param(False, "deviceDataReset", id="reset")]
)
def test_reregistration_after_the_enrollment_moves_hubs_moves_the_device(device_server, device_client, migrate, substatus):
    old_hub = link_record_hub(device_client, "dhub-old")
    new_hub = link_record_hub(device_client, "dhub-new")
    try:
        reg_id = unique_id("https-move")
        primary = random_key(32)
        first_twin = {"tags": {"generation": 1}, "properties": {"desired": {"interval": 10}}}
        body = symmetric_key_enrollment(reg_id, hubs=[old_hub], primary=primary, initial_twin=first_twin)
        body["reprovisionPolicy"] = {"updateHubAssignment": True, "migrateDeviceData": migrate}
        enrollment = device_client.enrollment.create_or_update(reg_id, body)
        assert register_and_wait(device_server, reg_id, primary)["registrationState"]["assignedHub"] == old_hub
        second_twin = {"tags": {"generation": 2}, "properties": {"desired": {}}}
        enrollment["iotHubs"] = [new_hub]
        enrollment["initialTwin"] = second_twin
        device_client.enrollment.create_or_update(reg_id, enrollment, if_match=enrollment["etag"])

        final = register_and_wait(device_server, reg_id, primary)

        assert final["status"] == "assigned", final
        assert final["registrationState"]["assignedHub"] == new_hub, final
        assert final["registrationState"]["substatus"] == substatus, final
        assert_no_hub_device(device_client, old_hub, reg_id)
        # Migration carries the old hub's twin; a reset applies the enrollment's current initialTwin.
        assert_hub_device(device_client, new_hub, reg_id, primary=primary, twin=first_twin if migrate else second_twin)
    finally:
        raw(device_client, "DELETE", f"/linkedHubs/{old_hub}")
        raw(device_client, "DELETE", f"/linkedHubs/{new_hub}")


def test_enrollment_whose_hub_was_unlinked_ends_in_status_failed_with_error_code(device_server, device_client):
    hub = link_record_hub(device_client, "dhub-gone")
    reg_id = unique_id("https-nohub")
    primary = random_key(32)
    device_client.enrollment.create_or_update(reg_id, symmetric_key_enrollment(reg_id, hubs=[hub], primary=primary))
    raw(device_client, "DELETE", f"/linkedHubs/{hub}")

    final = register_and_wait(device_server, reg_id, primary)

    # The SDKs require registrationState.errorCode (int) and errorMessage on "failed" (§3.5).
    assert final["status"] == "failed", final
    state = final["registrationState"]
    assert state["registrationId"] == reg_id, state
    assert state["status"] == "failed", state
    assert isinstance(state["errorCode"], int) and state["errorCode"] // 1000 == 400, state
    assert isinstance(state["errorMessage"], str) and state["errorMessage"], state
    parse_utc(state["lastUpdatedDateTimeUtc"])


# --------------------------------------------------------------------------------------------
# Disabled enrollments end in status "disabled" (200), not 401
# --------------------------------------------------------------------------------------------


def _assert_disabled(final: dict, reg_id: str) -> None:
    assert final["status"] == "disabled", final
    assert final["registrationState"]["registrationId"] == reg_id, final
    assert final["registrationState"]["status"] == "disabled", final


def test_disabled_individual_enrollment_ends_in_status_disabled(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub, status="disabled")

    final = register_and_wait(device_server, reg_id, primary)

    _assert_disabled(final, reg_id)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_disabled_individual_enrollment_blocks_a_device_of_an_enabled_group(device_server, device_client, device_hub):
    group_id = unique_id("https-blk")
    group_primary = random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id, symmetric_key_group(group_id, hubs=[device_hub], primary=group_primary, secondary=random_key(64))
    )
    reg_id = unique_id("https-blk-dev")
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], status="disabled")
    )

    final = register_and_wait(device_server, reg_id, derive_device_key(group_primary, reg_id))

    _assert_disabled(final, reg_id)
    assert_no_hub_device(device_client, device_hub, reg_id)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_tampered_signature_returns_401002(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)
    sig = re.search(r"sig=([^&]+)", token).group(1)
    tampered = token.replace(sig, ("B" if sig[0] != "B" else "C") + sig[1:])

    assert_device_error(register(device_server, reg_id, tampered), 401, 401002)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_wrong_key_returns_401002(device_server, device_client, device_hub):
    reg_id, _, _ = _enroll(device_client, device_hub)

    r = register(device_server, reg_id, device_sas_token(device_server.id_scope, reg_id, random_key(32)))

    assert_device_error(r, 401, 401002)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_expired_token_returns_401002(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    expired = device_sas_token(device_server.id_scope, reg_id, primary, expiry=int(time.time()) - 3600)

    assert_device_error(register(device_server, reg_id, expired), 401, 401002)


def test_token_for_another_registration_id_returns_401002(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    other = device_sas_token(device_server.id_scope, reg_id, primary, resource=f"{device_server.id_scope}/registrations/{reg_id}-x")

    assert_device_error(register(device_server, reg_id, other), 401, 401002)


def test_unknown_device_returns_401002(device_server):
    reg_id = unique_id("https-nobody")
    token = device_sas_token(device_server.id_scope, reg_id, random_key(32))

    assert_device_error(register(device_server, reg_id, token), 401, 401002)


def test_missing_authorization_header_returns_401(device_server, device_client, device_hub):
    reg_id, _, _ = _enroll(device_client, device_hub)

    assert_device_error(register(device_server, reg_id, None), 401)


def test_wrong_id_scope_returns_404(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    scope = device_server.id_scope
    wrong_scope = scope[:3] + format((int(scope[3:], 16) + 1) % 2**32, "08x").upper()
    assert wrong_scope.lower() != scope.lower()
    token = device_sas_token(wrong_scope, reg_id, primary)

    assert_device_error(register(device_server, reg_id, token, scope=wrong_scope), 404)


def test_malformed_json_returns_400(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    assert_device_error(register(device_server, reg_id, token, data=b'{"registrationId": "'), 400)
    assert_no_hub_device(device_client, device_hub, reg_id)


# The client must get the 400 even while it is still sending: the server has to read (or drain)
# the rest of an oversized body before closing, or the client sees a TLS EOF / reset instead.
@pytest.mark.parametrize("size", [pytest.param(97 * 1024, id="97KB"), pytest.param(1024 * 1024, id="1MB")])
def test_body_over_96_kb_returns_400(device_server, device_client, device_hub, size):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)
    too_big = {"registrationId": reg_id, "payload": {"blob": "x" * size}}

    assert_device_error(register(device_server, reg_id, token, body=too_big), 400)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_body_of_90_kb_is_accepted(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = register(device_server, reg_id, token, body={"registrationId": reg_id, "payload": {"blob": "x" * (90 * 1024)}})

    assert_accepted(r, reg_id)


def test_body_registration_id_differing_from_url_returns_400(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = register(device_server, reg_id, token, body={"registrationId": f"{reg_id}-other"})

    assert_device_error(r, 400)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_polling_an_unknown_operation_returns_404(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)

    r = poll(device_server, reg_id, "4.0123456789abcdef.00000000-0000-0000-0000-000000000000", token)

    assert_device_error(r, 404)


def test_polling_another_devices_operation_returns_404(device_server, device_client, device_hub):
    owner, owner_key, _ = _enroll(device_client, device_hub)
    other, other_key, _ = _enroll(device_client, device_hub)
    owner_token = device_sas_token(device_server.id_scope, owner, owner_key)
    operation_id = assert_accepted(register(device_server, owner, owner_token), owner)

    r = poll(device_server, other, operation_id, device_sas_token(device_server.id_scope, other, other_key))

    assert_device_error(r, 404)
    # The owner still gets it.
    assert poll_until_done(device_server, owner, operation_id, owner_token)["status"] == "assigned"


def test_sixth_poll_within_10_seconds_returns_429_with_retry_after(device_server, device_client, device_hub):
    reg_id, primary, _ = _enroll(device_client, device_hub)
    token = device_sas_token(device_server.id_scope, reg_id, primary)
    operation_id = assert_accepted(register(device_server, reg_id, token), reg_id)

    with requests.Session() as session:  # one kept-alive connection: the six polls take milliseconds
        statuses = [poll(device_server, reg_id, operation_id, token, session=session).status_code for _ in range(5)]
        sixth = poll(device_server, reg_id, operation_id, token, session=session)

    assert all(status in (200, 202) for status in statuses), statuses
    assert_device_error(sixth, 429)
    names = wire_header_names(sixth)
    assert [name for name in names if name.lower() == "retry-after"] == ["retry-after"], names
    assert re.fullmatch(r"[1-9][0-9]*", sixth.headers["retry-after"]), sixth.headers["retry-after"]
