"""Device registration with the official Python device SDK (azure-iot-device 2.x), over MQTT on 8883
and MQTT over WebSocket on 443, against `device_server`.

What the SDK does with each outcome (azure-iot-device 2.14.0, read from its source and checked here):
  - "assigned": register() returns a RegistrationResult.
  - "disabled": the SDK knows only assigning/assigned/failed, so register() raises
    `ClientError("Unexpected failure")` whose __cause__ is a `ServiceError("Query Status Operation
    encountered an invalid registration status disabled with a status code of 200")`.
  - 401 on the response topic: `ClientError` caused by `ServiceError("register request returned a
    service error status code 401")`. A CONNACK refusal (return code 5) would instead raise
    `CredentialError` (a ClientError subclass).
"""

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.iot.device.exceptions import ClientError, CredentialError, ServiceError

from helpers import (
    assert_hub_device,
    assert_no_hub_device,
    derive_device_key,
    hub_device,
    link_record_hub,
    parse_utc,
    random_key,
    raw,
    sdk_disabled_error_message,
    sdk_register,
    sdk_register_many,
    symmetric_key_enrollment,
    symmetric_key_group,
    unique_id,
)

# The SDK builds its TLS context with the deprecated ssl.PROTOCOL_TLSv1_2 (DPS pins TLS 1.2).
pytestmark = pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")

TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]


def _assert_assigned(result, *, hub: str, device_id: str) -> None:
    assert result is not None
    assert result.status == "assigned", str(result)
    state = result.registration_state
    assert state is not None, str(result)
    assert state.assigned_hub == hub, str(result)
    assert state.device_id == device_id, str(result)
    assert state.sub_status == "initialAssignment", str(result)
    created = parse_utc(state.created_date_time)
    updated = parse_utc(state.last_update_date_time)
    assert updated >= created, str(result)
    assert isinstance(state.etag, str) and state.etag, str(result)
    assert isinstance(result.operation_id, str) and result.operation_id, str(result)


def _assert_refused_as_disabled(exc_info) -> None:
    err = exc_info.value
    assert type(err) is ClientError, repr(err)
    assert isinstance(err.__cause__, ServiceError), repr(err.__cause__)
    assert str(err.__cause__) == sdk_disabled_error_message()


# --------------------------------------------------------------------------------------------
# (1) individual symmetric-key enrollments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_individual_enrollment_registers_and_hub_device_gets_the_enrollment_keys(
    device_server, device_client, device_hub, websockets
):
    reg_id = unique_id("sdk-ind")
    primary, secondary = random_key(32), random_key(32)
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary, secondary=secondary)
    )

    result = sdk_register(device_server, reg_id, primary, websockets=websockets)

    _assert_assigned(result, hub=device_hub, device_id=reg_id)
    assert_hub_device(device_client, device_hub, reg_id, primary=primary, secondary=secondary)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_individual_enrollment_device_id_and_initial_twin_shape_the_hub_device(
    device_server, device_client, device_hub, websockets
):
    reg_id = unique_id("sdk-devid")
    device_id = f"custom-{reg_id}"
    primary, secondary = random_key(64), random_key(64)
    twin = {
        "tags": {"site": "berth-lab", "floor": 3},
        "properties": {"desired": {"telemetryInterval": 30, "mode": {"eco": True}}},
    }
    device_client.enrollment.create_or_update(
        reg_id,
        symmetric_key_enrollment(
            reg_id,
            hubs=[device_hub],
            primary=primary,
            secondary=secondary,
            device_id=device_id,
            initial_twin=twin,
            iot_edge=True,
        ),
    )

    result = sdk_register(device_server, reg_id, primary, websockets=websockets)

    _assert_assigned(result, hub=device_hub, device_id=device_id)
    assert_hub_device(device_client, device_hub, device_id, primary=primary, secondary=secondary, twin=twin, iot_edge=True)
    assert_no_hub_device(device_client, device_hub, reg_id)


# --------------------------------------------------------------------------------------------
# (2) enrollment groups: derived device keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_group_device_registers_with_derived_key_and_hub_device_gets_derived_keys(
    device_server, device_client, device_hub, websockets
):
    group_id = unique_id("sdk-grp")
    group_primary, group_secondary = random_key(64), random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id, symmetric_key_group(group_id, hubs=[device_hub], primary=group_primary, secondary=group_secondary)
    )
    reg_id = unique_id("sdk-grpdev")
    device_key = derive_device_key(group_primary, reg_id)

    result = sdk_register(device_server, reg_id, device_key, websockets=websockets)

    _assert_assigned(result, hub=device_hub, device_id=reg_id)
    assert_hub_device(
        device_client,
        device_hub,
        reg_id,
        primary=device_key,
        secondary=derive_device_key(group_secondary, reg_id),
    )


# --------------------------------------------------------------------------------------------
# (3) disabled enrollments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_disabled_individual_enrollment_ends_in_status_disabled(device_server, device_client, device_hub, websockets):
    reg_id = unique_id("sdk-off")
    primary = random_key(32)
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary, status="disabled")
    )

    with pytest.raises(ClientError) as exc_info:
        sdk_register(device_server, reg_id, primary, websockets=websockets)

    _assert_refused_as_disabled(exc_info)
    assert_no_hub_device(device_client, device_hub, reg_id)


def test_device_of_disabled_group_ends_in_status_disabled(device_server, device_client, device_hub):
    group_id = unique_id("sdk-grpoff")
    group_primary = random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id,
        symmetric_key_group(
            group_id, hubs=[device_hub], primary=group_primary, secondary=random_key(64), status="disabled"
        ),
    )
    reg_id = unique_id("sdk-grpoffdev")

    with pytest.raises(ClientError) as exc_info:
        sdk_register(device_server, reg_id, derive_device_key(group_primary, reg_id), websockets=False)

    _assert_refused_as_disabled(exc_info)
    assert_no_hub_device(device_client, device_hub, reg_id)


# --------------------------------------------------------------------------------------------
# (4) wrong key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_wrong_key_is_refused_with_401_and_nothing_reaches_the_hub(
    device_server, device_client, device_hub, websockets
):
    reg_id = unique_id("sdk-badkey")
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=random_key(32), secondary=random_key(32))
    )

    with pytest.raises(ClientError) as exc_info:
        sdk_register(device_server, reg_id, random_key(32), websockets=websockets)

    err = exc_info.value
    if isinstance(err, CredentialError):
        # The server refused the CONNECT (CONNACK return code 5).
        pass
    else:
        # The server accepted the CONNECT and answered the register request on res/401.
        assert type(err) is ClientError, repr(err)
        assert isinstance(err.__cause__, ServiceError), repr(err.__cause__)
        assert str(err.__cause__) == "register request returned a service error status code 401"
    assert_no_hub_device(device_client, device_hub, reg_id)
    with pytest.raises(ResourceNotFoundError):
        device_client.device_registration_state.get(reg_id)


# --------------------------------------------------------------------------------------------
# (5) a disabled individual enrollment blocks one device of an enabled group
# --------------------------------------------------------------------------------------------


def test_disabled_individual_enrollment_blocks_one_device_of_an_enabled_group(
    device_server, device_client, device_hub
):
    group_id = unique_id("sdk-blk")
    group_primary = random_key(64)
    device_client.enrollment_group.create_or_update(
        group_id, symmetric_key_group(group_id, hubs=[device_hub], primary=group_primary, secondary=random_key(64))
    )
    blocked, allowed = unique_id("sdk-blk-off"), unique_id("sdk-blk-on")
    # The block-list entry: an individual enrollment with its own (generated) keys, disabled.
    device_client.enrollment.create_or_update(
        blocked, symmetric_key_enrollment(blocked, hubs=[device_hub], status="disabled")
    )

    with pytest.raises(ClientError) as exc_info:
        sdk_register(device_server, blocked, derive_device_key(group_primary, blocked), websockets=False)
    allowed_result = sdk_register(device_server, allowed, derive_device_key(group_primary, allowed), websockets=False)

    _assert_refused_as_disabled(exc_info)
    assert_no_hub_device(device_client, device_hub, blocked)
    _assert_assigned(allowed_result, hub=device_hub, device_id=allowed)
    assert_hub_device(device_client, device_hub, allowed, primary=derive_device_key(group_primary, allowed))


# --------------------------------------------------------------------------------------------
# (6) allocation policies
# --------------------------------------------------------------------------------------------


def test_static_allocation_sends_every_device_to_the_named_hub(device_server, device_client):
    named = link_record_hub(device_client, "dhub-static")
    other = link_record_hub(device_client, "dhub-decoy", allocation_weight=100)
    try:
        group_id = unique_id("sdk-static")
        group_primary = random_key(64)
        device_client.enrollment_group.create_or_update(
            group_id, symmetric_key_group(group_id, hubs=[named], primary=group_primary, secondary=random_key(64))
        )
        devices = [(reg_id, derive_device_key(group_primary, reg_id)) for reg_id in
                   (unique_id("sdk-static-dev") for _ in range(3))]

        results = sdk_register_many(device_server, devices, websockets=False)

        for reg_id, key in devices:
            _assert_assigned(results[reg_id], hub=named, device_id=reg_id)
            assert_hub_device(device_client, named, reg_id, primary=key)
            assert_no_hub_device(device_client, other, reg_id)
    finally:
        raw(device_client, "DELETE", f"/linkedHubs/{named}")
        raw(device_client, "DELETE", f"/linkedHubs/{other}")


def test_hashed_allocation_over_weighted_hubs_uses_only_those_hubs_and_is_stable(device_server, device_client):
    light = link_record_hub(device_client, "dhub-w1", allocation_weight=1)
    heavy = link_record_hub(device_client, "dhub-w3", allocation_weight=3)
    try:
        group_id = unique_id("sdk-hashed")
        group_primary = random_key(64)
        device_client.enrollment_group.create_or_update(
            group_id,
            symmetric_key_group(
                group_id, hubs=[light, heavy], primary=group_primary, secondary=random_key(64), allocation="hashed"
            ),
        )
        devices = [(reg_id, derive_device_key(group_primary, reg_id)) for reg_id in
                   (unique_id("sdk-hashed-dev") for _ in range(6))]

        first = sdk_register_many(device_server, devices, websockets=False)

        assigned = {}
        for reg_id, key in devices:
            result = first[reg_id]
            assert result.status == "assigned", str(result)
            hub = result.registration_state.assigned_hub
            assert hub in (light, heavy), str(result)
            assert result.registration_state.device_id == reg_id, str(result)
            assert_hub_device(device_client, hub, reg_id, primary=key)
            assert hub_device(device_client, heavy if hub == light else light, reg_id) is None
            assigned[reg_id] = hub

        again = sdk_register_many(device_server, devices, websockets=False)

        for reg_id, _ in devices:
            assert again[reg_id].status == "assigned", str(again[reg_id])
            assert again[reg_id].registration_state.assigned_hub == assigned[reg_id], (
                f"{reg_id}: first {assigned[reg_id]}, then {again[reg_id].registration_state.assigned_hub}"
            )
            assert again[reg_id].registration_state.device_id == reg_id
    finally:
        raw(device_client, "DELETE", f"/linkedHubs/{light}")
        raw(device_client, "DELETE", f"/linkedHubs/{heavy}")


# --------------------------------------------------------------------------------------------
# (7) provisioning payload
# --------------------------------------------------------------------------------------------


OBJECT_PAYLOAD = {"modelId": "dtmi:berth:thermostat;1", "firmware": {"version": "1.2.3"}, "tags": ["a", "b"]}


# The SDK documents provisioning_payload as "an object or dictionary or a string or an integer"
# and sends it as the JSON value of "payload"; DPS passes any JSON value through (§3.3).
@pytest.mark.parametrize(
    "websockets, payload",
    [
        pytest.param(False, OBJECT_PAYLOAD, id="mqtt-object"),
        pytest.param(True, OBJECT_PAYLOAD, id="mqtt-ws-object"),
        pytest.param(False, "firmware=1.2.3", id="mqtt-string"),
        pytest.param(True, 42, id="mqtt-ws-integer"),
    ],
)
def test_provisioning_payload_is_accepted(device_server, device_client, device_hub, websockets, payload):
    reg_id = unique_id("sdk-payload")
    primary = random_key(32)
    device_client.enrollment.create_or_update(
        reg_id, symmetric_key_enrollment(reg_id, hubs=[device_hub], primary=primary)
    )

    result = sdk_register(device_server, reg_id, primary, websockets=websockets, payload=payload)

    _assert_assigned(result, hub=device_hub, device_id=reg_id)
    assert_hub_device(device_client, device_hub, reg_id, primary=primary)
