"""Service-API SAS authentication: only a valid, unexpired token of a known policy gets in."""

import base64
import hashlib
import hmac
import time
import urllib.parse

import pytest
from azure.core.credentials import AzureSasCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.iot.deviceprovisioning import DeviceProvisioningClient
from azure.iot.deviceprovisioning._auth import generate_sas_token
from azure.core.utils import parse_connection_string

from helpers import assert_dps_error, unique_id


def _sas_client(berth, token):
    return DeviceProvisioningClient(
        endpoint=f"localhost:{berth.port}",
        credential=AzureSasCredential(token),
        connection_verify=str(berth.ca_path),
        retry_total=0,
    )


def _parts(berth):
    cs = parse_connection_string(berth.connection_string)
    return cs["hostname"], cs["sharedaccesskeyname"], cs["sharedaccesskey"]


def test_a_valid_sas_token_credential_is_accepted(berth):
    host, policy, key = _parts(berth)
    with _sas_client(berth, generate_sas_token(host, policy, key, expiry=600)) as c:
        assert list(c.enrollment.query({"query": "SELECT * FROM enrollments"}, top=1)) is not None


def test_expired_sas_token_returns_401(berth):
    host, policy, key = _parts(berth)
    with _sas_client(berth, generate_sas_token(host, policy, key, expiry=-3600)) as c:
        with pytest.raises(ClientAuthenticationError) as exc_info:
            c.enrollment.get(unique_id("auth-expired"))
    assert_dps_error(exc_info.value, 401)


def test_unknown_policy_name_returns_401(berth):
    host, _policy, key = _parts(berth)
    with _sas_client(berth, generate_sas_token(host, "nosuchpolicy", key, expiry=600)) as c:
        with pytest.raises(ClientAuthenticationError) as exc_info:
            c.enrollment.get(unique_id("auth-policy"))
    assert_dps_error(exc_info.value, 401)


def test_token_for_another_host_returns_401(berth):
    _host, policy, key = _parts(berth)
    with _sas_client(berth, generate_sas_token("other-dps.azure-devices-provisioning.net", policy, key, expiry=600)) as c:
        with pytest.raises(ClientAuthenticationError) as exc_info:
            c.enrollment.get(unique_id("auth-host"))
    assert_dps_error(exc_info.value, 401)


def test_rejected_write_changes_nothing(berth, client):
    reg_id = unique_id("auth-write")
    host, policy, key = _parts(berth)
    with _sas_client(berth, generate_sas_token(host, policy, key, expiry=-3600)) as c:
        with pytest.raises(ClientAuthenticationError):
            c.enrollment.create_or_update(reg_id, {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}})
    with pytest.raises(Exception) as exc_info:
        client.enrollment.get(reg_id)
    assert getattr(exc_info.value, "status_code", None) == 404


def _token(resource_encoded, key, *, order=("sr", "sig", "se", "skn"), policy="provisioningserviceowner", ttl=600):
    """A SAS token signed over the resource exactly as encoded here (wire-protocol.md §2.1, §2.3)."""
    se = str(int(time.time()) + ttl)
    sig = base64.b64encode(
        hmac.new(base64.b64decode(key), f"{resource_encoded}\n{se}".encode(), hashlib.sha256).digest()
    ).decode()
    fields = {"sr": resource_encoded, "sig": urllib.parse.quote(sig, safe=""), "se": se, "skn": policy}
    return "SharedAccessSignature " + "&".join(f"{k}={fields[k]}" for k in order)


def test_token_with_lowercase_percent_encoding_is_accepted(berth):
    # The C SDK's URL encoder emits lowercase hex (%3a); the signature covers sr as sent.
    host, policy, key = _parts(berth)
    resource = urllib.parse.quote(host, safe="").replace("%3A", "%3a")
    assert "%3a" in resource
    with _sas_client(berth, _token(resource, key, policy=policy)) as c:
        with pytest.raises(ResourceNotFoundError):
            c.enrollment.get(unique_id("auth-lower"))  # authenticated: 404, not 401


def test_token_fields_in_any_order_are_accepted(berth):
    host, policy, key = _parts(berth)
    resource = urllib.parse.quote(host, safe="")
    with _sas_client(berth, _token(resource, key, policy=policy, order=("skn", "se", "sig", "sr"))) as c:
        with pytest.raises(ResourceNotFoundError):
            c.enrollment.get(unique_id("auth-order"))


def test_token_with_a_tampered_signature_returns_401(berth):
    host, policy, key = _parts(berth)
    resource = urllib.parse.quote(host, safe="")
    token = _token(resource, key, policy=policy)
    tampered = token.replace("&se=", "&se=1", 1) if "&se=" in token else token + "1"
    with _sas_client(berth, tampered) as c:
        with pytest.raises(ClientAuthenticationError) as exc_info:
            c.enrollment.get(unique_id("auth-tamper"))
    assert_dps_error(exc_info.value, 401)
