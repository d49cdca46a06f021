//! Individual enrollments and enrollment groups: one set of handlers for both kinds.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{page_reply, page_size, Call, Reply, ServiceState};
use crate::error::{NotFoundKind, ServiceError};
use crate::model::enrollment::{self, validate, Enrollment, EnrollmentKind, ValidEnrollment};
use crate::store::{BulkWrite, EnrollmentRow};

/// At most this many items in one bulk operation (wire-protocol.md §8.5).
const MAX_BULK_ITEMS: usize = 10;

fn not_found(kind: EnrollmentKind, id: &str) -> ServiceError {
    let what = match kind {
        EnrollmentKind::Individual => NotFoundKind::Enrollment,
        EnrollmentKind::Group => NotFoundKind::EnrollmentGroup,
    };
    ServiceError::not_found(what, id)
}

/// The lower-cased names of the linked hubs, for validating hub references.
async fn linked_hub_names(state: &ServiceState) -> Result<HashSet<String>, ServiceError> {
    Ok(state
        .store
        .linked_hubs()
        .await?
        .into_iter()
        .map(|row| row.hub.name.to_ascii_lowercase())
        .collect())
}

/// A stored enrollment as reads return it.
async fn view(
    state: &ServiceState,
    kind: EnrollmentKind,
    row: &EnrollmentRow,
) -> Result<Value, ServiceError> {
    let mut doc = enrollment::redacted(&row.document());
    if kind == EnrollmentKind::Individual {
        if let Some(record) = state.store.registration(&row.record.id).await? {
            if record.enrollment_group_id.is_none() {
                doc.registration_state =
                    Some(serde_json::to_value(record.state).unwrap_or(Value::Null));
            }
        }
    }
    Ok(serde_json::to_value(doc).unwrap_or(Value::Null))
}

pub(super) async fn get(
    state: &ServiceState,
    kind: EnrollmentKind,
    id: &str,
) -> Result<Reply, ServiceError> {
    let row = state
        .store
        .enrollment(kind, id)
        .await?
        .ok_or_else(|| not_found(kind, id))?;
    Ok(Reply::ok(view(state, kind, &row).await?))
}

pub(super) async fn put(
    state: &ServiceState,
    kind: EnrollmentKind,
    id: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let input: Enrollment = call.json()?;
    super::policies::check_bindings(state, &input).await?;
    let linked = linked_hub_names(state).await?;
    let is_linked = |hub: &str| linked.contains(&hub.to_ascii_lowercase());
    let (row, _created) = state
        .store
        .put_enrollment(kind, id, call.if_match(), |existing| {
            validate(kind, Some(id), input.clone(), existing, &is_linked)
        })
        .await?;
    // The writer learns generated keys from this answer; certificates are returned as `info`.
    let mut doc = enrollment::redacted(&row.document());
    if let Some(attestation) = doc.attestation.as_mut() {
        if row.record.keys.is_some() {
            attestation.symmetric_key.clone_from(&row.record.keys);
        }
    }
    Ok(Reply::ok(serde_json::to_value(doc).unwrap_or(Value::Null)))
}

pub(super) async fn delete(
    state: &ServiceState,
    kind: EnrollmentKind,
    id: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    state
        .store
        .delete_enrollment(kind, id, call.if_match())
        .await?;
    Ok(Reply::no_content())
}

pub(super) async fn attestation(
    state: &ServiceState,
    kind: EnrollmentKind,
    id: &str,
) -> Result<Reply, ServiceError> {
    let row = state
        .store
        .enrollment(kind, id)
        .await?
        .ok_or_else(|| not_found(kind, id))?;
    let attestation = enrollment::attestation_with_secrets(&row.record);
    Ok(Reply::ok(
        serde_json::to_value(attestation).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
struct QuerySpecification {
    query: String,
}

pub(super) async fn query(
    state: &ServiceState,
    kind: EnrollmentKind,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let spec: QuerySpecification = call.json()?;
    let parsed = super::query::parse(&spec.query, kind.id_field())?;
    let expected = match kind {
        EnrollmentKind::Individual => "enrollments",
        EnrollmentKind::Group => "enrollmentGroups",
    };
    if !parsed.collection.eq_ignore_ascii_case(expected) {
        return Err(ServiceError::invalid(format!(
            "this operation queries '{expected}', not '{}'",
            parsed.collection
        )));
    }
    let size = page_size(call)?;
    let after = super::continuation(call)?;
    let page = state
        .store
        .query_enrollments(kind, &parsed.filters, size, after.as_deref())
        .await?;
    let mut items = Vec::with_capacity(page.items.len());
    for row in &page.items {
        items.push(view(state, kind, row).await?);
    }
    let item_type = match kind {
        EnrollmentKind::Individual => "enrollment",
        EnrollmentKind::Group => "enrollmentGroup",
    };
    Ok(page_reply(items, item_type, size, page.continuation))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkOperation {
    mode: String,
    enrollments: Option<Vec<Value>>,
    enrollment_groups: Option<Vec<Value>>,
}

pub(super) async fn bulk(
    state: &ServiceState,
    kind: EnrollmentKind,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let operation: BulkOperation = call.json()?;
    let (items, field) = match kind {
        EnrollmentKind::Individual => (operation.enrollments, "enrollments"),
        EnrollmentKind::Group => (operation.enrollment_groups, "enrollmentGroups"),
    };
    let items = items
        .ok_or_else(|| ServiceError::invalid(format!("the bulk operation needs '{field}'")))?;
    if items.is_empty() || items.len() > MAX_BULK_ITEMS {
        return Err(ServiceError::invalid(format!(
            "a bulk operation carries 1 to {MAX_BULK_ITEMS} items, found {}",
            items.len()
        )));
    }
    let mode = operation.mode.to_ascii_lowercase();
    if !["create", "update", "updateifmatchetag", "delete"].contains(&mode.as_str()) {
        return Err(ServiceError::invalid(format!(
            "bulk mode '{}' must be create, update, updateIfMatchETag or delete",
            operation.mode
        )));
    }
    let linked = linked_hub_names(state).await?;
    let is_linked = |hub: &str| linked.contains(&hub.to_ascii_lowercase());

    // Parse every item first; an item that cannot even be read fails the batch.
    let mut writes = Vec::new();
    let mut errors: Vec<(String, ServiceError)> = Vec::new();
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    for value in items {
        let id = value
            .get(kind.id_field())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        ids.push(id.clone());
        let parsed: Result<Enrollment, _> = serde_json::from_value(value);
        let item = match parsed {
            Err(error) => Err(ServiceError::invalid(format!("invalid item: {error}"))),
            Ok(input) => {
                let bindings = if mode == "delete" {
                    Ok(())
                } else {
                    super::policies::check_bindings(state, &input).await
                };
                if let Err(error) = bindings {
                    Err(error)
                } else if let Err(why) =
                    crate::model::names::check_registration_id(kind.id_field(), &id)
                {
                    Err(ServiceError::invalid(why))
                } else if !seen.insert(id.to_ascii_lowercase()) {
                    Err(ServiceError::invalid(format!(
                        "'{id}' appears more than once in the batch"
                    )))
                } else {
                    let etag = input.etag.clone();
                    match mode.as_str() {
                        "create" => Ok(BulkWrite::Create(id.clone(), input)),
                        "update" => Ok(BulkWrite::Update(id.clone(), input)),
                        "updateifmatchetag" => match etag {
                            Some(etag) => Ok(BulkWrite::UpdateIfMatch(id.clone(), input, etag)),
                            None => Err(ServiceError::invalid(format!(
                                "'{id}' has no etag for updateIfMatchETag"
                            ))),
                        },
                        _ => Ok(BulkWrite::Delete(id.clone(), etag)),
                    }
                }
            }
        };
        match item {
            Ok(write) => writes.push(write),
            Err(error) => errors.push((id, error)),
        }
    }
    if errors.is_empty() {
        let prepare = |input: &Enrollment, existing: Option<&ValidEnrollment>| {
            validate(kind, None, input.clone(), existing, &is_linked)
        };
        let write_ids: Vec<String> = writes
            .iter()
            .map(|w| match w {
                BulkWrite::Create(id, _)
                | BulkWrite::Update(id, _)
                | BulkWrite::UpdateIfMatch(id, _, _)
                | BulkWrite::Delete(id, _) => id.clone(),
            })
            .collect();
        let failed = state.store.bulk_enrollments(kind, writes, prepare).await?;
        errors.extend(
            failed
                .into_iter()
                .map(|(index, error)| (write_ids.get(index).cloned().unwrap_or_default(), error)),
        );
    }
    let errors: Vec<Value> = errors
        .into_iter()
        .map(|(id, error)| {
            json!({
                kind.id_field(): id,
                "errorCode": error.error_code(),
                "errorStatus": error.to_string(),
            })
        })
        .collect();
    Ok(Reply::ok(
        json!({ "isSuccessful": errors.is_empty(), "errors": errors }),
    ))
}
