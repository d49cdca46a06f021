"""Individual enrollments with TPM attestation."""

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import (
    DEFAULT_CAPABILITIES,
    DEFAULT_REPROVISION_POLICY,
    assert_dps_error,
    parse_utc,
    tpm_endorsement_key,
    unique_id,
)


def _tpm_enrollment(reg_id, ek):
    return {"registrationId": reg_id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}


def test_tpm_enrollment_create_get_and_attestation_mechanism(client):
    reg_id = unique_id("tpm")
    ek = tpm_endorsement_key()

    created = client.enrollment.create_or_update(reg_id, _tpm_enrollment(reg_id, ek))
    assert created["registrationId"] == reg_id
    assert created["attestation"]["type"] == "tpm"
    assert created["etag"]
    parse_utc(created["createdDateTimeUtc"])
    parse_utc(created["lastUpdatedDateTimeUtc"])
    assert created["provisioningStatus"] == "enabled"
    assert created["reprovisionPolicy"] == DEFAULT_REPROVISION_POLICY
    assert created["capabilities"] == DEFAULT_CAPABILITIES

    got = client.enrollment.get(reg_id)
    assert got["attestation"]["type"] == "tpm"
    assert got["etag"] == created["etag"]

    mech = client.enrollment.get_attestation_mechanism(reg_id)
    assert mech["type"] == "tpm"
    assert mech["tpm"]["endorsementKey"] == ek


def test_tpm_enrollment_update_with_etags_and_delete(client):
    reg_id = unique_id("tpm-crud")
    ek = tpm_endorsement_key()
    created = client.enrollment.create_or_update(reg_id, _tpm_enrollment(reg_id, ek))

    updated = client.enrollment.create_or_update(
        reg_id, {**_tpm_enrollment(reg_id, ek), "provisioningStatus": "disabled"}, if_match=created["etag"]
    )
    assert updated["provisioningStatus"] == "disabled"
    assert updated["etag"] != created["etag"]

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _tpm_enrollment(reg_id, ek), if_match=created["etag"])
    assert_dps_error(exc_info.value, 412)

    client.enrollment.delete(reg_id)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)


def test_tpm_endorsement_key_that_is_not_base64_is_rejected_with_400(client):
    reg_id = unique_id("tpm-bad")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _tpm_enrollment(reg_id, "not base64 at all!!"))
    assert_dps_error(exc_info.value, 400)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)
