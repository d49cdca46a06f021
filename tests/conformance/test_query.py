"""Query with paging (x-ms-max-item-count / x-ms-continuation) and WHERE filters."""

import math

import pytest
from azure.core.exceptions import HttpResponseError

from helpers import assert_dps_error, raw, unique_id

PAGE = 3


def _sym(reg_id, **extra):
    return {"registrationId": reg_id, "attestation": {"type": "symmetricKey"}, **extra}


def _sym_group(group_id, **extra):
    return {"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}, **extra}


def _pages(paged):
    return [list(page) for page in paged.by_page()]


def test_enrollment_query_pages_through_all_results(client):
    ids = {unique_id("q-page") for _ in range(7)}
    for reg_id in ids:
        client.enrollment.create_or_update(reg_id, _sym(reg_id))

    pages = _pages(client.enrollment.query({"query": "SELECT * FROM enrollments"}, top=PAGE))
    items = [e["registrationId"] for page in pages for e in page]

    assert ids <= set(items), f"missing: {ids - set(items)}"
    assert len(items) == len(set(items)), "an enrollment was returned twice across pages"
    assert all(0 < len(page) <= PAGE for page in pages), [len(p) for p in pages]
    assert len(pages) == math.ceil(len(items) / PAGE)

    # The same set without a page size.
    unpaged = [e["registrationId"] for e in client.enrollment.query({"query": "SELECT * FROM enrollments"})]
    assert sorted(unpaged) == sorted(items)


def test_enrollment_group_query_pages_through_all_results(client):
    ids = {unique_id("q-gpage") for _ in range(7)}
    for group_id in ids:
        client.enrollment_group.create_or_update(group_id, _sym_group(group_id))

    pages = _pages(client.enrollment_group.query({"query": "SELECT * FROM enrollmentGroups"}, top=PAGE))
    items = [g["enrollmentGroupId"] for page in pages for g in page]

    assert ids <= set(items), f"missing: {ids - set(items)}"
    assert len(items) == len(set(items))
    assert all(0 < len(page) <= PAGE for page in pages), [len(p) for p in pages]
    assert len(pages) == math.ceil(len(items) / PAGE)


def test_query_response_headers_item_type_and_continuation_only_when_more(client):
    for _ in range(4):
        reg_id = unique_id("q-hdr")
        client.enrollment.create_or_update(reg_id, _sym(reg_id))

    headers = {"x-ms-max-item-count": "2"}
    seen = []
    token = None
    for _ in range(1000):
        if token:
            headers["x-ms-continuation"] = token
        r = raw(client, "POST", "/enrollments/query", json_body={"query": "SELECT * FROM enrollments"}, headers=headers)
        assert r.status_code == 200, r.text()
        assert r.headers.get("x-ms-item-type") == "enrollment"
        body = r.json()
        assert isinstance(body, list) and len(body) <= 2
        seen += [e["registrationId"] for e in body]
        token = r.headers.get("x-ms-continuation")
        if not token:
            break
        assert body, "a page with a continuation token must not be empty"
    assert token is None
    assert len(seen) >= 4 and len(seen) == len(set(seen))

    r = raw(client, "POST", "/enrollmentGroups/query", json_body={"query": "SELECT * FROM enrollmentGroups"})
    assert r.status_code == 200
    assert r.headers.get("x-ms-item-type") == "enrollmentGroup"


def test_enrollment_query_where_provisioning_status_filters(client):
    disabled = {unique_id("q-dis") for _ in range(2)}
    enabled = {unique_id("q-en") for _ in range(2)}
    for reg_id in disabled:
        client.enrollment.create_or_update(reg_id, _sym(reg_id, provisioningStatus="disabled"))
    for reg_id in enabled:
        client.enrollment.create_or_update(reg_id, _sym(reg_id))

    result = list(
        client.enrollment.query({"query": "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'"}, top=PAGE)
    )

    ids = {e["registrationId"] for e in result}
    assert disabled <= ids
    assert not (enabled & ids)
    assert all(e["provisioningStatus"] == "disabled" for e in result)


def test_enrollment_group_query_where_provisioning_status_filters(client):
    disabled, enabled = unique_id("q-gdis"), unique_id("q-gen")
    client.enrollment_group.create_or_update(disabled, _sym_group(disabled, provisioningStatus="disabled"))
    client.enrollment_group.create_or_update(enabled, _sym_group(enabled))

    result = list(
        client.enrollment_group.query({"query": "SELECT * FROM enrollmentGroups WHERE provisioningStatus = 'enabled'"})
    )

    ids = {g["enrollmentGroupId"] for g in result}
    assert enabled in ids and disabled not in ids
    assert all(g["provisioningStatus"] == "enabled" for g in result)


@pytest.mark.parametrize("quote", ["'", '"', "`"])
def test_where_accepts_single_double_and_backtick_string_delimiters(client, quote):
    reg_id = unique_id("q-quote")
    client.enrollment.create_or_update(reg_id, _sym(reg_id, deviceId=reg_id + "-dev"))

    query = f"select * from enrollments where deviceId = {quote}{reg_id}-dev{quote}"
    result = list(client.enrollment.query({"query": query}))

    assert [e["registrationId"] for e in result] == [reg_id]


def test_unsupported_query_returns_400(client):
    with pytest.raises(HttpResponseError) as exc_info:
        list(client.enrollment.query({"query": "DELETE FROM enrollments"}))
    assert_dps_error(exc_info.value, 400)


def test_query_echoes_the_page_size_header(client):
    r = raw(
        client,
        "POST",
        "/enrollments/query",
        json_body={"query": "SELECT * FROM enrollments"},
        headers={"x-ms-max-item-count": "5"},
    )
    assert r.status_code == 200
    assert r.headers.get("x-ms-max-item-count") == "5"


def test_forged_continuation_token_returns_400(client):
    r = raw(
        client,
        "POST",
        "/enrollments/query",
        json_body={"query": "SELECT * FROM enrollments"},
        headers={"x-ms-continuation": "not-a-token-the-server-issued!!"},
    )
    assert_dps_error(r, 400)
