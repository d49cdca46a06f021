"""Device registration states (records are written by device registration; here: none exist yet)."""

import pytest
from azure.core.exceptions import ResourceNotFoundError

from helpers import assert_dps_error, raw, unique_id


def test_get_unknown_registration_state_returns_404(client):
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.device_registration_state.get(unique_id("reg-unknown"))
    assert_dps_error(exc_info.value, 404)


def test_delete_unknown_registration_state_returns_404(client):
    with pytest.raises(ResourceNotFoundError) as exc_info:
        client.device_registration_state.delete(unique_id("reg-unknown"))
    assert_dps_error(exc_info.value, 404)


def test_query_registration_states_of_a_fresh_group_returns_empty_list(client):
    group_id = unique_id("reg-grp")
    client.enrollment_group.create_or_update(
        group_id, {"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}}
    )

    assert list(client.device_registration_state.query(group_id)) == []

    # On the wire: 200, a JSON array (never null or empty body), the item-type header, no continuation.
    r = raw(client, "POST", f"/registrations/{group_id}/query", json_body={"query": "SELECT * FROM registrations"})
    assert r.status_code == 200, r.text()
    assert r.json() == []
    assert r.headers.get("x-ms-item-type") == "deviceRegistration"
    assert "x-ms-continuation" not in r.headers
