//! Registration states: get, delete, query by enrollment group (seed REC-06..08).

use serde_json::Value;

use super::{page_reply, page_size, Call, Reply, ServiceState};
use crate::error::{NotFoundKind, ServiceError};

pub(super) async fn get(state: &ServiceState, id: &str) -> Result<Reply, ServiceError> {
    let record = state
        .store
        .registration(id)
        .await?
        .ok_or_else(|| ServiceError::not_found(NotFoundKind::Registration, id))?;
    Ok(Reply::ok(
        serde_json::to_value(record.state).unwrap_or(Value::Null),
    ))
}

/// Removes the record only; the hub device stays (wire-protocol.md §8.2).
pub(super) async fn delete(
    state: &ServiceState,
    id: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    state.store.delete_registration(id, call.if_match()).await?;
    Ok(Reply::no_content())
}

pub(super) async fn query(
    state: &ServiceState,
    group_id: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    // The SDKs differ in whether they send a query body; it carries nothing this needs, but
    // what is sent must still be JSON.
    if !call.body.iter().all(u8::is_ascii_whitespace) {
        let _: Value = call.json()?;
    }
    let size = page_size(call)?;
    let after = super::continuation(call)?;
    let page = state
        .store
        .query_registrations(group_id, size, after.as_deref())
        .await?;
    let items = page
        .items
        .into_iter()
        .map(|r| serde_json::to_value(r.state).unwrap_or(Value::Null))
        .collect();
    Ok(page_reply(
        items,
        "deviceRegistration",
        size,
        page.continuation,
    ))
}
