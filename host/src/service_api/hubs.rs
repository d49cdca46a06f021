//! Linked hubs (Berth's own resource, right ServiceConfig): link by connection string or by
//! host name, with `allocationWeight`, `applyAllocationPolicy` and a location label.
//! A PUT merges: fields it omits keep their stored values (or defaults on creation), and a
//! connection string whose key is masked (`*****`, as reads return it) keeps the stored key.

use serde::Deserialize;
use serde_json::Value;

use super::{Call, Reply, ServiceState, MAX_LINKED_HUBS};
use crate::error::{NotFoundKind, ServiceError};
use crate::hubs::{HubConnectionString, LinkedHub, LinkedHubView};
use crate::model::names::check_host_name;
use crate::store::{etag_matches, LinkedHubRow};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LinkedHubInput {
    name: Option<String>,
    connection_string: Option<String>,
    allocation_weight: Option<i64>,
    apply_allocation_policy: Option<bool>,
    location: Option<String>,
    #[allow(dead_code)]
    etag: Option<String>,
    #[allow(dead_code)]
    driver: Option<String>,
    #[allow(dead_code)]
    created_date_time_utc: Option<String>,
    #[allow(dead_code)]
    last_updated_date_time_utc: Option<String>,
}

pub(crate) fn view(row: &LinkedHubRow) -> LinkedHubView {
    LinkedHubView {
        name: row.hub.name.clone(),
        connection_string: row
            .hub
            .connection_string
            .as_deref()
            .and_then(|cs| HubConnectionString::parse(cs).ok())
            .map(|cs| cs.masked()),
        allocation_weight: row.hub.allocation_weight,
        apply_allocation_policy: row.hub.apply_allocation_policy,
        location: row.hub.location.clone(),
        driver: row.hub.driver(),
        etag: row.etag.clone(),
        created_date_time_utc: row.created.clone(),
        last_updated_date_time_utc: row.updated.clone(),
    }
}

fn to_json(row: &LinkedHubRow) -> Value {
    serde_json::to_value(view(row)).unwrap_or(Value::Null)
}

pub(super) async fn list(state: &ServiceState) -> Result<Reply, ServiceError> {
    let rows = state.store.linked_hubs().await?;
    Ok(Reply::ok(Value::Array(rows.iter().map(to_json).collect())))
}

pub(super) async fn get(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    let row = state
        .store
        .linked_hub(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(NotFoundKind::LinkedHub, name))?;
    Ok(Reply::ok(to_json(&row)))
}

pub(super) async fn put(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let input: LinkedHubInput = if call.body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_str("{}").map_err(|e| invalid(e.to_string()))?
    } else {
        call.json()?
    };
    check_host_name("the hub name", name).map_err(invalid)?;
    if let Some(body_name) = &input.name {
        if !body_name.eq_ignore_ascii_case(name) {
            return Err(invalid(format!(
                "name '{body_name}' in the body does not match '{name}' in the path"
            )));
        }
    }
    if let Some(weight) = input.allocation_weight {
        if !(1..=1000).contains(&weight) {
            return Err(invalid("allocationWeight must be from 1 to 1000"));
        }
    }
    if let Some(location) = &input.location {
        if location.is_empty() || location.len() > 64 || location.chars().any(char::is_control) {
            return Err(invalid("location must be 1 to 64 printable characters"));
        }
    }
    let existing = state.store.linked_hub(name).await?;
    if let Some(wanted) = call.if_match() {
        match &existing {
            Some(row) if etag_matches(wanted, &row.etag) => {}
            _ => return Err(ServiceError::PreconditionFailed(name.to_owned())),
        }
    }
    let connection_string = match input.connection_string.as_deref() {
        None => existing
            .as_ref()
            .and_then(|row| row.hub.connection_string.clone()),
        Some(text) => {
            if text.to_ascii_lowercase().contains("sharedaccesskey=*****") {
                // A read sent back: keep the stored key, but only for the same key name and hub.
                let stored = existing
                    .as_ref()
                    .and_then(|row| row.hub.connection_string.as_deref())
                    .and_then(|cs| HubConnectionString::parse(cs).ok())
                    .ok_or_else(|| {
                        invalid("connectionString has a masked key and no key is stored to keep")
                    })?;
                if !stored.masked().eq_ignore_ascii_case(text.trim()) {
                    return Err(invalid(
                        "a masked connectionString can only keep the stored key: send the full connection string to change it",
                    ));
                }
                existing
                    .as_ref()
                    .and_then(|row| row.hub.connection_string.clone())
            } else {
                let parsed = HubConnectionString::parse(text)
                    .map_err(|why| invalid(format!("connectionString: {why}")))?;
                if !parsed.host_name.eq_ignore_ascii_case(name) {
                    return Err(invalid(format!(
                        "the connection string is for '{}', not for '{name}'",
                        parsed.host_name
                    )));
                }
                Some(text.trim().to_owned())
            }
        }
    };
    let previous = existing.as_ref().map(|row| &row.hub);
    let hub = LinkedHub {
        name: previous.map_or_else(|| name.to_owned(), |p| p.name.clone()),
        connection_string,
        allocation_weight: input
            .allocation_weight
            .or(previous.map(|p| p.allocation_weight))
            .unwrap_or(1),
        apply_allocation_policy: input
            .apply_allocation_policy
            .or(previous.map(|p| p.apply_allocation_policy))
            .unwrap_or(true),
        location: input
            .location
            .or_else(|| previous.and_then(|p| p.location.clone())),
    };
    let written = state
        .store
        .put_linked_hub(
            &hub,
            existing.as_ref().map(|row| row.etag.as_str()),
            MAX_LINKED_HUBS,
        )
        .await?
        .ok_or_else(|| {
            ServiceError::Conflict(format!("hub '{name}' was changed concurrently; try again"))
        })?;
    Ok(Reply::ok(to_json(&written)))
}

pub(super) async fn delete(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    state.store.delete_linked_hub(name, call.if_match()).await?;
    Ok(Reply::no_content())
}

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(message)
}

/// What the `record` driver wrote for a device: identity (with keys) and twin.
pub(super) async fn device(
    state: &ServiceState,
    name: &str,
    device_id: &str,
) -> Result<Reply, ServiceError> {
    let row = state
        .store
        .hub_device(name, device_id)
        .await?
        .ok_or_else(|| ServiceError::not_found(NotFoundKind::HubDevice, device_id))?;
    Ok(Reply::ok(serde_json::json!({
        "deviceId": row.identity.device_id,
        "authentication": row.identity.authentication(),
        "capabilities": {"iotEdge": row.identity.iot_edge},
        "twin": row.twin,
        "etag": row.etag,
        "createdDateTimeUtc": row.created,
        "lastUpdatedDateTimeUtc": row.updated,
    })))
}
