"""Individual enrollments with X.509 attestation: certificate info, input formats, CA references."""

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import assert_cert_info, assert_dps_error, b64, make_cert, parse_utc, unique_id


def _x509_enrollment(reg_id, primary, secondary=None):
    certs = {"primary": {"certificate": primary}}
    if secondary is not None:
        certs["secondary"] = {"certificate": secondary}
    return {"registrationId": reg_id, "attestation": {"type": "x509", "x509": {"clientCertificates": certs}}}


@pytest.fixture(scope="module")
def device_ca():
    return make_cert("berth-conformance-device-ca", ca=True)


def test_client_certificates_pem_input_yields_complete_info(client, device_ca):
    reg_id = unique_id("x509-pem")
    leaf = make_cert(reg_id, issuer=device_ca)
    self_signed = make_cert(reg_id)

    created = client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, leaf.pem, self_signed.pem))

    assert created["attestation"]["type"] == "x509"
    certs = created["attestation"]["x509"]["clientCertificates"]
    assert_cert_info(certs["primary"]["info"], leaf)
    assert_cert_info(certs["secondary"]["info"], self_signed)
    assert certs["primary"]["info"]["issuerName"] == "CN=berth-conformance-device-ca"
    assert certs["secondary"]["info"]["issuerName"] == f"CN={reg_id}"
    assert created["etag"]
    parse_utc(created["createdDateTimeUtc"])


def test_client_certificate_base64_der_input_yields_complete_info(client, device_ca):
    reg_id = unique_id("x509-der")
    leaf = make_cert(reg_id, issuer=device_ca)

    created = client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, leaf.b64_der))

    assert_cert_info(created["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)


def test_client_certificate_base64_of_pem_input_is_accepted(client):
    # The C service client base64-encodes the PEM text (wire-protocol.md §8.6).
    reg_id = unique_id("x509-b64pem")
    leaf = make_cert(reg_id)

    created = client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, b64(leaf.pem.encode("ascii"))))

    assert_cert_info(created["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)


def test_get_returns_certificate_info_but_not_the_certificate(client, device_ca):
    reg_id = unique_id("x509-get")
    leaf = make_cert(reg_id, issuer=device_ca)
    secondary = make_cert(reg_id)
    client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, leaf.pem, secondary.b64_der))

    got = client.enrollment.get(reg_id)

    assert got["attestation"]["type"] == "x509"
    certs = got["attestation"]["x509"]["clientCertificates"]
    assert_cert_info(certs["primary"]["info"], leaf)
    assert_cert_info(certs["secondary"]["info"], secondary)
    assert not certs["primary"].get("certificate")
    assert not certs["secondary"].get("certificate")


def test_attestation_mechanism_returns_x509_certificates(client):
    reg_id = unique_id("x509-mech")
    leaf = make_cert(reg_id)
    client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, leaf.pem))

    mech = client.enrollment.get_attestation_mechanism(reg_id)

    assert mech["type"] == "x509"
    primary = mech["x509"]["clientCertificates"]["primary"]
    # Either the certificate itself or its computed info identifies it.
    if primary.get("info"):
        assert primary["info"]["sha256Thumbprint"] == leaf.sha256
    else:
        assert primary.get("certificate"), mech


def test_ca_references_round_trip(client):
    reg_id = unique_id("x509-caref")
    body = {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-ca-1", "secondary": "root-ca-2"}}},
    }

    created = client.enrollment.create_or_update(reg_id, body)
    got = client.enrollment.get(reg_id)

    for record in (created, got):
        assert record["attestation"]["type"] == "x509"
        assert record["attestation"]["x509"]["caReferences"] == {"primary": "root-ca-1", "secondary": "root-ca-2"}


def test_x509_crud_with_etags(client):
    reg_id = unique_id("x509-crud")
    first = make_cert(reg_id)
    created = client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, first.pem))

    rotated = make_cert(reg_id)
    updated = client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, rotated.pem), if_match=created["etag"])
    assert updated["etag"] != created["etag"]
    assert_cert_info(updated["attestation"]["x509"]["clientCertificates"]["primary"]["info"], rotated)

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, first.pem), if_match=created["etag"])
    assert_dps_error(exc_info.value, 412)
    assert_cert_info(client.enrollment.get(reg_id)["attestation"]["x509"]["clientCertificates"]["primary"]["info"], rotated)

    client.enrollment.delete(reg_id)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)


def test_invalid_certificate_is_rejected_with_400(client):
    reg_id = unique_id("x509-bad")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, b64(b"this is not a certificate")))
    assert_dps_error(exc_info.value, 400)
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(reg_id)


def test_round_trip_of_get_result_keeps_the_certificate(client):
    # Service SDK samples update a record by sending back what GET returned (info only, no certificate).
    reg_id = unique_id("x509-rt")
    leaf = make_cert(reg_id)
    client.enrollment.create_or_update(reg_id, _x509_enrollment(reg_id, leaf.pem))

    got = client.enrollment.get(reg_id)
    got["provisioningStatus"] = "disabled"
    updated = client.enrollment.create_or_update(reg_id, got, if_match=got["etag"])

    assert updated["provisioningStatus"] == "disabled"
    assert_cert_info(updated["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)
    mech = client.enrollment.get_attestation_mechanism(reg_id)
    primary = mech["x509"]["clientCertificates"]["primary"]
    if primary.get("certificate"):
        assert "BEGIN CERTIFICATE" in primary["certificate"] or primary["certificate"] == leaf.b64_der
