"""Berth's linked-hub routes and the rule that an enrollment may only name linked hubs."""

import pytest
from azure.core.exceptions import HttpResponseError

from helpers import assert_dps_error, hub_connection_string, raw, unique_id


def _static(reg_id, hubs):
    return {
        "registrationId": reg_id,
        "attestation": {"type": "symmetricKey"},
        "allocationPolicy": "static",
        "iotHubs": hubs,
    }


def test_link_get_list_and_unlink_a_hub(client):
    host = f"{unique_id('hublnk')}.azure-devices.net"
    body = {
        "connectionString": hub_connection_string(host),
        "allocationWeight": 1,
        "applyAllocationPolicy": True,
        "location": "west",
    }
    r = raw(client, "PUT", f"/linkedHubs/{host}", json_body=body)
    assert r.status_code in (200, 201), r.text()

    r = raw(client, "GET", f"/linkedHubs/{host}")
    assert r.status_code == 200, r.text()
    assert host in r.text()

    r = raw(client, "GET", "/linkedHubs")
    assert r.status_code == 200, r.text()
    assert host in r.text()

    r = raw(client, "DELETE", f"/linkedHubs/{host}")
    assert r.status_code in (200, 204), r.text()
    r = raw(client, "GET", f"/linkedHubs/{host}")
    assert_dps_error(r, 404)


def test_link_a_hub_by_host_name_only(client):
    host = f"{unique_id('hubname')}.azure-devices.net"
    r = raw(client, "PUT", f"/linkedHubs/{host}", json_body={})
    assert r.status_code in (200, 201), r.text()
    try:
        assert raw(client, "GET", f"/linkedHubs/{host}").status_code == 200
    finally:
        raw(client, "DELETE", f"/linkedHubs/{host}")


def test_unlinked_hub_in_path_returns_404(client):
    assert_dps_error(raw(client, "GET", f"/linkedHubs/{unique_id('nohub')}.azure-devices.net"), 404)


def test_static_allocation_to_an_unlinked_hub_returns_400_and_writes_nothing(client):
    reg_id = unique_id("static-bad")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _static(reg_id, ["nothere.azure-devices.net"]))
    assert_dps_error(exc_info.value, 400)

    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.get(reg_id)
    assert exc_info.value.status_code == 404


def test_static_allocation_to_a_linked_hub_returns_200(client, linked_hub):
    reg_id = unique_id("static-ok")
    created = client.enrollment.create_or_update(reg_id, _static(reg_id, [linked_hub]))

    assert created["allocationPolicy"] == "static"
    assert created["iotHubs"] == [linked_hub]
    got = client.enrollment.get(reg_id)
    assert got["allocationPolicy"] == "static"
    assert got["iotHubs"] == [linked_hub]


def test_group_naming_an_unlinked_hub_returns_400(client):
    group_id = unique_id("static-grp")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment_group.create_or_update(
            group_id,
            {
                "enrollmentGroupId": group_id,
                "attestation": {"type": "symmetricKey"},
                "allocationPolicy": "static",
                "iotHubs": ["nothere.azure-devices.net"],
            },
        )
    assert_dps_error(exc_info.value, 400)


def test_iot_hub_host_name_must_be_a_linked_hub(client, linked_hub):
    bad = unique_id("hubhost-bad")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(
            bad,
            {"registrationId": bad, "attestation": {"type": "symmetricKey"}, "iotHubHostName": "nothere.azure-devices.net"},
        )
    assert_dps_error(exc_info.value, 400)

    good = unique_id("hubhost-ok")
    created = client.enrollment.create_or_update(
        good, {"registrationId": good, "attestation": {"type": "symmetricKey"}, "iotHubHostName": linked_hub}
    )
    assert created["iotHubHostName"] == linked_hub


def test_iot_hubs_mixing_linked_and_unlinked_hubs_returns_400(client, linked_hub):
    reg_id = unique_id("static-mixed")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.create_or_update(reg_id, _static(reg_id, [linked_hub, "nothere.azure-devices.net"]))
    assert_dps_error(exc_info.value, 400)


def test_linked_hub_responses_do_not_reveal_the_hub_key(client):
    host = f"{unique_id('hubsecret')}.azure-devices.net"
    cs = hub_connection_string(host)
    key = cs.split("SharedAccessKey=", 1)[1]
    r = raw(client, "PUT", f"/linkedHubs/{host}", json_body={"connectionString": cs, "location": "west"})
    assert r.status_code in (200, 201), r.text()
    try:
        assert key not in r.text()
        assert key not in raw(client, "GET", f"/linkedHubs/{host}").text()
        assert key not in raw(client, "GET", "/linkedHubs").text()
    finally:
        raw(client, "DELETE", f"/linkedHubs/{host}")
