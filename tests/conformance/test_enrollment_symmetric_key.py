"""Individual enrollments with symmetric-key attestation: CRUD, defaults, keys, ETags."""

import base64

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import (
    DEFAULT_CAPABILITIES,
    DEFAULT_REPROVISION_POLICY,
    assert_dps_error,
    parse_utc,
    random_key,
    unique_id,
)


def _sym_enrollment(reg_id, **attestation_keys):
    return {
        "registrationId": reg_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": dict(attestation_keys)},
    }


def test_create_returns_200_with_etag_timestamps_and_defaults(client):
    reg_id = unique_id("sym-create")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))

    assert created["registrationId"] == reg_id
    assert created["attestation"]["type"] == "symmetricKey"
    assert isinstance(created.get("etag"), str) and created["etag"]
    created_at = parse_utc(created["createdDateTimeUtc"])
    updated_at = parse_utc(created["lastUpdatedDateTimeUtc"])
    assert updated_at >= created_at
    assert created["provisioningStatus"] == "enabled"
    assert created["reprovisionPolicy"] == DEFAULT_REPROVISION_POLICY
    assert created["capabilities"] == DEFAULT_CAPABILITIES


def test_get_returns_the_stored_enrollment(client):
    reg_id = unique_id("sym-get")
    created = client.enrollment.create_or_update(
        reg_id,
        {
            **_sym_enrollment(reg_id),
            "deviceId": "device-for-" + reg_id,
            "provisioningStatus": "disabled",
            "capabilities": {"iotEdge": True},
            "reprovisionPolicy": {"updateHubAssignment": False, "migrateDeviceData": False},
            "initialTwin": {"tags": {"room": "42"}, "properties": {"desired": {"interval": 30}}},
            "optionalDeviceInformation": {"model": "x1"},
        },
    )
    got = client.enrollment.get(reg_id)

    assert got["registrationId"] == reg_id
    assert got["deviceId"] == "device-for-" + reg_id
    assert got["provisioningStatus"] == "disabled"
    assert got["capabilities"] == {"iotEdge": True}
    assert got["reprovisionPolicy"] == {"updateHubAssignment": False, "migrateDeviceData": False}
    assert got["initialTwin"]["tags"] == {"room": "42"}
    assert got["initialTwin"]["properties"]["desired"] == {"interval": 30}
    assert got["optionalDeviceInformation"] == {"model": "x1"}
    assert got["etag"] == created["etag"]
    assert got["createdDateTimeUtc"] == created["createdDateTimeUtc"]


def test_keys_are_generated_as_64_random_bytes_when_absent(client):
    reg_a, reg_b = unique_id("sym-gen"), unique_id("sym-gen")
    client.enrollment.create_or_update(reg_a, _sym_enrollment(reg_a))
    client.enrollment.create_or_update(reg_b, _sym_enrollment(reg_b))

    keys_a = client.enrollment.get_attestation_mechanism(reg_a)
    keys_b = client.enrollment.get_attestation_mechanism(reg_b)
    assert keys_a["type"] == "symmetricKey"
    primary = keys_a["symmetricKey"]["primaryKey"]
    secondary = keys_a["symmetricKey"]["secondaryKey"]
    assert len(base64.b64decode(primary, validate=True)) == 64
    assert len(base64.b64decode(secondary, validate=True)) == 64
    assert primary != secondary
    assert {primary, secondary}.isdisjoint(
        {keys_b["symmetricKey"]["primaryKey"], keys_b["symmetricKey"]["secondaryKey"]}
    )


def test_supplied_keys_are_kept(client):
    reg_id = unique_id("sym-supplied")
    primary, secondary = random_key(32), random_key(64)
    client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id, primaryKey=primary, secondaryKey=secondary))

    mech = client.enrollment.get_attestation_mechanism(reg_id)
    assert mech["type"] == "symmetricKey"
    assert mech["symmetricKey"]["primaryKey"] == primary
    assert mech["symmetricKey"]["secondaryKey"] == secondary


def test_get_and_query_do_not_return_symmetric_keys(client):
    reg_id = unique_id("sym-secret")
    primary, secondary = random_key(32), random_key(32)
    client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id, primaryKey=primary, secondaryKey=secondary))

    got = client.enrollment.get(reg_id)
    assert got["attestation"]["type"] == "symmetricKey"
    assert not (got["attestation"].get("symmetricKey") or {}).get("primaryKey")
    assert not (got["attestation"].get("symmetricKey") or {}).get("secondaryKey")
    assert primary not in str(got) and secondary not in str(got)

    listed = [e for e in client.enrollment.query({"query": "SELECT * FROM enrollments"}) if e["registrationId"] == reg_id]
    assert len(listed) == 1
    assert primary not in str(listed[0]) and secondary not in str(listed[0])


def test_update_with_matching_etag_returns_200_and_a_new_etag(client):
    reg_id = unique_id("sym-etag")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))

    body = {**_sym_enrollment(reg_id), "provisioningStatus": "disabled", "etag": created["etag"]}
    updated = client.enrollment.create_or_update(reg_id, body, if_match=created["etag"])

    assert updated["provisioningStatus"] == "disabled"
    assert updated["etag"] and updated["etag"] != created["etag"]
    assert updated["createdDateTimeUtc"] == created["createdDateTimeUtc"]
    assert parse_utc(updated["lastUpdatedDateTimeUtc"]) >= parse_utc(created["lastUpdatedDateTimeUtc"])
    assert client.enrollment.get(reg_id)["etag"] == updated["etag"]


def test_update_keeps_generated_keys_when_body_omits_them(client):
    reg_id = unique_id("sym-keepkeys")
    client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))
    before = client.enrollment.get_attestation_mechanism(reg_id)

    # Round-trip what GET returned (no keys in it), as the SDK samples do.
    got = client.enrollment.get(reg_id)
    got["provisioningStatus"] = "disabled"
    client.enrollment.create_or_update(reg_id, got, if_match=got["etag"])

    assert client.enrollment.get_attestation_mechanism(reg_id) == before


def test_update_with_stale_etag_returns_412_and_changes_nothing(client):
    reg_id = unique_id("sym-stale")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))
    current = client.enrollment.create_or_update(
        reg_id, {**_sym_enrollment(reg_id), "deviceId": "first"}, if_match=created["etag"]
    )

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            reg_id, {**_sym_enrollment(reg_id), "deviceId": "second"}, if_match=created["etag"]
        )
    assert_dps_error(exc_info.value, 412)

    after = client.enrollment.get(reg_id)
    assert after["deviceId"] == "first"
    assert after["etag"] == current["etag"]


def test_update_without_etag_replaces_unconditionally(client):
    reg_id = unique_id("sym-noetag")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))

    updated = client.enrollment.create_or_update(reg_id, {**_sym_enrollment(reg_id), "deviceId": "replaced"})
    assert updated["deviceId"] == "replaced"
    assert updated["etag"] != created["etag"]
    assert client.enrollment.get(reg_id)["deviceId"] == "replaced"


def test_if_match_accepts_unquoted_etag_and_wildcard(client):
    reg_id = unique_id("sym-ifmatch")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))

    unquoted = created["etag"].strip('"')
    second = client.enrollment.create_or_update(reg_id, {**_sym_enrollment(reg_id), "deviceId": "a"}, if_match=unquoted)
    assert second["deviceId"] == "a"

    third = client.enrollment.create_or_update(reg_id, {**_sym_enrollment(reg_id), "deviceId": "b"}, if_match="*")
    assert third["deviceId"] == "b"


def test_delete_returns_204_and_get_then_returns_404(client):
    reg_id = unique_id("sym-delete")
    client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))

    client.enrollment.delete(reg_id)  # the SDK raises unless the status is 204

    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment.get(reg_id)
    assert_dps_error(exc_info.value, 404)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get_attestation_mechanism(reg_id)


def test_delete_with_stale_etag_returns_412_and_keeps_the_enrollment(client):
    reg_id = unique_id("sym-delstale")
    created = client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))
    client.enrollment.create_or_update(reg_id, {**_sym_enrollment(reg_id), "deviceId": "x"})

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.delete(reg_id, if_match=created["etag"])
    assert_dps_error(exc_info.value, 412)
    assert client.enrollment.get(reg_id)["deviceId"] == "x"

    client.enrollment.delete(reg_id, if_match=client.enrollment.get(reg_id)["etag"])
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)


def test_delete_of_unknown_enrollment_returns_404(client):
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment.delete(unique_id("sym-nothere"))
    assert_dps_error(exc_info.value, 404)


def test_registration_id_is_case_insensitive(client):
    reg_id = unique_id("sym-case")
    client.enrollment.create_or_update(reg_id, _sym_enrollment(reg_id))
    got = client.enrollment.get(reg_id.upper())
    assert got["registrationId"].lower() == reg_id
