"""Bulk operations on enrollments and enrollment groups (all-or-nothing per batch)."""

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from helpers import assert_dps_error, unique_id


def _sym(reg_id):
    return {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}}


def _sym_group(group_id):
    return {"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}}


def _assert_error_item(error, id_field, expected_id):
    assert error[id_field] == expected_id, error
    assert isinstance(error["errorCode"], int) and not isinstance(error["errorCode"], bool), error
    assert error["errorCode"] // 1000 == 409, f"creating an existing item is a conflict: {error}"
    assert isinstance(error["errorStatus"], str) and error["errorStatus"], error


def test_bulk_create_enrollments_succeeds_and_writes_all(client):
    ids = [unique_id("bulk-c") for _ in range(3)]

    result = client.enrollment.run_bulk_operation({"mode": "create", "enrollments": [_sym(i) for i in ids]})

    assert result["isSuccessful"] is True
    assert not result.get("errors")
    for reg_id in ids:
        assert client.enrollment.get(reg_id)["registrationId"] == reg_id


def test_bulk_create_with_an_existing_enrollment_fails_and_writes_nothing(client):
    existing = unique_id("bulk-exist")
    client.enrollment.create_or_update(existing, {**_sym(existing), "deviceId": "original"})
    fresh = [unique_id("bulk-fresh") for _ in range(2)]

    result = client.enrollment.run_bulk_operation(
        {"mode": "create", "enrollments": [_sym(fresh[0]), {**_sym(existing), "deviceId": "changed"}, _sym(fresh[1])]}
    )

    assert result["isSuccessful"] is False
    errors = result["errors"]
    assert len(errors) == 1, errors
    _assert_error_item(errors[0], "registrationId", existing)
    for reg_id in fresh:
        with pytest.raises(ResourceNotFoundError):
            client.enrollment.get(reg_id)
    assert client.enrollment.get(existing)["deviceId"] == "original"


def test_bulk_delete_removes_enrollments(client):
    ids = [unique_id("bulk-d") for _ in range(3)]
    assert client.enrollment.run_bulk_operation({"mode": "create", "enrollments": [_sym(i) for i in ids]})["isSuccessful"]

    result = client.enrollment.run_bulk_operation({"mode": "delete", "enrollments": [_sym(i) for i in ids]})

    assert result["isSuccessful"] is True
    for reg_id in ids:
        with pytest.raises(ResourceNotFoundError):
            client.enrollment.get(reg_id)


def test_bulk_update_creates_or_replaces_enrollments(client):
    existing, new = unique_id("bulk-u"), unique_id("bulk-u")
    client.enrollment.create_or_update(existing, _sym(existing))

    result = client.enrollment.run_bulk_operation(
        {"mode": "update", "enrollments": [{**_sym(existing), "deviceId": "u1"}, {**_sym(new), "deviceId": "u2"}]}
    )

    assert result["isSuccessful"] is True
    assert client.enrollment.get(existing)["deviceId"] == "u1"
    assert client.enrollment.get(new)["deviceId"] == "u2"


def test_bulk_create_groups_then_conflict_then_delete(client):
    ids = [unique_id("bulk-g") for _ in range(3)]

    created = client.enrollment_group.run_bulk_operation(
        {"mode": "create", "enrollmentGroups": [_sym_group(i) for i in ids]}
    )
    assert created["isSuccessful"] is True
    for group_id in ids:
        assert client.enrollment_group.get(group_id)["enrollmentGroupId"] == group_id

    fresh = unique_id("bulk-gfresh")
    conflict = client.enrollment_group.run_bulk_operation(
        {"mode": "create", "enrollmentGroups": [_sym_group(fresh), _sym_group(ids[1])]}
    )
    assert conflict["isSuccessful"] is False
    assert len(conflict["errors"]) == 1, conflict
    _assert_error_item(conflict["errors"][0], "enrollmentGroupId", ids[1])
    with pytest.raises(ResourceNotFoundError):
        client.enrollment_group.get(fresh)

    deleted = client.enrollment_group.run_bulk_operation(
        {"mode": "delete", "enrollmentGroups": [_sym_group(i) for i in ids]}
    )
    assert deleted["isSuccessful"] is True
    for group_id in ids:
        with pytest.raises(ResourceNotFoundError):
            client.enrollment_group.get(group_id)


def test_bulk_update_if_match_etag_with_stale_etag_fails_and_writes_nothing(client):
    a, b = unique_id("bulk-im"), unique_id("bulk-im")
    ea = client.enrollment.create_or_update(a, _sym(a))
    eb = client.enrollment.create_or_update(b, _sym(b))
    client.enrollment.create_or_update(b, {**_sym(b), "deviceId": "moved-on"})  # eb["etag"] is now stale

    result = client.enrollment.run_bulk_operation(
        {
            "mode": "updateIfMatchETag",
            "enrollments": [
                {**_sym(a), "deviceId": "new-a", "etag": ea["etag"]},
                {**_sym(b), "deviceId": "new-b", "etag": eb["etag"]},
            ],
        }
    )

    assert result["isSuccessful"] is False
    assert [e["registrationId"] for e in result["errors"]] == [b]
    assert result["errors"][0]["errorCode"] // 1000 == 412
    assert client.enrollment.get(a).get("deviceId") != "new-a"
    assert client.enrollment.get(b)["deviceId"] == "moved-on"


def test_bulk_update_if_match_etag_with_current_etags_succeeds(client):
    a = unique_id("bulk-imok")
    ea = client.enrollment.create_or_update(a, _sym(a))

    result = client.enrollment.run_bulk_operation(
        {"mode": "updateIfMatchETag", "enrollments": [{**_sym(a), "deviceId": "new-a", "etag": ea["etag"]}]}
    )

    assert result["isSuccessful"] is True
    assert client.enrollment.get(a)["deviceId"] == "new-a"


def test_bulk_with_more_than_10_items_returns_400_and_writes_nothing(client):
    ids = [unique_id("bulk-11") for _ in range(11)]
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.run_bulk_operation({"mode": "create", "enrollments": [_sym(i) for i in ids]})
    assert_dps_error(exc_info.value, 400)
    for reg_id in ids:
        with pytest.raises(ResourceNotFoundError):
            client.enrollment.get(reg_id)


def test_bulk_with_unknown_mode_returns_400(client):
    reg_id = unique_id("bulk-mode")
    with pytest.raises(HttpResponseError) as exc_info:
        client.enrollment.run_bulk_operation({"mode": "upsertEverything", "enrollments": [_sym(reg_id)]})
    assert_dps_error(exc_info.value, 400)


def test_bulk_with_an_invalid_item_writes_nothing(client):
    good, bad = unique_id("bulk-good"), unique_id("bulk-bad")
    items = [_sym(good), {"registrationId": bad, "attestation": {"type": "tpm", "tpm": {"endorsementKey": "%%%"}}}]

    try:
        result = client.enrollment.run_bulk_operation({"mode": "create", "enrollments": items})
    except HttpResponseError as exc:
        assert_dps_error(exc, 400)
    else:
        assert result["isSuccessful"] is False
        assert [e["registrationId"] for e in result["errors"]] == [bad]
    for reg_id in (good, bad):
        with pytest.raises(ResourceNotFoundError):
            client.enrollment.get(reg_id)
