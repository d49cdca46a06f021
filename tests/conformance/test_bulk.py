"""Bulk operations on enrollments and enrollment groups (all-or-nothing per batch)."""

import pytest
from azure.core.exceptions import ResourceNotFoundError

from helpers import unique_id


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
