"""Every error carries the DPS error body: errorCode (status * 1000 + n), trackingId, message, timestampUtc."""

import re

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

from helpers import assert_dps_error, b64, unique_id


def _with_key(connection_string, key):
    return re.sub(r"SharedAccessKey=[^;]*", f"SharedAccessKey={key}", connection_string)


def test_400_has_dps_error_body(client):
    reg_id = unique_id("err-400")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            reg_id,
            {
                "registrationId": reg_id,
                "attestation": {"type": "symmetricKey"},
                "allocationPolicy": "static",
                "iotHubs": ["nothere.azure-devices.net"],
            },
        )
    assert_dps_error(exc_info.value, 400)


def test_body_registration_id_differing_from_path_returns_400(client):
    reg_id = unique_id("err-mismatch")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            reg_id, {"registrationId": reg_id + "-other", "attestation": {"type": "symmetricKey"}}
        )
    assert_dps_error(exc_info.value, 400)


def test_401_for_a_wrong_key_has_dps_error_body(berth):
    wrong = berth.make_client(_with_key(berth.connection_string, b64(b"\x01" * 32)))
    try:
        with pytest.raises(ClientAuthenticationError) as exc_info:
            wrong.enrollment.get(unique_id("err-401"))
        assert_dps_error(exc_info.value, 401)
    finally:
        wrong.close()


def test_401_without_authorization_header(berth):
    r = requests.get(
        f"{berth.base_url}/enrollments/{unique_id('err-noauth')}",
        params={"api-version": "2021-10-01"},
        verify=str(berth.ca_path),
        timeout=10,
    )
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["errorCode"] // 1000 == 401
    assert body["trackingId"] and body["message"] and body["timestampUtc"]


def test_404_has_dps_error_body(client):
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment.get(unique_id("err-404"))
    assert_dps_error(exc_info.value, 404)
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment_group.get(unique_id("err-404"))
    assert_dps_error(exc_info.value, 404)


def test_412_has_dps_error_body(client):
    reg_id = unique_id("err-412")
    created = client.enrollment.create_or_update(reg_id, {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}})
    client.enrollment.create_or_update(reg_id, {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}})
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            reg_id, {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}}, if_match=created["etag"]
        )
    assert_dps_error(exc_info.value, 412)


def test_tracking_ids_differ_between_errors(client):
    ids = set()
    for _ in range(2):
        with pytest.raises(ResourceNotFoundError) as exc_info:
            client.enrollment.get(unique_id("err-track"))
        ids.add(assert_dps_error(exc_info.value, 404)["trackingId"])
    assert len(ids) == 2
