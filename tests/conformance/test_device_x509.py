"""X.509 device attestation (wire-protocol.md §4, §10.2) against `device_server`: the TLS client
certificate, with its chain, is the device's only credential.

- HTTPS: `requests` with `cert=(chain file, key file)` and no Authorization header.
- MQTT and MQTT over WebSocket: the official Python device SDK (azure-iot-device 2.14.0),
  `ProvisioningDeviceClient.create_from_x509_certificate` (username only, no password).

Individual enrollments hold the device certificate itself (`clientCertificates`); enrollment
groups hold a CA or intermediate (`signingCertificates`) or name a CA certificate uploaded to
Berth's store (`caReferences`). A group is usable only when its certificate, or one above it in
the device's chain, is a *verified* CA certificate in the store (uploaded with `isVerified: true`
or proven by proof of possession through `/certificates/{name}/generateVerificationCode` and
`/certificates/{name}/verify`). Chain failures are 401 with errorCode 401002 (HTTPS) or a
PUBLISH on `$dps/registrations/res/401/…` (MQTT). Disabled entries that cover the device win
over enabled ones: status `disabled` with registrationState.errorCode 401003.

Every test deletes the enrollments, groups and CA certificates it created (the CA quota is 25).
The certificates are ECDSA P-256, built here with `cryptography`.

What the SDK raises for a 401 on the response topic: `ClientError` caused by
`ServiceError("register request returned a service error status code 401")`; the body the device
received is only visible in the SDK's DEBUG log, which `sdk_x509_register` records.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import logging
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import helpers
from helpers import (
    DEVICE_API_VERSION,
    Cert,
    _shutdown_sdk_client,
    assert_dps_error,
    assert_no_hub_device,
    hub_device,
    parse_utc,
    raw,
    unique_id,
)

# The SDK builds its TLS context with the deprecated ssl.PROTOCOL_TLSv1_2 (DPS pins TLS 1.2).
pytestmark = pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")

TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]
TIMEOUT = 15
SDK_TIMEOUT = 60
DISABLED_ERROR_CODE = 401003
SDK_401 = "register request returned a service error status code 401"

# Loose, case-insensitive patterns for the 401002 messages (the contract fixes the code and
# that the message names the reason, not its wording).
EXPIRED = r"expire"
NOT_YET_VALID = r"not yet|not valid|before|future"
MISSING_INTERMEDIATE = r"intermediate|issuer|chain"
UNVERIFIED = r"verif"
CN_TOO_LONG = r"64"
CN_MISMATCH = r"common name|\bcn\b|registration id|match"
BAD_SIGNATURE = r"signature|signed"
NOT_A_CA = r"basic|\bca\b|certificate authority|not allowed to sign|cannot sign"


# --------------------------------------------------------------------------------------------
# Certificates and device files
# --------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def build_cert(
    cn: str,
    *,
    issuer: Optional[Cert] = None,
    ca: bool = False,
    not_before: Optional[dt.datetime] = None,
    not_after: Optional[dt.datetime] = None,
    signer_key: Any = None,
    basic_constraints: bool = True,
    organization: Optional[str] = None,
) -> Cert:
    """An ECDSA P-256 certificate with subject CN=cn (any length: the 64-character upper bound is
    not enforced here), self-signed when `issuer` is None. CAs get keyCertSign/cRLSign, leaves
    digitalSignature and the clientAuth EKU; both get subject and authority key identifiers.
    `signer_key` signs instead of the issuer's key (the issuer name and authority key identifier
    still name `issuer`): a signature that does not verify."""
    key = ec.generate_private_key(ec.SECP256R1())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Attribute's length must be >= 1 and <= 64"
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]
        if organization is not None:
            attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        subject = x509.Name(attributes)
    now = _now()
    issuer_key_public = issuer.key.public_key() if issuer else key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(helpers._serial())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key_public), critical=False)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    usage = dict(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    signer = signer_key or (issuer.key if issuer else key)
    return Cert(builder.sign(signer, hashes.SHA256()), key)


def build_ca(prefix: str, *, issuer: Optional[Cert] = None, **kwargs) -> Cert:
    """A CA (root when `issuer` is None) with a unique subject CN, so that no other test's
    certificates can stand in for it."""
    return build_cert(unique_id(prefix), issuer=issuer, ca=True, **kwargs)


@dataclass
class Device:
    """A device's credential as files: `cert_file` holds the leaf then the chain it sends."""

    reg_id: str
    leaf: Cert
    cert_file: str
    key_file: str

    @property
    def tls(self) -> tuple:
        """requests' `cert=`."""
        return (self.cert_file, self.key_file)


def device_files(tmp_path: Path, leaf: Cert, chain: tuple = (), *, reg_id: Optional[str] = None) -> Device:
    """Write leaf + chain (in that order) and the leaf's key as PEM files; the registration ID
    defaults to the leaf's CN."""
    stem = unique_id("dev")
    cert_file = tmp_path / f"{stem}.pem"
    key_file = tmp_path / f"{stem}.key"
    cert_file.write_text(leaf.pem + "".join(c.pem for c in chain))
    key_file.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Device(reg_id or leaf.cn, leaf, str(cert_file), str(key_file))


def new_device(tmp_path: Path, prefix: str, *, issuer: Optional[Cert] = None, chain: tuple = (),
               reg_id: Optional[str] = None, **kwargs) -> Device:
    """A leaf CN=unique_id(prefix) signed by `issuer` (self-signed when None), with files."""
    leaf = build_cert(unique_id(prefix), issuer=issuer, **kwargs)
    return device_files(tmp_path, leaf, chain, reg_id=reg_id)


# --------------------------------------------------------------------------------------------
# Service side: enrollments, groups, CA certificates, all removed after the test
# --------------------------------------------------------------------------------------------


def x509_enrollment(reg_id: str, hub: str, primary: Cert, secondary: Optional[Cert] = None, *,
                    status: str = "enabled", device_id: Optional[str] = None) -> dict:
    certs = {"primary": {"certificate": primary.pem}}
    if secondary is not None:
        certs["secondary"] = {"certificate": secondary.pem}
    body = {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": certs}},
        "allocationPolicy": "static",
        "iotHubs": [hub],
        "provisioningStatus": status,
    }
    if device_id is not None:
        body["deviceId"] = device_id
    return body


def x509_group(group_id: str, hub: str, *, signing: Optional[Cert] = None, ca_reference: Optional[str] = None,
               status: str = "enabled") -> dict:
    if signing is not None:
        x509_block = {"signingCertificates": {"primary": {"certificate": signing.pem}}}
    else:
        assert ca_reference is not None
        x509_block = {"caReferences": {"primary": ca_reference}}
    return {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": x509_block},
        "allocationPolicy": "static",
        "iotHubs": [hub],
        "provisioningStatus": status,
    }


def verification_code(client, name: str) -> str:
    r = raw(client, "POST", f"/certificates/{name}/generateVerificationCode")
    assert r.status_code == 200, f"generateVerificationCode {name}: {r.status_code} {r.text()!r}"
    code = r.json()["properties"]["verificationCode"]
    assert isinstance(code, str) and code, r.json()
    return code


def verify_ca(client, name: str, certificate: Cert):
    return raw(client, "POST", f"/certificates/{name}/verify", json_body={"certificate": certificate.pem})


def is_verified(client, name: str) -> bool:
    r = raw(client, "GET", f"/certificates/{name}")
    assert r.status_code == 200, f"GET /certificates/{name}: {r.status_code} {r.text()!r}"
    return r.json()["properties"]["isVerified"]


def prove_possession(client, name: str, ca: Cert) -> None:
    """Azure's proof of possession: a certificate whose subject CN is the code, signed by the CA."""
    code = verification_code(client, name)
    r = verify_ca(client, name, build_cert(code, issuer=ca))
    assert r.status_code == 200, f"verify {name}: {r.status_code} {r.text()!r}"
    assert r.json()["properties"]["isVerified"] is True, r.json()
    assert is_verified(client, name) is True


class Resources:
    """What a test created on the device server; `cleanup` removes it (enrollments, then groups,
    then CA certificates), and fails the teardown if a CA certificate could not be deleted."""

    def __init__(self, client) -> None:
        self.client = client
        self.enrollments: list = []
        self.groups: list = []
        self.cas: list = []

    def enrollment(self, body: dict) -> dict:
        reg_id = body["registrationId"]
        if reg_id not in self.enrollments:
            self.enrollments.append(reg_id)
        return self.client.enrollment.create_or_update(reg_id, body)

    def replace_enrollment(self, body: dict) -> dict:
        reg_id = body["registrationId"]
        current = self.client.enrollment.get(reg_id)
        return self.client.enrollment.create_or_update(reg_id, body, if_match=current["etag"])

    def group(self, body: dict) -> dict:
        self.groups.append(body["enrollmentGroupId"])
        return self.client.enrollment_group.create_or_update(body["enrollmentGroupId"], body)

    def ca(self, cert: Cert, *, verified: bool = False) -> str:
        """Upload `cert` to the CA store under a fresh name (verified or not); returns the name."""
        name = unique_id("x509ca")
        body: dict = {"certificate": cert.pem}
        if verified:
            body["isVerified"] = True
        self.cas.append(name)
        r = raw(self.client, "PUT", f"/certificates/{name}", json_body=body)
        assert r.status_code in (200, 201), f"PUT /certificates/{name}: {r.status_code} {r.text()!r}"
        assert r.json()["properties"]["isVerified"] is verified, r.json()
        return name

    def cleanup(self) -> None:
        for reg_id in self.enrollments:
            try:
                self.client.enrollment.delete(reg_id)
            except ResourceNotFoundError:
                pass
        for group_id in self.groups:
            try:
                self.client.enrollment_group.delete(group_id)
            except ResourceNotFoundError:
                pass
        failures = []
        for name in self.cas:
            r = raw(self.client, "DELETE", f"/certificates/{name}")
            if r.status_code not in (200, 204, 404):
                failures.append(f"DELETE /certificates/{name}: {r.status_code} {r.text()!r}")
        assert not failures, failures


@pytest.fixture
def res(device_client):
    resources = Resources(device_client)
    yield resources
    resources.cleanup()


@dataclass
class Pki:
    """A root R uploaded verified, a valid intermediate A under it, and an enabled group on R
    (signingCertificates); `good` is a device under A sending leaf + A."""

    root: Cert
    intermediate: Cert
    group_id: str
    hub: str
    good: Device


@pytest.fixture
def pki(res, device_hub, tmp_path) -> Pki:
    root = build_ca("x509-root")
    intermediate = build_ca("x509-int", issuer=root)
    res.ca(root, verified=True)
    group_id = unique_id("x509-grp")
    res.group(x509_group(group_id, device_hub, signing=root))
    good = new_device(tmp_path, "x509-good", issuer=intermediate, chain=(intermediate,))
    return Pki(root, intermediate, group_id, device_hub, good)


# --------------------------------------------------------------------------------------------
# Device side over HTTPS (requests with a client certificate, no Authorization)
# --------------------------------------------------------------------------------------------

JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}


def _url(server, path: str) -> str:
    return f"{server.base_url}/{server.id_scope}{path}"


def https_register(server, device: Optional[Device], reg_id: Optional[str] = None) -> requests.Response:
    """PUT /{idScope}/registrations/{id}/register with the device's TLS client certificate
    (none when `device` is None); `reg_id` overrides the one in the URL and body."""
    reg_id = reg_id or device.reg_id
    return requests.put(
        _url(server, f"/registrations/{reg_id}/register"),
        params={"api-version": DEVICE_API_VERSION},
        headers=JSON_HEADERS,
        data=json.dumps({"registrationId": reg_id}).encode(),
        cert=device.tls if device else None,
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def https_poll(server, device: Device, operation_id: str) -> requests.Response:
    return requests.get(
        _url(server, f"/registrations/{device.reg_id}/operations/{operation_id}"),
        params={"api-version": DEVICE_API_VERSION},
        headers=JSON_HEADERS,
        cert=device.tls,
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def https_status_lookup(server, device: Device) -> requests.Response:
    return requests.post(
        _url(server, f"/registrations/{device.reg_id}"),
        params={"api-version": DEVICE_API_VERSION},
        headers=JSON_HEADERS,
        data=json.dumps({"registrationId": device.reg_id}).encode(),
        cert=device.tls,
        verify=str(server.ca_path),
        timeout=TIMEOUT,
    )


def poll_to_end(server, device: Device, operation_id: str, *, polls: int = 20) -> dict:
    """Poll (0.3 s, then 0.5 s apart; a 429 waits its retry-after) until the operation leaves
    "assigning"; returns the final 200 body."""
    wait = 0.3
    for _ in range(polls):
        time.sleep(wait)
        wait = 0.5
        r = https_poll(server, device, operation_id)
        if r.status_code == 200:
            body = r.json()
            assert body["operationId"] == operation_id, body
            return body
        if r.status_code == 429:
            wait = float(r.headers.get("retry-after", "2"))
            continue
        assert r.status_code == 202, f"poll {device.reg_id}: {r.status_code} {r.text!r}"
        assert r.json()["status"] == "assigning", r.text
    raise AssertionError(f"{device.reg_id} still assigning after {polls} polls")


def accepted_operation(r: requests.Response, reg_id: str) -> str:
    assert r.status_code == 202, f"register {reg_id}: expected 202, got {r.status_code} {r.text!r}"
    body = r.json()
    assert isinstance(body.get("operationId"), str) and body["operationId"], body
    assert body["status"] == "assigning", body
    assert body["registrationState"]["registrationId"] == reg_id, body
    return body["operationId"]


def https_register_and_wait(server, device: Device) -> dict:
    """Register (202 expected) and poll to the end; returns the final body."""
    return poll_to_end(server, device, accepted_operation(https_register(server, device), device.reg_id))


def outcome(server, device: Device) -> tuple:
    """("assigned" | "disabled" | "failed", final body) after 202 + polls, or
    ("http-<status>", body) when the register request itself was refused."""
    r = https_register(server, device)
    if r.status_code != 202:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return f"http-{r.status_code}", body
    final = poll_to_end(server, device, r.json()["operationId"])
    return final["status"], final


def outcomes(server, devices: list) -> dict:
    """{reg_id: (status, body)} for devices registered concurrently."""
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        results = list(pool.map(lambda d: outcome(server, d), devices))
    return {d.reg_id: result for d, result in zip(devices, results)}


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


def assert_message(body: dict, pattern: str) -> None:
    assert re.search(pattern, body.get("message", ""), re.IGNORECASE), (
        f"message should name the reason (/{pattern}/i): {body!r}"
    )


def assert_refused(server, device: Device, pattern: str, *, reg_id: Optional[str] = None) -> dict:
    """HTTPS register answers 401 with errorCode 401002 and a message matching `pattern`."""
    body = assert_device_error(https_register(server, device, reg_id), 401, 401002)
    assert_message(body, pattern)
    return body


def assert_assigned(final: dict, *, reg_id: str, hub: str, device_id: Optional[str] = None,
                    group_id: Optional[str] = None) -> dict:
    assert final["status"] == "assigned", final
    state = final["registrationState"]
    assert state["registrationId"] == reg_id, state
    assert state["status"] == "assigned", state
    assert state["assignedHub"] == hub, state
    assert state["deviceId"] == (device_id or reg_id), state
    enrollment_group = (state.get("x509") or {}).get("enrollmentGroupId")
    if group_id is not None:
        assert enrollment_group == group_id, f"registrationState.x509.enrollmentGroupId: {state!r}"
    else:
        assert enrollment_group is None, f"an individual enrollment names no group: {state!r}"
    return state


def assert_disabled(final: dict, reg_id: str) -> None:
    assert final["status"] == "disabled", final
    state = final["registrationState"]
    assert state["registrationId"] == reg_id, state
    assert state["status"] == "disabled", state
    assert state.get("errorCode") == DISABLED_ERROR_CODE, state


def assert_hub_x509_identity(client, hub: str, device_id: str, leaf: Cert) -> dict:
    """The record driver's hub device: selfSigned with the leaf's uppercase SHA-256 thumbprint
    as primary and secondary (wire-protocol.md §4.4, §10.2)."""
    device = hub_device(client, hub, device_id)
    assert device is not None, f"hub {hub} has no device {device_id!r}"
    assert device["deviceId"] == device_id, device
    auth = device["authentication"]
    assert auth["type"] == "selfSigned", device
    assert auth["x509Thumbprint"] == {"primaryThumbprint": leaf.sha256, "secondaryThumbprint": leaf.sha256}, device
    return device


def assert_good_device_registers(server, client, pki: Pki) -> None:
    """The server still works right after a refusal: a valid device of the same group registers."""
    final = https_register_and_wait(server, pki.good)
    assert_assigned(final, reg_id=pki.good.reg_id, hub=pki.hub, group_id=pki.group_id)
    assert_hub_x509_identity(client, pki.hub, pki.good.reg_id, pki.good.leaf)


# --------------------------------------------------------------------------------------------
# Device side with the official SDK (MQTT, MQTT over WebSocket), recording what it received
# --------------------------------------------------------------------------------------------


@dataclass
class SdkRun:
    result: Any = None
    error: Optional[BaseException] = None
    responses: list = field(default_factory=list)  # (status, body) of every DPS response received

    @property
    def final(self) -> dict:
        done = [body for _, body in self.responses if body.get("status") != "assigning"]
        assert done, f"the device received no final response: {self.responses!r}"
        return done[-1]


def sdk_x509_register(server, device: Device, *, websockets: bool, reg_id: Optional[str] = None,
                      timeout: float = SDK_TIMEOUT) -> SdkRun:
    """register() with `create_from_x509_certificate` (the registration ID defaults to the
    device's); records the result or exception and the DPS responses (from the SDK's DEBUG log).
    Only one SDK registration runs at a time in this file, so every response belongs to it."""
    from azure.iot.device import X509, ProvisioningDeviceClient

    run = SdkRun()
    lock = threading.Lock()

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = helpers._SDK_RESPONSE.match(record.getMessage())
            if not m:
                return
            try:
                body = json.loads(ast.literal_eval(m.group("payload")).decode("utf-8"))
            except (ValueError, SyntaxError, UnicodeDecodeError):
                body = {"unparsed": m.group("payload")}
            with lock:
                run.responses.append((int(m.group("status")), body))

    logger = logging.getLogger(helpers._SDK_MQTT_LOGGER)
    recorder = Recorder(level=logging.DEBUG)
    previous_level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    sdk_client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=reg_id or device.reg_id,
        id_scope=server.id_scope,
        x509=X509(cert_file=device.cert_file, key_file=device.key_file),
        websockets=websockets,
        server_verification_cert=server.ca_pem,
    )

    def register() -> None:
        try:
            run.result = sdk_client.register()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            run.error = exc

    thread = threading.Thread(target=register, name=f"x509-register-{device.reg_id}", daemon=True)
    try:
        thread.start()
        thread.join(timeout)
        assert not thread.is_alive(), f"SDK registration of {device.reg_id} did not finish within {timeout:.0f}s"
    finally:
        _shutdown_sdk_client(sdk_client)
        logger.removeHandler(recorder)
        logger.setLevel(previous_level)
    return run


def assert_sdk_assigned(run: SdkRun, *, hub: str, device_id: str, group_id: Optional[str] = None) -> None:
    assert run.error is None, f"register() raised {run.error!r} (cause {run.error.__cause__!r}); got {run.responses!r}"
    result = run.result
    assert result is not None and result.status == "assigned", str(result)
    state = result.registration_state
    assert state.assigned_hub == hub, str(result)
    assert state.device_id == device_id, str(result)
    assert isinstance(result.operation_id, str) and result.operation_id, str(result)
    enrollment_group = (run.final.get("registrationState", {}).get("x509") or {}).get("enrollmentGroupId")
    if group_id is not None:
        assert enrollment_group == group_id, run.final
    else:
        assert enrollment_group is None, run.final


def assert_sdk_refused_401(run: SdkRun, pattern: str) -> dict:
    """register() failed because the server answered the register request on res/401 with
    errorCode 401002 and a message matching `pattern`."""
    from azure.iot.device.exceptions import ClientError, ServiceError

    assert run.error is not None, f"the device registered: {run.result}"
    assert type(run.error) is ClientError, repr(run.error)
    assert isinstance(run.error.__cause__, ServiceError), repr(run.error.__cause__)
    assert str(run.error.__cause__) == SDK_401, repr(run.error.__cause__)
    refusals = [body for status, body in run.responses if status == 401]
    assert refusals, f"no response on res/401: {run.responses!r}"
    body = refusals[-1]
    assert body.get("errorCode") == 401002, body
    assert isinstance(body.get("trackingId"), str) and body["trackingId"], body
    parse_utc(body.get("timestampUtc"))
    assert_message(body, pattern)
    return body


# ============================================================================================
# (1) The official device SDK over MQTT and MQTT over WebSocket
# ============================================================================================


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_sdk_individual_enrollment_with_self_signed_leaf_is_assigned_and_hub_gets_its_thumbprint(
    device_server, device_client, device_hub, res, tmp_path, websockets
):
    device = new_device(tmp_path, "x509-sdk-ind")
    res.enrollment(x509_enrollment(device.reg_id, device_hub, device.leaf))

    run = sdk_x509_register(device_server, device, websockets=websockets)

    assert_sdk_assigned(run, hub=device_hub, device_id=device.reg_id)
    assert_hub_x509_identity(device_client, device_hub, device.reg_id, device.leaf)


@pytest.mark.parametrize("with_root", [pytest.param(False, id="leaf+intermediate"),
                                       pytest.param(True, id="leaf+intermediate+root")])
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_sdk_group_on_ca_proven_by_proof_of_possession_assigns_device_id_cn(
    device_server, device_client, device_hub, res, tmp_path, websockets, with_root
):
    root = build_ca("x509-pop-root")
    intermediate = build_ca("x509-pop-int", issuer=root)
    ca_name = res.ca(root, verified=False)
    prove_possession(device_client, ca_name, root)
    group_id = unique_id("x509-sdk-grp")
    res.group(x509_group(group_id, device_hub, ca_reference=ca_name))
    chain = (intermediate, root) if with_root else (intermediate,)
    device = new_device(tmp_path, "x509-sdk-grpdev", issuer=intermediate, chain=chain)

    run = sdk_x509_register(device_server, device, websockets=websockets)

    assert_sdk_assigned(run, hub=device_hub, device_id=device.reg_id, group_id=group_id)
    assert run.final["registrationState"]["deviceId"] == device.leaf.cn
    assert_hub_x509_identity(device_client, device_hub, device.reg_id, device.leaf)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_sdk_group_on_unverified_ca_is_refused_with_401(
    device_server, device_client, device_hub, res, tmp_path, websockets
):
    root = build_ca("x509-unv-root")
    intermediate = build_ca("x509-unv-int", issuer=root)
    ca_name = res.ca(root, verified=False)
    group_id = unique_id("x509-sdk-unv")
    res.group(x509_group(group_id, device_hub, ca_reference=ca_name))
    device = new_device(tmp_path, "x509-sdk-unvdev", issuer=intermediate, chain=(intermediate,))

    run = sdk_x509_register(device_server, device, websockets=websockets)

    assert_sdk_refused_401(run, UNVERIFIED)
    assert is_verified(device_client, ca_name) is False
    assert_no_hub_device(device_client, device_hub, device.reg_id)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_sdk_common_name_different_from_registration_id_is_refused_with_401(
    device_server, device_client, pki, tmp_path, websockets
):
    device = new_device(tmp_path, "x509-sdk-cn", issuer=pki.intermediate, chain=(pki.intermediate,))
    other_id = unique_id("x509-sdk-other")

    run = sdk_x509_register(device_server, device, websockets=websockets, reg_id=other_id)

    assert_sdk_refused_401(run, CN_MISMATCH)
    assert_no_hub_device(device_client, pki.hub, other_id)
    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_sdk_expired_leaf_is_refused_with_401(device_server, device_client, pki, tmp_path, websockets):
    device = new_device(
        tmp_path,
        "x509-sdk-exp",
        issuer=pki.intermediate,
        chain=(pki.intermediate,),
        not_before=_now() - dt.timedelta(days=30),
        not_after=_now() - dt.timedelta(days=1),
    )

    run = sdk_x509_register(device_server, device, websockets=websockets)

    assert_sdk_refused_401(run, EXPIRED)
    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


# ============================================================================================
# (2) The seed's five-device example: root R (verified), intermediates A and B, devices 1-3
#     under A and 4-5 under B; deny wins
# ============================================================================================


def test_five_devices_under_one_root_disabled_group_and_disabled_individual_block_exactly_theirs(
    device_server, device_client, device_hub, res, tmp_path
):
    root = build_ca("x509-five-r")
    a = build_ca("x509-five-a", issuer=root)
    b = build_ca("x509-five-b", issuer=root)
    res.ca(root, verified=True)
    # The devices send leaf + intermediate; R is found in the store.
    devices = [new_device(tmp_path, f"x509-five-{n}", issuer=a, chain=(a,)) for n in (1, 2, 3)]
    devices += [new_device(tmp_path, f"x509-five-{n}", issuer=b, chain=(b,)) for n in (4, 5)]
    d1, d2, d3, d4, d5 = devices
    group_r = unique_id("x509-five-grp-r")
    res.group(x509_group(group_r, device_hub, signing=root))

    # (i) the group on R, enabled: all five provision.
    got = outcomes(device_server, devices)

    assert {reg_id: status for reg_id, (status, _) in got.items()} == {d.reg_id: "assigned" for d in devices}, got
    for d in devices:
        assert_assigned(got[d.reg_id][1], reg_id=d.reg_id, hub=device_hub, group_id=group_r)
        assert_hub_x509_identity(device_client, device_hub, d.reg_id, d.leaf)

    # (ii) a disabled group on B: 4 and 5 are disabled, 1-3 still assigned through R.
    group_b = unique_id("x509-five-grp-b")
    res.group(x509_group(group_b, device_hub, signing=b, status="disabled"))

    got = outcomes(device_server, devices)

    expected = {d1.reg_id: "assigned", d2.reg_id: "assigned", d3.reg_id: "assigned",
                d4.reg_id: "disabled", d5.reg_id: "disabled"}
    assert {reg_id: status for reg_id, (status, _) in got.items()} == expected, got
    for d in (d1, d2, d3):
        assert_assigned(got[d.reg_id][1], reg_id=d.reg_id, hub=device_hub, group_id=group_r)
    for d in (d4, d5):
        assert_disabled(got[d.reg_id][1], d.reg_id)

    # (iii) a disabled individual enrollment for device 3 (its own certificate): 3 is disabled,
    # 1 and 2 still assigned, 4 and 5 still disabled.
    res.enrollment(x509_enrollment(d3.reg_id, device_hub, d3.leaf, status="disabled"))

    got = outcomes(device_server, devices)

    expected[d3.reg_id] = "disabled"
    assert {reg_id: status for reg_id, (status, _) in got.items()} == expected, got
    for d in (d1, d2):
        assert_assigned(got[d.reg_id][1], reg_id=d.reg_id, hub=device_hub, group_id=group_r)
    for d in (d3, d4, d5):
        assert_disabled(got[d.reg_id][1], d.reg_id)


def test_disabled_individual_enrollment_of_another_attestation_type_blocks_an_x509_group_device(
    device_server, device_client, pki, res
):
    # Deny wins across attestation types: a disabled symmetric-key entry for the registration ID.
    res.enrollment(helpers.symmetric_key_enrollment(pki.good.reg_id, hubs=[pki.hub], status="disabled"))

    status, final = outcome(device_server, pki.good)

    assert status == "disabled", final
    assert_disabled(final, pki.good.reg_id)
    assert_no_hub_device(device_client, pki.hub, pki.good.reg_id)


def test_disabled_group_on_the_chain_blocks_a_device_with_an_enabled_individual_enrollment(
    device_server, device_client, pki, res
):
    # Deny wins over the lookup order: the enabled individual entry would be found first.
    res.enrollment(x509_enrollment(pki.good.reg_id, pki.hub, pki.good.leaf))
    res.group(x509_group(unique_id("x509-grp-off"), pki.hub, signing=pki.intermediate, status="disabled"))

    status, final = outcome(device_server, pki.good)

    assert status == "disabled", final
    assert_disabled(final, pki.good.reg_id)
    assert_no_hub_device(device_client, pki.hub, pki.good.reg_id)


def test_disabled_group_on_a_root_the_device_does_not_send_blocks_it(device_server, device_client, pki, res):
    # The device sends leaf + A; R comes from the store and is part of its chain. An enabled
    # group on A (closer to the leaf) does not outweigh the disabled group on R.
    res.group(x509_group(unique_id("x509-grp-a"), pki.hub, signing=pki.intermediate))
    res.group(x509_group(unique_id("x509-grp-roff"), pki.hub, signing=pki.root, status="disabled"))

    status, final = outcome(device_server, pki.good)

    assert status == "disabled", final
    assert_disabled(final, pki.good.reg_id)
    assert_no_hub_device(device_client, pki.hub, pki.good.reg_id)


def test_group_on_a_verified_intermediate_needs_no_root_in_the_store(
    device_server, device_client, device_hub, res, tmp_path
):
    # Only the intermediate is uploaded (and proven); its root is neither in the store nor sent.
    root = build_ca("x509-int-only-root")
    intermediate = build_ca("x509-int-only", issuer=root)
    ca_name = res.ca(intermediate, verified=False)
    prove_possession(device_client, ca_name, intermediate)
    group_id = unique_id("x509-int-only-grp")
    res.group(x509_group(group_id, device_hub, ca_reference=ca_name))
    device = new_device(tmp_path, "x509-int-only-dev", issuer=intermediate, chain=(intermediate,))

    final = https_register_and_wait(device_server, device)

    assert_assigned(final, reg_id=device.reg_id, hub=device_hub, group_id=group_id)
    assert_hub_x509_identity(device_client, device_hub, device.reg_id, device.leaf)


def test_individual_enrollment_wins_over_group_and_its_device_id_is_used(
    device_server, device_client, pki, res
):
    device_id = f"custom-{pki.good.reg_id}"
    res.enrollment(x509_enrollment(pki.good.reg_id, pki.hub, pki.good.leaf, device_id=device_id))

    final = https_register_and_wait(device_server, pki.good)

    assert_assigned(final, reg_id=pki.good.reg_id, hub=pki.hub, device_id=device_id)
    assert_hub_x509_identity(device_client, pki.hub, device_id, pki.good.leaf)
    assert_no_hub_device(device_client, pki.hub, pki.good.reg_id)


def test_group_closest_to_the_leaf_wins(device_server, device_client, pki, res):
    # Groups on R (the pki fixture's) and on A, both enabled: the device under A gets A's group.
    group_a = unique_id("x509-grp-a")
    res.group(x509_group(group_a, pki.hub, signing=pki.intermediate))

    final = https_register_and_wait(device_server, pki.good)

    assert_assigned(final, reg_id=pki.good.reg_id, hub=pki.hub, group_id=group_a)


def test_device_without_any_enrollment_is_refused_with_401(device_server, device_client, device_hub, res, tmp_path):
    root = build_ca("x509-none-root")
    intermediate = build_ca("x509-none-int", issuer=root)
    res.ca(root, verified=True)
    device = new_device(tmp_path, "x509-none", issuer=intermediate, chain=(intermediate,))
    self_signed = new_device(tmp_path, "x509-none-ss")

    assert_device_error(https_register(device_server, device), 401)
    assert_device_error(https_register(device_server, self_signed), 401)
    assert_no_hub_device(device_client, device_hub, device.reg_id)


# ============================================================================================
# (3) HTTPS with a real TLS client certificate, end to end
# ============================================================================================


@pytest.mark.parametrize("kind", ["individual", "group"])
def test_https_register_poll_and_status_lookup(device_server, device_client, device_hub, res, tmp_path, kind):
    if kind == "individual":
        device = new_device(tmp_path, "x509-https-ind")
        res.enrollment(x509_enrollment(device.reg_id, device_hub, device.leaf))
        group_id = None
    else:
        root = build_ca("x509-https-root")
        intermediate = build_ca("x509-https-int", issuer=root)
        ca_name = res.ca(root, verified=True)
        group_id = unique_id("x509-https-grp")
        res.group(x509_group(group_id, device_hub, ca_reference=ca_name))
        device = new_device(tmp_path, "x509-https-grpdev", issuer=intermediate, chain=(intermediate, root))

    r = https_register(device_server, device)
    operation_id = accepted_operation(r, device.reg_id)
    final = poll_to_end(device_server, device, operation_id)

    state = assert_assigned(final, reg_id=device.reg_id, hub=device_hub, group_id=group_id)
    assert parse_utc(state["lastUpdatedDateTimeUtc"]) >= parse_utc(state["createdDateTimeUtc"])
    assert isinstance(state["etag"], str) and state["etag"], state
    assert_hub_x509_identity(device_client, device_hub, device.reg_id, device.leaf)

    lookup = https_status_lookup(device_server, device)

    assert lookup.status_code == 200, lookup.text
    looked_up = lookup.json()
    for name in ("registrationId", "assignedHub", "deviceId", "status", "createdDateTimeUtc",
                 "lastUpdatedDateTimeUtc", "etag"):
        assert looked_up.get(name) == state[name], (name, looked_up, state)


# ============================================================================================
# (4) Bad input over HTTPS: 401 + 401002 naming the reason; a good device registers after
# ============================================================================================


def test_expired_leaf_is_refused(device_server, device_client, pki, tmp_path):
    device = new_device(tmp_path, "x509-exp", issuer=pki.intermediate, chain=(pki.intermediate,),
                        not_before=_now() - dt.timedelta(days=30), not_after=_now() - dt.timedelta(days=1))

    assert_refused(device_server, device, EXPIRED)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_expired_self_signed_leaf_of_an_individual_enrollment_is_refused(
    device_server, device_client, pki, res, tmp_path
):
    device = new_device(tmp_path, "x509-exp-ind", not_before=_now() - dt.timedelta(days=30),
                        not_after=_now() - dt.timedelta(days=1))
    res.enrollment(x509_enrollment(device.reg_id, pki.hub, device.leaf))

    assert_refused(device_server, device, EXPIRED)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_not_yet_valid_leaf_is_refused(device_server, device_client, pki, tmp_path):
    device = new_device(tmp_path, "x509-nyv", issuer=pki.intermediate, chain=(pki.intermediate,),
                        not_before=_now() + dt.timedelta(days=1), not_after=_now() + dt.timedelta(days=30))

    assert_refused(device_server, device, NOT_YET_VALID)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_expired_intermediate_is_refused(device_server, device_client, pki, tmp_path):
    expired = build_ca("x509-expint", issuer=pki.root, not_before=_now() - dt.timedelta(days=60),
                       not_after=_now() - dt.timedelta(days=1))
    device = new_device(tmp_path, "x509-expintdev", issuer=expired, chain=(expired,))

    assert_refused(device_server, device, EXPIRED)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_missing_intermediate_is_refused(device_server, device_client, pki, tmp_path):
    # The leaf's issuer (A) is neither sent nor in the store; only R is in the store.
    device = new_device(tmp_path, "x509-noint", issuer=pki.intermediate, chain=())

    assert_refused(device_server, device, MISSING_INTERMEDIATE)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


@pytest.mark.parametrize("uploaded", [pytest.param(True, id="uploaded-unverified"),
                                      pytest.param(False, id="not-in-store")])
def test_chain_reaching_only_an_unverified_ca_is_refused(device_server, device_client, pki, res, tmp_path, uploaded):
    root = build_ca("x509-unv-root")
    intermediate = build_ca("x509-unv-int", issuer=root)
    if uploaded:
        res.ca(root, verified=False)
    group_id = unique_id("x509-unv-grp")
    res.group(x509_group(group_id, pki.hub, signing=root))
    device = new_device(tmp_path, "x509-unvdev", issuer=intermediate, chain=(intermediate, root))

    assert_refused(device_server, device, UNVERIFIED if uploaded else r"verif|store|unknown|trust")

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
def test_common_name_longer_than_64_characters_is_refused(device_server, device_client, pki, tmp_path):
    # The registration ID itself may have up to 128 characters (operator guide, names.rs), so the
    # URL carries the 65-character CN as is and is valid: the refusal must be the 401002 for the
    # certificate's CN, not a 400 for the URL.
    long_cn = unique_id("x509-long").ljust(65, "x")
    assert len(long_cn) == 65
    leaf = build_cert(long_cn, issuer=pki.intermediate)
    device = device_files(tmp_path, leaf, (pki.intermediate,))
    assert device.reg_id == long_cn

    assert_refused(device_server, device, CN_TOO_LONG)

    assert_no_hub_device(device_client, pki.hub, long_cn)
    assert_good_device_registers(device_server, device_client, pki)


def test_common_name_different_from_registration_id_is_refused(device_server, device_client, pki, tmp_path):
    device = new_device(tmp_path, "x509-cn", issuer=pki.intermediate, chain=(pki.intermediate,))
    other_id = unique_id("x509-cn-other")

    assert_refused(device_server, device, CN_MISMATCH, reg_id=other_id)

    assert_no_hub_device(device_client, pki.hub, other_id)
    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_registration_id_differing_only_in_case_from_the_common_name_is_accepted(
    device_server, device_client, pki, tmp_path
):
    device = new_device(tmp_path, "x509-case", issuer=pki.intermediate, chain=(pki.intermediate,))
    upper = device.reg_id.upper()

    r = https_register(device_server, device, upper)

    assert r.status_code == 202, r.text


def test_leaf_signature_that_does_not_verify_is_refused(device_server, device_client, pki, tmp_path):
    # Issuer name and authority key identifier say A, but another key signed it.
    forger = ec.generate_private_key(ec.SECP256R1())
    device = new_device(tmp_path, "x509-badsig", issuer=pki.intermediate, chain=(pki.intermediate,),
                        signer_key=forger)

    assert_refused(device_server, device, BAD_SIGNATURE)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


@pytest.mark.parametrize("basic_constraints", [pytest.param(True, id="ca-false"),
                                               pytest.param(False, id="no-basic-constraints")])
def test_issuer_without_ca_basic_constraints_is_refused(device_server, device_client, pki, tmp_path, basic_constraints):
    not_a_ca = build_cert(unique_id("x509-notca"), issuer=pki.root, ca=False, basic_constraints=basic_constraints)
    device = new_device(tmp_path, "x509-notcadev", issuer=not_a_ca, chain=(not_a_ca,))

    assert_refused(device_server, device, NOT_A_CA)

    assert_no_hub_device(device_client, pki.hub, device.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


def test_no_client_certificate_and_no_authorization_is_refused_with_401(device_server, device_client, pki):
    r = https_register(device_server, None, pki.good.reg_id)

    assert_device_error(r, 401)
    assert_no_hub_device(device_client, pki.hub, pki.good.reg_id)
    assert_good_device_registers(device_server, device_client, pki)


# ============================================================================================
# (5) Service API: proof of possession
# ============================================================================================


@pytest.mark.parametrize("wrong", ["common-name", "signing-key"])
def test_verification_with_the_wrong_certificate_is_refused_and_the_right_one_verifies(
    device_client, res, wrong
):
    root = build_ca("x509-pop")
    name = res.ca(root, verified=False)
    code = verification_code(device_client, name)
    if wrong == "common-name":
        bad = build_cert(f"not-{code}"[:64], issuer=root)
    else:
        # CN is the code and the issuer name is the CA's, but another key signed it.
        bad = build_cert(code, issuer=root, signer_key=ec.generate_private_key(ec.SECP256R1()))

    r = verify_ca(device_client, name, bad)

    assert_dps_error(r, 400)
    assert is_verified(device_client, name) is False

    r = verify_ca(device_client, name, build_cert(code, issuer=root))

    assert r.status_code == 200, r.text()
    assert r.json()["properties"]["isVerified"] is True, r.json()
    assert is_verified(device_client, name) is True


# ============================================================================================
# (6) Rolling an individual enrollment's certificate
# ============================================================================================


def test_rolling_primary_and_secondary_then_only_the_new_certificate(
    device_server, device_client, device_hub, res, tmp_path
):
    reg_id = unique_id("x509-roll")
    old = device_files(tmp_path, build_cert(reg_id))
    new = device_files(tmp_path, build_cert(reg_id))
    assert old.leaf.sha256 != new.leaf.sha256
    res.enrollment(x509_enrollment(reg_id, device_hub, old.leaf, new.leaf))

    # Both slots are accepted; the hub identity follows the certificate that registered last.
    assert_assigned(https_register_and_wait(device_server, old), reg_id=reg_id, hub=device_hub)
    assert_hub_x509_identity(device_client, device_hub, reg_id, old.leaf)
    assert_assigned(https_register_and_wait(device_server, new), reg_id=reg_id, hub=device_hub)
    assert_hub_x509_identity(device_client, device_hub, reg_id, new.leaf)
    assert_assigned(https_register_and_wait(device_server, old), reg_id=reg_id, hub=device_hub)
    assert_hub_x509_identity(device_client, device_hub, reg_id, old.leaf)

    # The operator keeps only the new certificate.
    res.replace_enrollment(x509_enrollment(reg_id, device_hub, new.leaf))

    assert_device_error(https_register(device_server, old), 401, 401002)
    assert_hub_x509_identity(device_client, device_hub, reg_id, old.leaf)
    assert_assigned(https_register_and_wait(device_server, new), reg_id=reg_id, hub=device_hub)
    assert_hub_x509_identity(device_client, device_hub, reg_id, new.leaf)


# --------------------------------------------------------------------------------------------
# Certificate facts reach WebAssembly policies: the certificate-organization example policy
# places a real X.509 device by the organization (O) of its certificate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_certificate_organization_policy_places_a_real_x509_device_by_its_certificate(
    device_server, device_client, res, tmp_path, websockets
):
    from helpers import link_record_hub, policy_component, upload_policy

    r = upload_policy(device_client, "certificate-organization", policy_component("certificate-organization"))
    assert r.status_code == 200, f"upload: {r.status_code} {r.text()!r}"
    contoso = link_record_hub(device_client, "contoso-ltd-hub")
    fabrikam = link_record_hub(device_client, "fabrikam-hub")
    try:
        root = build_ca("x509-org-root")
        ca_name = res.ca(root, verified=True)
        group_id = unique_id("x509-org-grp")
        body = x509_group(group_id, contoso, ca_reference=ca_name)
        body["iotHubs"] = [contoso, fabrikam]
        body["allocationPolicy"] = "custom"
        body["policyBinding"] = {"allocation": "certificate-organization"}
        res.group(body)
        leaf = build_cert(unique_id("x509-org-dev"), issuer=root, organization="Contoso Ltd.")
        device = device_files(tmp_path, leaf, (root,))

        run = sdk_x509_register(device_server, device, websockets=websockets)

        assert_sdk_assigned(run, hub=contoso, device_id=device.reg_id, group_id=group_id)
        hub_device = assert_hub_x509_identity(device_client, contoso, device.reg_id, leaf)
        assert hub_device["twin"]["tags"]["organization"] == "Contoso Ltd.", hub_device

        other = device_files(tmp_path, build_cert(unique_id("x509-org-dev"), issuer=root, organization="Fabrikam"),
                             (root,))
        run = sdk_x509_register(device_server, other, websockets=websockets)
        assert_sdk_assigned(run, hub=fabrikam, device_id=other.reg_id, group_id=group_id)
    finally:
        for hub in (contoso, fabrikam):
            raw(device_client, "DELETE", f"/linkedHubs/{hub}")
