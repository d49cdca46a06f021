"""Shared helpers for the Berth conformance suite (no pytest fixtures here; see conftest.py).

Everything in this module is plain Python so that test files can import it directly:
`from helpers import ...`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import struct
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

API_VERSION = "2021-10-01"

# The default reprovision policy and capabilities every enrollment gets when the request omits them.
DEFAULT_REPROVISION_POLICY = {"updateHubAssignment": True, "migrateDeviceData": True}
DEFAULT_CAPABILITIES = {"iotEdge": False}


def unique_id(prefix: str) -> str:
    """A registration / group id that no other test uses (lowercase, DPS character set)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def parse_utc(value: str) -> dt.datetime:
    """Parse a DPS date-time (ISO 8601, UTC). Fails the test if it is not one."""
    assert isinstance(value, str) and value, f"expected an ISO 8601 date-time string, got {value!r}"
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", value)
    assert m, f"not an ISO 8601 date-time: {value!r}"
    # Python's fromisoformat wants at most 6 fractional digits; .NET-style values carry 7.
    frac = (m.group(2) or "")[:7]
    tz = m.group(3)
    assert tz is not None, f"date-time without a time zone (must be UTC): {value!r}"
    tz = "+00:00" if tz == "Z" else tz
    parsed = dt.datetime.fromisoformat(m.group(1) + frac + tz)
    assert parsed.utcoffset() == dt.timedelta(0), f"date-time is not UTC: {value!r}"
    return parsed


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def random_key(n: int = 32) -> str:
    return b64(os.urandom(n))


# --------------------------------------------------------------------------------------------
# DPS error bodies
# --------------------------------------------------------------------------------------------


def _response_of(err_or_response: Any) -> Any:
    if isinstance(err_or_response, HttpResponseError):
        assert err_or_response.response is not None, f"error without a response: {err_or_response!r}"
        return err_or_response.response
    return err_or_response


def error_body_of(err_or_response: Any) -> dict:
    """The JSON body of an HttpResponseError or an azure.core.rest.HttpResponse."""
    response = _response_of(err_or_response)
    text = response.text()
    try:
        body = json.loads(text)
    except ValueError as exc:  # pragma: no cover - reported as a test failure
        raise AssertionError(f"error body is not JSON: {text!r}") from exc
    assert isinstance(body, dict), f"error body is not a JSON object: {text!r}"
    return body


def assert_dps_error(err_or_response: Any, status: int) -> dict:
    """Assert the HTTP status and the DPS error body shape:
    {errorCode: int (errorCode // 1000 == status), trackingId: str, message: str, timestampUtc: date-time}.
    """
    response = _response_of(err_or_response)
    assert response.status_code == status, (
        f"expected HTTP {status}, got {response.status_code}: {response.text()!r}"
    )
    body = error_body_of(response)
    code = body.get("errorCode")
    assert isinstance(code, int) and not isinstance(code, bool), f"errorCode must be an int: {body!r}"
    assert 100000 <= code <= 599999, f"errorCode must have six digits: {body!r}"
    assert code // 1000 == status, f"errorCode {code} does not match HTTP status {status}: {body!r}"
    assert isinstance(body.get("trackingId"), str) and body["trackingId"], f"trackingId missing: {body!r}"
    assert isinstance(body.get("message"), str) and body["message"], f"message missing: {body!r}"
    parse_utc(body.get("timestampUtc"))
    header = response.headers.get("x-ms-error-code")
    assert header == str(code), f"x-ms-error-code header {header!r} must repeat errorCode {code}"
    return body


def status_of(exc: HttpResponseError) -> Optional[int]:
    return exc.status_code if exc.status_code is not None else getattr(exc.response, "status_code", None)


# --------------------------------------------------------------------------------------------
# Raw requests through the SDK pipeline (same SAS auth), for Berth's own routes and headers
# --------------------------------------------------------------------------------------------


def raw(client, method: str, path: str, *, json_body: Any = None, headers: Optional[dict] = None,
        params: Optional[dict] = None, content: Optional[bytes] = None):
    """Send a request through the SDK's pipeline (adds the SAS Authorization header).
    Returns an azure.core.rest.HttpResponse; does not raise on error statuses."""
    query = {"api-version": API_VERSION}
    if params:
        query.update(params)
    kwargs: dict = {"params": query, "headers": headers or {}}
    if json_body is not None:
        kwargs["json"] = json_body
    if content is not None:
        kwargs["content"] = content
    request = HttpRequest(method, path, **kwargs)
    response = client.send_request(request)
    response.read()
    return response


def hub_connection_string(host: str) -> str:
    return f"HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey={random_key(32)}"


# --------------------------------------------------------------------------------------------
# X.509 certificates
# --------------------------------------------------------------------------------------------


@dataclass
class Cert:
    cert: x509.Certificate
    key: Any

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def b64_der(self) -> str:
        return b64(self.der)

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.der).hexdigest().upper()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest().upper()

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "X")

    @property
    def cn(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _serial() -> int:
    # 8 bytes, top byte in 0x10..0x7f: positive, no DER padding byte, no leading zero nibble,
    # so the uppercase hex form is unambiguous (16 digits).
    top = 0x10 + os.urandom(1)[0] % 0x70
    return int.from_bytes(bytes([top]) + os.urandom(7), "big")


def make_cert(cn: str, *, issuer: Optional[Cert] = None, ca: bool = False, days: int = 30) -> Cert:
    """A certificate with subject CN=cn; self-signed when issuer is None. ECDSA P-256 keys."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    return Cert(cert, key)


def assert_cert_info(info: dict, cert: Cert) -> None:
    """The X509CertificateInfo the server computed matches the certificate exactly."""
    assert isinstance(info, dict), f"info missing: {info!r}"
    assert info.get("subjectName") == f"CN={cert.cn}", info
    issuer_cn = cert.cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert info.get("issuerName") == f"CN={issuer_cn}", info
    assert info.get("sha1Thumbprint") == cert.sha1, info
    assert info.get("sha256Thumbprint") == cert.sha256, info
    assert info.get("serialNumber") == cert.serial_hex, info
    assert info.get("version") == 3, info
    assert parse_utc(info.get("notBeforeUtc")) == cert.cert.not_valid_before_utc, info
    assert parse_utc(info.get("notAfterUtc")) == cert.cert.not_valid_after_utc, info


# --------------------------------------------------------------------------------------------
# TPM
# --------------------------------------------------------------------------------------------

# TPM2_PolicySecret(TPM_RH_ENDORSEMENT) digest of the default EK template (TCG EK Credential Profile).
_EK_AUTH_POLICY = bytes.fromhex("837197674484B3F81A90CC8D46A5D724FD52D76E06520B64F2A1DA1B331469AA")


def tpm_endorsement_key() -> str:
    """base64 of a TPM2B_PUBLIC for an RSA 2048 EK following the default EK template."""
    modulus = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers().n
    unique = modulus.to_bytes(256, "big")
    tpmt_public = b"".join(
        [
            struct.pack(">HH", 0x0001, 0x000B),  # type TPM_ALG_RSA, nameAlg TPM_ALG_SHA256
            struct.pack(">I", 0x000300B2),  # fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt
            struct.pack(">H", len(_EK_AUTH_POLICY)) + _EK_AUTH_POLICY,
            struct.pack(">HHH", 0x0006, 128, 0x0043),  # symmetric AES-128-CFB
            struct.pack(">H", 0x0010),  # scheme TPM_ALG_NULL
            struct.pack(">HI", 2048, 0),  # keyBits, exponent (0 = 65537)
            struct.pack(">H", len(unique)) + unique,
        ]
    )
    return b64(struct.pack(">H", len(tpmt_public)) + tpmt_public)


# --------------------------------------------------------------------------------------------
# Device API: SAS tokens, group keys, enrollments, linked hubs and the hub side
# --------------------------------------------------------------------------------------------

# What the C and Edge device clients send on HTTPS; the Python device SDK sends 2019-03-31 on MQTT.
DEVICE_API_VERSION = "2021-06-01"
MQTT_API_VERSION = "2019-03-31"


def derive_device_key(group_key: str, registration_id: str) -> str:
    """A group member's device key: base64(HMAC-SHA256(base64decode(groupKey), registrationId))."""
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256)
    return b64(mac.digest())


def device_sas_token(id_scope: str, registration_id: str, key: str, *, expiry: Optional[int] = None,
                     ttl: int = 3600, skn: Optional[str] = "registration", lowercase_percent_encoding: bool = False,
                     resource: Optional[str] = None) -> str:
    """A device registration SAS token: sr={idScope}/registrations/{registrationId} URL-encoded,
    HMAC-SHA256 over `sr + "\\n" + se` with the base64-decoded key, skn=registration.
    `lowercase_percent_encoding` mimics the C SDK (`%2f`); the signature covers sr as sent.
    `skn=None` leaves skn out, as the Python device SDK does."""
    sr = urllib.parse.quote(resource or f"{id_scope}/registrations/{registration_id}", safe="")
    if lowercase_percent_encoding:
        sr = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), sr)
    se = str(expiry if expiry is not None else int(time.time()) + ttl)
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode("utf-8"), hashlib.sha256).digest()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(b64(sig), safe='')}&se={se}"
    return token if skn is None else f"{token}&skn={skn}"


def symmetric_key_enrollment(registration_id: str, *, hubs: list, primary: Optional[str] = None,
                             secondary: Optional[str] = None, allocation: str = "static",
                             device_id: Optional[str] = None, status: str = "enabled",
                             initial_twin: Optional[dict] = None, iot_edge: bool = False) -> dict:
    """An individual symmetric-key enrollment body for the service API."""
    keys = {}
    if primary is not None:
        keys["primaryKey"] = primary
    if secondary is not None:
        keys["secondaryKey"] = secondary
    body = {
        "registrationId": registration_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": keys},
        "allocationPolicy": allocation,
        "iotHubs": list(hubs),
        "provisioningStatus": status,
        "capabilities": {"iotEdge": iot_edge},
    }
    if device_id is not None:
        body["deviceId"] = device_id
    if initial_twin is not None:
        body["initialTwin"] = initial_twin
    return body


def symmetric_key_group(group_id: str, *, hubs: list, primary: str, secondary: str,
                        allocation: str = "static", status: str = "enabled") -> dict:
    """A symmetric-key enrollment group body for the service API."""
    return {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
        "allocationPolicy": allocation,
        "iotHubs": list(hubs),
        "provisioningStatus": status,
    }


def link_record_hub(client, prefix: str, *, allocation_weight: Optional[int] = None) -> str:
    """Link a hub by host name only (no connection string: Berth's `record` driver). The hub need
    not exist. Returns the host name."""
    host = f"{unique_id(prefix)}.azure-devices.net"
    body: dict = {}
    if allocation_weight is not None:
        body = {"allocationWeight": allocation_weight, "applyAllocationPolicy": True}
    r = raw(client, "PUT", f"/linkedHubs/{host}", json_body=body)
    assert r.status_code in (200, 201), f"linking {host} failed: {r.status_code} {r.text()!r}"
    return host


# The twin the `record` driver writes when the enrollment has no initialTwin.
EMPTY_TWIN = {"tags": {}, "properties": {"desired": {}}}


def hub_device(client, hub: str, device_id: str):
    """What the `record` driver wrote to `hub` for `device_id`: the parsed body, or None on 404."""
    r = raw(client, "GET", f"/linkedHubs/{hub}/devices/{device_id}")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, f"GET /linkedHubs/{hub}/devices/{device_id}: {r.status_code} {r.text()!r}"
    return r.json()


def assert_hub_device(client, hub: str, device_id: str, *, primary: str, secondary: Optional[str] = None,
                      twin: Optional[dict] = None, iot_edge: bool = False) -> dict:
    """The hub holds `device_id` with SAS authentication and exactly these keys, capabilities and
    initial twin."""
    device = hub_device(client, hub, device_id)
    assert device is not None, f"hub {hub} has no device {device_id!r}"
    assert device["deviceId"] == device_id, device
    assert device["authentication"]["type"] == "sas", device
    assert device["authentication"]["symmetricKey"]["primaryKey"] == primary, device
    if secondary is not None:
        assert device["authentication"]["symmetricKey"]["secondaryKey"] == secondary, device
    assert device["capabilities"] == {"iotEdge": iot_edge}, device
    assert device["twin"] == (twin if twin is not None else EMPTY_TWIN), device
    return device


def assert_no_hub_device(client, hub: str, device_id: str) -> None:
    device = hub_device(client, hub, device_id)
    assert device is None, f"hub {hub} must not hold {device_id!r}, but has {device!r}"


# --------------------------------------------------------------------------------------------
# The official Python device SDK (azure-iot-device)
# --------------------------------------------------------------------------------------------

_UNSET = object()

# How long one SDK registration may take before the test fails (the SDK itself has no overall
# timeout: it polls for as long as the server says "assigning").
SDK_REGISTER_TIMEOUT = 60


def _shutdown_sdk_client(device_client) -> None:
    """Disconnect a provisioning client whose register() did not end in "assigned" (the SDK
    shuts its pipeline down only after success and offers no public shutdown)."""
    from azure.iot.device.common.evented_callback import EventedCallback

    try:
        done = EventedCallback()
        device_client._pipeline.shutdown(callback=done)
        done.wait_for_completion()
    except Exception:  # noqa: BLE001 - already shut down (after success) or never connected
        pass


def sdk_register(server, registration_id: str, symmetric_key: str, *, websockets: bool, payload: Any = _UNSET,
                 timeout: float = SDK_REGISTER_TIMEOUT):
    """Register with the official device SDK: `ProvisioningDeviceClient.create_from_symmetric_key`
    against localhost (MQTT on 8883, or MQTT over WebSocket on 443), trusting the server's CA.
    Returns the RegistrationResult or raises what `register()` raised."""
    import threading

    from azure.iot.device import ProvisioningDeviceClient

    device_client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=server.id_scope,
        symmetric_key=symmetric_key,
        websockets=websockets,
        server_verification_cert=server.ca_pem,
    )
    if payload is not _UNSET:
        device_client.provisioning_payload = payload
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = device_client.register()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"register-{registration_id}", daemon=True)
    thread.start()
    thread.join(timeout)
    try:
        if thread.is_alive():
            raise AssertionError(f"SDK registration of {registration_id} did not finish within {timeout:.0f}s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    finally:
        _shutdown_sdk_client(device_client)


def sdk_register_many(server, devices: list, *, websockets: bool) -> dict:
    """Register several (registration_id, key) pairs concurrently with the SDK; returns
    {registration_id: RegistrationResult}. Raises the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = {
            reg_id: pool.submit(sdk_register, server, reg_id, key, websockets=websockets) for reg_id, key in devices
        }
        return {reg_id: future.result() for reg_id, future in futures.items()}


def sdk_disabled_error_message() -> str:
    """What azure-iot-device 2.x raises (as the __cause__ of ClientError) for status "disabled":
    it only knows assigning/assigned/failed."""
    return "Query Status Operation encountered an invalid registration status disabled with a status code of 200"


# --------------------------------------------------------------------------------------------
# WebAssembly policies: components, upload, lookup tables, dry runs, custom-allocation groups
# --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]

# Where `policies/build.sh` and `tests/policies/build.sh` put the components, then where cargo
# itself leaves them (dashes become underscores there), for a tree built without build.sh.
_COMPONENT_DIRS = (
    (REPO_ROOT / "policies" / "dist", False),
    (REPO_ROOT / "tests" / "policies" / "dist", False),
    (REPO_ROOT / "policies" / "target" / "wasm32-wasip2" / "release", True),
)


def policy_component(name: str) -> bytes:
    """The bytes of the prebuilt component `name` (an example policy or a test policy)."""
    tried = []
    for folder, underscored in _COMPONENT_DIRS:
        path = folder / f"{name.replace('-', '_') if underscored else name}.wasm"
        tried.append(str(path))
        if path.is_file():
            return path.read_bytes()
    raise AssertionError(
        f"component {name!r} not found (tried {', '.join(tried)}); build it with "
        "`bash policies/build.sh` / `bash tests/policies/build.sh` (tests/run.sh does)"
    )


def upload_policy(client, name: str, component: bytes, **limits):
    """PUT /policies/{name} with the component's bytes (Content-Type: application/wasm) and the
    limits as query parameters (timeoutMs=…, memoryBytes=…). Returns the raw response."""
    return raw(
        client,
        "PUT",
        f"/policies/{name}",
        content=component,
        headers={"Content-Type": "application/wasm"},
        params={key: str(value) for key, value in limits.items()},
    )


def put_lookup_table(client, name: str, table: dict) -> dict:
    r = raw(client, "PUT", f"/lookupTables/{name}", json_body=table)
    assert r.status_code == 200, f"PUT /lookupTables/{name}: {r.status_code} {r.text()!r}"
    return r.json()


def dry_run(client, name: str, body: dict) -> dict:
    """POST /policies/{name}/dryRun; returns {decision, logs, wallTimeMicros, memoryBytes, …}."""
    r = raw(client, "POST", f"/policies/{name}/dryRun", json_body=body)
    assert r.status_code == 200, f"dry run of {name}: {r.status_code} {r.text()!r}"
    return r.json()


def custom_group(group_id: str, *, hubs: list, primary: str, secondary: str, webhook_url: Optional[str] = None,
                 binding: Optional[dict] = None, initial_twin: Optional[dict] = None) -> dict:
    """A symmetric-key enrollment group with `allocationPolicy: custom`, bound to a policy through
    `customAllocationDefinition.webhookUrl` (`wasm:NAME`), `policyBinding`, or both."""
    body = symmetric_key_group(group_id, hubs=hubs, primary=primary, secondary=secondary, allocation="custom")
    if webhook_url is not None:
        body["customAllocationDefinition"] = {"webhookUrl": webhook_url, "apiVersion": API_VERSION}
    if binding is not None:
        body["policyBinding"] = binding
    if initial_twin is not None:
        body["initialTwin"] = initial_twin
    return body


# --------------------------------------------------------------------------------------------
# Device registration over HTTPS with `requests` (no SDK): register, then poll to the end
# --------------------------------------------------------------------------------------------


def https_register_and_wait(server, registration_id: str, key: str, *, payload: Any = _UNSET,
                            limit: float = 20) -> dict:
    """PUT /{idScope}/registrations/{id}/register (202 expected), then poll the operation until
    it leaves "assigning" (first polls after 0.2, 0.3, 0.5 s, then as `retry-after` says, so
    the per-registration poll budget of 5 in 10 s is kept). Returns the final 200 body."""
    import requests

    token = device_sas_token(server.id_scope, registration_id, key)
    headers = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json",
               "Authorization": token}
    params = {"api-version": DEVICE_API_VERSION}
    body: dict = {"registrationId": registration_id}
    if payload is not _UNSET:
        body["payload"] = payload
    base = f"{server.base_url}/{server.id_scope}/registrations/{registration_id}"
    r = requests.put(f"{base}/register", params=params, headers=headers, data=json.dumps(body).encode(),
                     verify=str(server.ca_path), timeout=15)
    assert r.status_code == 202, f"register {registration_id}: {r.status_code} {r.text!r}"
    operation_id = r.json()["operationId"]
    deadline = time.monotonic() + limit
    waits = iter((0.2, 0.3, 0.5))
    while True:
        time.sleep(next(waits, None) or int(r.headers.get("retry-after", "2")))
        r = requests.get(f"{base}/operations/{operation_id}", params=params, headers=headers,
                         verify=str(server.ca_path), timeout=15)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, f"poll {registration_id}: {r.status_code} {r.text!r}"
        assert time.monotonic() < deadline, f"{registration_id} still assigning after {limit}s"


# --------------------------------------------------------------------------------------------
# The official device SDK, recording what reached the device
# --------------------------------------------------------------------------------------------

# azure-iot-device 2.14 logs every DPS response it receives over MQTT at DEBUG level, as
# "Received payload:b'…' on topic:$dps/registrations/res/{status}/?$rid=…". That is the only
# place the SDK keeps a failed registration's errorCode and errorMessage: register() raises
# ClientError("Unexpected failure") caused by ServiceError("Query Status operation returned a
# failed registration status with a status code of 200"), and the RegistrationResult the SDK
# built is dropped.
_SDK_MQTT_LOGGER = "azure.iot.device.provisioning.pipeline.pipeline_stages_provisioning_mqtt"
_SDK_RESPONSE = re.compile(r"^Received payload:(?P<payload>b(?P<q>['\"]).*(?P=q)) on topic:\$dps/registrations/res/"
                           r"(?P<status>\d{3})/", re.S)

SDK_FAILED_STATUS_MESSAGE = (
    "Query Status operation returned a failed registration status with a status code of 200"
)


@dataclass
class SdkOutcome:
    """One SDK registration: what register() returned or raised, and every DPS response body
    the device received over MQTT for this registration ID, as (status, body)."""

    registration_id: str
    result: Any = None
    error: Optional[BaseException] = None
    responses: list = None

    @property
    def final(self) -> dict:
        """The last response the device received that is not "assigning"."""
        done = [body for _, body in self.responses or [] if body.get("status") != "assigning"]
        assert done, f"{self.registration_id}: the device received no final response: {self.responses!r}"
        return done[-1]


def sdk_register_recording(server, devices: list, *, websockets: bool = False) -> dict:
    """Register several devices concurrently with the official SDK (MQTT by default) and record
    what each one received. `devices`: (registration_id, key, payload or None). Returns
    {registration_id: SdkOutcome}; registration failures are recorded, not raised (a timeout
    still fails the test)."""
    import ast
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    received: dict = {reg_id: [] for reg_id, _, _ in devices}
    lock = threading.Lock()

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = _SDK_RESPONSE.match(record.getMessage())
            if not m:
                return
            try:
                body = json.loads(ast.literal_eval(m.group("payload")).decode("utf-8"))
            except (ValueError, SyntaxError, UnicodeDecodeError):
                return
            reg_id = (body.get("registrationState") or {}).get("registrationId") if isinstance(body, dict) else None
            with lock:
                if reg_id in received:
                    received[reg_id].append((int(m.group("status")), body))

    logger = logging.getLogger(_SDK_MQTT_LOGGER)
    recorder = Recorder(level=logging.DEBUG)
    previous_level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)

    def one(reg_id: str, key: str, payload: Any) -> SdkOutcome:
        outcome = SdkOutcome(reg_id)
        try:
            kwargs = {} if payload is None else {"payload": payload}
            outcome.result = sdk_register(server, reg_id, key, websockets=websockets, **kwargs)
        except AssertionError:
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to assert on
            outcome.error = exc
        return outcome

    try:
        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            futures = {reg_id: pool.submit(one, reg_id, key, payload) for reg_id, key, payload in devices}
            outcomes = {reg_id: future.result() for reg_id, future in futures.items()}
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(previous_level)
    for reg_id, outcome in outcomes.items():
        outcome.responses = list(received[reg_id])
    return outcomes
