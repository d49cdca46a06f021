"""Bad enrollment input is rejected with 400 and a DPS error body, and nothing is written."""

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import assert_dps_error, b64, raw, unique_id


def _rejected(client, reg_id, body):
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, body)
    error = assert_dps_error(exc_info.value, 400)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)
    return error


def test_symmetric_key_that_is_not_base64_returns_400(client):
    reg_id = unique_id("val-b64")
    _rejected(
        client,
        reg_id,
        {"registrationId": reg_id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "%%%not-base64%%%"}}},
    )


@pytest.mark.parametrize("size", [8, 65])
def test_symmetric_key_outside_16_to_64_bytes_returns_400(client, size):
    reg_id = unique_id("val-keylen")
    _rejected(
        client,
        reg_id,
        {
            "registrationId": reg_id,
            "attestation": {
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": b64(b"k" * size), "secondaryKey": b64(b"s" * 32)},
            },
        },
    )


def test_enrollment_without_attestation_returns_400(client):
    reg_id = unique_id("val-noatt")
    _rejected(client, reg_id, {"registrationId": reg_id})


def test_unknown_attestation_type_returns_400(client):
    reg_id = unique_id("val-atttype")
    _rejected(client, reg_id, {"registrationId": reg_id, "attestation": {"type": "password"}})


def test_x509_attestation_without_certificates_or_ca_references_returns_400(client):
    reg_id = unique_id("val-x509empty")
    _rejected(client, reg_id, {"registrationId": reg_id, "attestation": {"type": "x509", "x509": {}}})


def test_tpm_attestation_without_endorsement_key_returns_400(client):
    reg_id = unique_id("val-tpmnoek")
    _rejected(client, reg_id, {"registrationId": reg_id, "attestation": {"type": "tpm", "tpm": {}}})


# The seed's rule (seed-inventory ENR-06, LIM-08): alphanumerics plus - . _ :, the last character
# alphanumeric or '-', at most 128 characters.
@pytest.mark.parametrize("bad_id", ["trailing-dot.", "trailing_", "trailing:", "has space", "bang!", "x" * 129])
def test_invalid_registration_id_returns_400(client, bad_id):
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            bad_id, {"registrationId": bad_id, "attestation": {"type": "symmetricKey"}}
        )
    assert_dps_error(exc_info.value, 400)


def test_custom_allocation_without_definition_returns_400004(client):
    reg_id = unique_id("val-custom")
    error = _rejected(
        client,
        reg_id,
        {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"},
    )
    assert error["errorCode"] == 400004


def test_malformed_json_body_returns_400(client):
    reg_id = unique_id("val-json")
    r = raw(
        client,
        "PUT",
        f"/enrollments/{reg_id}",
        content=b'{"registrationId": "' + reg_id.encode() + b'", "attestation": {',
        headers={"Content-Type": "application/json"},
    )
    assert_dps_error(r, 400)


def test_group_without_attestation_returns_400(client):
    group_id = unique_id("val-grp")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment_group.create_or_update(group_id, {"enrollmentGroupId": group_id})
    assert_dps_error(exc_info.value, 400)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment_group.get(group_id)


def test_tpm_enrollment_group_returns_400(client):
    # DPS enrollment groups support symmetric keys and X.509 only.
    group_id = unique_id("val-tpmgrp")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment_group.create_or_update(
            group_id, {"enrollmentGroupId": group_id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}
        )
    assert_dps_error(exc_info.value, 400)
