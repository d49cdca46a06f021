"""Enrollment groups: symmetric key and X.509 signing certificates / CA references; CRUD and ETags."""

import base64

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import (
    DEFAULT_CAPABILITIES,
    DEFAULT_REPROVISION_POLICY,
    assert_cert_info,
    assert_dps_error,
    make_cert,
    parse_utc,
    random_key,
    raw,
    unique_id,
)


def _sym_group(group_id, **keys):
    return {"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey", "symmetricKey": dict(keys)}}


def _x509_group(group_id, primary, secondary=None):
    certs = {"primary": {"certificate": primary}}
    if secondary is not None:
        certs["secondary"] = {"certificate": secondary}
    return {"enrollmentGroupId": group_id, "attestation": {"type": "x509", "x509": {"signingCertificates": certs}}}


def test_symmetric_key_group_create_returns_defaults_and_generates_keys(client):
    group_id = unique_id("grp-sym")
    created = client.enrollment_group.create_or_update(group_id, _sym_group(group_id))

    assert created["enrollmentGroupId"] == group_id
    assert created["attestation"]["type"] == "symmetricKey"
    assert created["etag"]
    assert parse_utc(created["lastUpdatedDateTimeUtc"]) >= parse_utc(created["createdDateTimeUtc"])
    assert created["provisioningStatus"] == "enabled"
    assert created["reprovisionPolicy"] == DEFAULT_REPROVISION_POLICY
    assert created["capabilities"] == DEFAULT_CAPABILITIES

    mech = client.enrollment_group.get_attestation_mechanism(group_id)
    assert mech["type"] == "symmetricKey"
    assert len(base64.b64decode(mech["symmetricKey"]["primaryKey"], validate=True)) == 64
    assert len(base64.b64decode(mech["symmetricKey"]["secondaryKey"], validate=True)) == 64
    assert mech["symmetricKey"]["primaryKey"] != mech["symmetricKey"]["secondaryKey"]


def test_symmetric_key_group_keeps_supplied_keys_and_get_hides_them(client):
    group_id = unique_id("grp-symkeys")
    primary, secondary = random_key(64), random_key(32)
    client.enrollment_group.create_or_update(group_id, _sym_group(group_id, primaryKey=primary, secondaryKey=secondary))

    mech = client.enrollment_group.get_attestation_mechanism(group_id)
    assert mech["symmetricKey"]["primaryKey"] == primary
    assert mech["symmetricKey"]["secondaryKey"] == secondary

    got = client.enrollment_group.get(group_id)
    assert got["attestation"]["type"] == "symmetricKey"
    assert primary not in str(got) and secondary not in str(got)


def test_group_update_with_matching_etag_then_stale_etag_returns_412(client):
    group_id = unique_id("grp-etag")
    created = client.enrollment_group.create_or_update(group_id, {**_sym_group(group_id), "provisioningStatus": "disabled"})
    assert created["provisioningStatus"] == "disabled"

    # The Node sample's round trip: send the returned record back with a change.
    got = client.enrollment_group.get(group_id)
    got["provisioningStatus"] = "enabled"
    updated = client.enrollment_group.create_or_update(group_id, got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "enabled"
    assert updated["etag"] != created["etag"]
    assert updated["createdDateTimeUtc"] == created["createdDateTimeUtc"]

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment_group.create_or_update(
            group_id, {**_sym_group(group_id), "provisioningStatus": "disabled"}, if_match=created["etag"]
        )
    assert_dps_error(exc_info.value, 412)
    assert client.enrollment_group.get(group_id)["provisioningStatus"] == "enabled"

    unconditional = client.enrollment_group.create_or_update(
        group_id, {**_sym_group(group_id), "provisioningStatus": "disabled"}
    )
    assert unconditional["provisioningStatus"] == "disabled"


def test_group_delete_returns_204_then_404(client):
    group_id = unique_id("grp-del")
    created = client.enrollment_group.create_or_update(group_id, _sym_group(group_id))
    client.enrollment_group.create_or_update(group_id, {**_sym_group(group_id), "provisioningStatus": "disabled"})

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment_group.delete(group_id, if_match=created["etag"])
    assert_dps_error(exc_info.value, 412)

    client.enrollment_group.delete(group_id)
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment_group.get(group_id)
    assert_dps_error(exc_info.value, 404)
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.enrollment_group.delete(group_id)
    assert_dps_error(exc_info.value, 404)


def test_x509_group_signing_certificates_yield_complete_info(client):
    group_id = unique_id("grp-x509")
    root = make_cert("berth-conformance-root", ca=True)
    intermediate = make_cert("berth-conformance-intermediate", issuer=root, ca=True)

    created = client.enrollment_group.create_or_update(group_id, _x509_group(group_id, root.pem, intermediate.b64_der))

    signing = created["attestation"]["x509"]["signingCertificates"]
    assert_cert_info(signing["primary"]["info"], root)
    assert_cert_info(signing["secondary"]["info"], intermediate)
    assert signing["secondary"]["info"]["issuerName"] == "CN=berth-conformance-root"

    got = client.enrollment_group.get(group_id)
    signing = got["attestation"]["x509"]["signingCertificates"]
    assert_cert_info(signing["primary"]["info"], root)
    assert_cert_info(signing["secondary"]["info"], intermediate)
    assert not signing["primary"].get("certificate")

    mech = client.enrollment_group.get_attestation_mechanism(group_id)
    assert mech["type"] == "x509"
    assert mech["x509"]["signingCertificates"]["primary"]


def test_x509_group_ca_references_round_trip(client):
    group_id = unique_id("grp-caref")
    body = {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "group-ca-1"}}},
    }
    created = client.enrollment_group.create_or_update(group_id, body)
    got = client.enrollment_group.get(group_id)
    for record in (created, got):
        assert record["attestation"]["x509"]["caReferences"]["primary"] == "group-ca-1"


def test_group_routes_are_case_insensitive(client):
    # Node calls POST /enrollmentgroups/{id}/attestationmechanism in lower case (wire-protocol.md §8.2).
    group_id = unique_id("grp-lower")
    primary = random_key(32)
    client.enrollment_group.create_or_update(group_id, _sym_group(group_id, primaryKey=primary, secondaryKey=random_key(32)))

    r = raw(client, "POST", f"/enrollmentgroups/{group_id}/attestationmechanism")
    assert r.status_code == 200, r.text()
    assert r.json()["symmetricKey"]["primaryKey"] == primary
