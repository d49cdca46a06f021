//! Shared access policies (Berth's own resource, right ServiceConfig): list, create or
//! change rights, regenerate a key, delete. Keys are returned, as Azure's list-keys does.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Call, Reply, ServiceState};
use crate::error::{NotFoundKind, ServiceError};
use crate::model::access::{generate_policy_key, AccessPolicy, Rights};
use crate::store::AccessPolicyRow;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyInput {
    key_name: Option<String>,
    rights: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
    #[allow(dead_code)]
    etag: Option<String>,
    #[allow(dead_code)]
    created_date_time_utc: Option<String>,
    #[allow(dead_code)]
    last_updated_date_time_utc: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegenerateInput {
    key_type: String,
}

fn to_json(row: &AccessPolicyRow) -> Value {
    json!({
        "keyName": row.policy.name,
        "rights": row.policy.rights.to_string(),
        "primaryKey": row.policy.primary_key,
        "secondaryKey": row.policy.secondary_key,
        "etag": row.etag,
        "createdDateTimeUtc": row.created,
        "lastUpdatedDateTimeUtc": row.updated,
    })
}

fn check_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        return Err(ServiceError::invalid(
            "a policy name is 1 to 64 alphanumerics, '-', '.' or '_'",
        ));
    }
    Ok(())
}

fn check_key(field: &str, key: &str) -> Result<String, ServiceError> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(key.trim()) {
        Ok(bytes) if (16..=64).contains(&bytes.len()) => Ok(key.trim().to_owned()),
        _ => Err(ServiceError::invalid(format!(
            "{field} must be Base64 of 16 to 64 bytes"
        ))),
    }
}

async fn load(state: &ServiceState, name: &str) -> Result<AccessPolicyRow, ServiceError> {
    state
        .store
        .access_policy(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(NotFoundKind::AccessPolicy, name))
}

pub(super) async fn list(state: &ServiceState) -> Result<Reply, ServiceError> {
    let rows = state.store.access_policies().await?;
    Ok(Reply::ok(Value::Array(rows.iter().map(to_json).collect())))
}

pub(super) async fn get(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    Ok(Reply::ok(to_json(&load(state, name).await?)))
}

pub(super) async fn put(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    check_name(name)?;
    let input: PolicyInput = call.json()?;
    if input
        .key_name
        .as_deref()
        .is_some_and(|k| !k.eq_ignore_ascii_case(name))
    {
        return Err(ServiceError::invalid(
            "keyName in the body does not match the name in the path",
        ));
    }
    let rights = Rights::parse(&input.rights).map_err(ServiceError::invalid)?;
    let primary = input
        .primary_key
        .as_deref()
        .map(|k| check_key("primaryKey", k))
        .transpose()?;
    let secondary = input
        .secondary_key
        .as_deref()
        .map(|k| check_key("secondaryKey", k))
        .transpose()?;
    let existing = state.store.access_policy(name).await?;
    if let Some(wanted) = call.if_match() {
        if !existing
            .as_ref()
            .is_some_and(|row| crate::store::etag_matches(wanted, &row.etag))
        {
            return Err(ServiceError::PreconditionFailed(name.to_owned()));
        }
    }
    match existing {
        None => {
            let policy = AccessPolicy {
                name: name.to_owned(),
                rights,
                primary_key: primary.unwrap_or_else(generate_policy_key),
                secondary_key: secondary.unwrap_or_else(generate_policy_key),
            };
            if !state.store.insert_access_policy(&policy).await? {
                return Err(ServiceError::Conflict(format!(
                    "policy '{name}' was created concurrently"
                )));
            }
        }
        Some(row) => {
            if row
                .policy
                .rights
                .contains(crate::model::access::Right::ServiceConfig)
                && !rights.contains(crate::model::access::Right::ServiceConfig)
            {
                let others = state.store.access_policies().await?;
                let admins = others
                    .iter()
                    .filter(|p| {
                        p.policy
                            .rights
                            .contains(crate::model::access::Right::ServiceConfig)
                    })
                    .count();
                if admins <= 1 {
                    return Err(ServiceError::Conflict(format!(
                        "'{name}' is the last policy with ServiceConfig; it keeps that right"
                    )));
                }
            }
            let policy = AccessPolicy {
                name: row.policy.name.clone(),
                rights,
                primary_key: primary.unwrap_or(row.policy.primary_key.clone()),
                secondary_key: secondary.unwrap_or(row.policy.secondary_key.clone()),
            };
            if !state.store.update_access_policy(&policy, &row.etag).await? {
                return Err(ServiceError::Conflict(format!(
                    "policy '{name}' was changed concurrently"
                )));
            }
        }
    }
    Ok(Reply::ok(to_json(&load(state, name).await?)))
}

pub(super) async fn regenerate(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let row = load(state, name).await?;
    if let Some(wanted) = call.if_match() {
        if !crate::store::etag_matches(wanted, &row.etag) {
            return Err(ServiceError::PreconditionFailed(name.to_owned()));
        }
    }
    let input: RegenerateInput = call.json()?;
    let mut policy = row.policy.clone();
    match input.key_type.to_ascii_lowercase().as_str() {
        "primary" => policy.primary_key = generate_policy_key(),
        "secondary" => policy.secondary_key = generate_policy_key(),
        other => {
            return Err(ServiceError::invalid(format!(
                "keyType '{other}' must be primary or secondary"
            )))
        }
    }
    if !state.store.update_access_policy(&policy, &row.etag).await? {
        return Err(ServiceError::Conflict(format!(
            "policy '{name}' was changed concurrently"
        )));
    }
    Ok(Reply::ok(to_json(&load(state, name).await?)))
}

pub(super) async fn delete(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    if let Some(wanted) = call.if_match() {
        let row = load(state, name).await?;
        if !crate::store::etag_matches(wanted, &row.etag) {
            return Err(ServiceError::PreconditionFailed(name.to_owned()));
        }
    }
    state.store.delete_access_policy(name).await?;
    Ok(Reply::no_content())
}
