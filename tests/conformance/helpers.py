"""Shared helpers for the Berth conformance suite (no pytest fixtures here; see conftest.py).

Everything in this module is plain Python so that test files can import it directly:
`from helpers import ...`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import struct
import uuid
from dataclasses import dataclass
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
