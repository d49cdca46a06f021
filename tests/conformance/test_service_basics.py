"""The server's own surface: health endpoints, connection string, TLS, api-version tolerance."""

import base64
import re

import requests

from helpers import raw, unique_id


def test_healthz_and_readyz_answer_200_without_auth(berth):
    for path in ("/healthz", "/readyz"):
        r = requests.get(f"{berth.base_url}{path}", verify=str(berth.ca_path), timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text)


def test_connection_string_names_localhost_port_and_the_owner_policy(berth):
    m = re.fullmatch(
        r"HostName=localhost:(\d+);SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=([A-Za-z0-9+/=]+)",
        berth.connection_string,
    )
    assert m, berth.connection_string
    assert int(m.group(1)) == berth.port
    assert len(base64.b64decode(m.group(2), validate=True)) >= 16


def test_server_certificate_is_issued_by_the_data_dir_ca_for_127_0_0_1(berth):
    # requests verifies the chain against ca.pem and the name against the certificate's SANs.
    r = requests.get(f"https://127.0.0.1:{berth.port}/healthz", verify=str(berth.ca_path), timeout=10)
    assert r.status_code == 200


def test_older_api_versions_are_accepted(client):
    reg_id = unique_id("apiver")
    client.enrollment.create_or_update(reg_id, {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}})
    for version in ("2019-03-31", "2018-04-01", "2017-11-15"):
        r = raw(client, "GET", f"/enrollments/{reg_id}", params={"api-version": version})
        assert r.status_code == 200, (version, r.status_code, r.text())
        assert r.json()["registrationId"] == reg_id


def test_secondary_key_connection_string_is_accepted(berth):
    lines = [line for line in berth.run_cli("connection-string", "--secondary").splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0] != berth.connection_string
    assert lines[0].startswith(f"HostName=localhost:{berth.port};SharedAccessKeyName=provisioningserviceowner;")
    secondary = berth.make_client(lines[0])
    try:
        assert isinstance(list(secondary.enrollment.query({"query": "SELECT * FROM enrollments"}, top=1)), list)
    finally:
        secondary.close()
