//! Policy modules and lookup tables (Berth's own resources, right ServiceConfig): upload an
//! immutable version, list, show (with the enrollments that use it), download, delete (refused
//! while in use), and dry-run a policy on a request without touching any device.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Call, Reply, ServiceState};
use crate::error::ServiceError;
use crate::model::enrollment::{check_policy_name, PolicyRef};
use crate::policy::request::RequestDoc;
use crate::policy::{content_hash, CallContext, Limits, World};
use crate::store::{EnrollmentRow, PolicyVersion};

/// Largest component accepted at all (a policy's own `moduleBytes` may be lower).
pub(super) const MAX_UPLOAD_BYTES: usize = 64 << 20;
/// Largest lookup table.
pub(super) const MAX_TABLE_BYTES: usize = 16 << 20;

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(message)
}

fn query_param<'a>(call: &'a Call, name: &str) -> Option<&'a str> {
    call.query.as_deref()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.eq_ignore_ascii_case(name).then_some(value)
    })
}

fn version_param(call: &Call) -> Result<Option<i64>, ServiceError> {
    query_param(call, "version")
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| invalid(format!("version '{v}' is not a positive number")))
        })
        .transpose()
}

fn limits_from_query(call: &Call) -> Result<Limits, ServiceError> {
    let mut limits = Limits::default();
    for (name, slot) in [
        ("timeoutMs", &mut limits.timeout_ms),
        ("memoryBytes", &mut limits.memory_bytes),
        ("moduleBytes", &mut limits.module_bytes),
        ("inputBytes", &mut limits.input_bytes),
        ("outputBytes", &mut limits.output_bytes),
        ("logBytes", &mut limits.log_bytes),
    ] {
        if let Some(value) = query_param(call, name) {
            *slot = value
                .parse()
                .map_err(|_| invalid(format!("{name} '{value}' is not a number")))?;
        }
    }
    limits.validate().map_err(invalid)?;
    Ok(limits)
}

fn version_json(version: &PolicyVersion) -> Value {
    json!({
        "name": version.name,
        "version": version.version,
        "world": version.world,
        "package": crate::policy::PACKAGE,
        "sha256": version.sha256,
        "size": version.size,
        "limits": serde_json::from_str::<Value>(&version.limits).unwrap_or(Value::Null),
        "createdDateTimeUtc": version.created,
    })
}

/// The enrollment IDs that bind policy `name` (any version).
async fn users_of_policy(state: &ServiceState, name: &str) -> Result<Vec<String>, ServiceError> {
    let rows = state.store.enrollments_mentioning(name).await?;
    Ok(rows
        .iter()
        .filter(|row| binds_policy(row, name))
        .map(enrollment_label)
        .collect())
}

fn binds_policy(row: &EnrollmentRow, name: &str) -> bool {
    let doc = &row.record.doc;
    let matches =
        |text: &str| PolicyRef::parse(text).is_ok_and(|r| r.name.eq_ignore_ascii_case(name));
    let by_url = doc
        .custom_allocation_definition
        .as_ref()
        .and_then(|d| PolicyRef::from_webhook_url(&d.webhook_url))
        .is_some_and(|r| r.is_ok_and(|r| r.name.eq_ignore_ascii_case(name)));
    let by_binding = doc.policy_binding.as_ref().is_some_and(|b| {
        b.allocation.as_deref().is_some_and(matches)
            || b.reprovisioning.as_deref().is_some_and(matches)
    });
    by_url || by_binding
}

fn enrollment_label(row: &EnrollmentRow) -> String {
    if row.record.doc.enrollment_group_id.is_some() {
        format!("enrollmentGroups/{}", row.record.id)
    } else {
        format!("enrollments/{}", row.record.id)
    }
}

pub(super) async fn upload(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    check_policy_name(name).map_err(invalid)?;
    let limits = limits_from_query(call)?;
    if call.body.is_empty() {
        return Err(ServiceError::MalformedBody(
            "the request body must be the component's bytes".to_owned(),
        ));
    }
    if call.body.len() as u64 > limits.module_bytes {
        return Err(invalid(format!(
            "the component is {} bytes, over the moduleBytes limit of {}",
            call.body.len(),
            limits.module_bytes
        )));
    }
    let bytes = call.body.to_vec();
    let engine = state.provisioning.custom().engine().clone();
    let checked = bytes.clone();
    let (world, _) = tokio::task::spawn_blocking(move || engine.validate(&checked))
        .await
        .map_err(|e| ServiceError::Internal(format!("the policy compiler stopped: {e}")))?
        .map_err(|e| invalid(e.to_string()))?;
    let hash = content_hash(&bytes);
    let limits_json =
        serde_json::to_string(&limits).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let version = state
        .store
        .insert_policy_version(name, world.as_str(), &hash, &bytes, &limits_json)
        .await?;
    Ok(Reply::json(
        axum::http::StatusCode::OK,
        version_json(&version),
    ))
}

pub(super) async fn list(state: &ServiceState) -> Result<Reply, ServiceError> {
    let versions = state.store.policies().await?;
    Ok(Reply::ok(Value::Array(
        versions.iter().map(version_json).collect(),
    )))
}

pub(super) async fn show(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    let versions = state.store.policy_versions(name).await?;
    let latest = versions
        .last()
        .ok_or_else(|| ServiceError::not_found(crate::error::NotFoundKind::Policy, name))?;
    let mut body = version_json(latest);
    body["versions"] = Value::Array(versions.iter().map(version_json).collect());
    body["usedBy"] = json!(users_of_policy(state, name).await?);
    Ok(Reply::ok(body))
}

pub(super) async fn download(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let (_, bytes) = state
        .store
        .policy_module(name, version_param(call)?)
        .await?
        .ok_or_else(|| ServiceError::not_found(crate::error::NotFoundKind::Policy, name))?;
    Ok(Reply::bytes("application/wasm", bytes))
}

pub(super) async fn delete(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    let users = users_of_policy(state, name).await?;
    if !users.is_empty() {
        return Err(ServiceError::Conflict(format!(
            "policy '{name}' is used by {}; unbind it first",
            users.join(", ")
        )));
    }
    if state.store.delete_policy(name).await? == 0 {
        return Err(ServiceError::not_found(
            crate::error::NotFoundKind::Policy,
            name,
        ));
    }
    Ok(Reply::no_content())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DryRun {
    #[serde(flatten)]
    request: RequestDoc,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    lookup_tables: Vec<String>,
}

/// Runs an allocation policy on a request and reports its decision, logs, time and memory.
pub(super) async fn dry_run(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let dry: DryRun = call.json()?;
    let custom = state.provisioning.custom();
    let reference = PolicyRef {
        name: name.to_owned(),
        version: version_param(call)?,
    };
    let loaded = custom.load(&reference).await.map_err(|why| {
        if why.starts_with("there is no policy") || why.contains("has no version") {
            ServiceError::not_found(crate::error::NotFoundKind::Policy, name)
        } else {
            ServiceError::Internal(why)
        }
    })?;
    if loaded.prepared.world() != World::AllocationPolicy {
        return Err(invalid(format!(
            "policy {} is a reprovisioning rule; dry runs take allocation policies",
            loaded.label
        )));
    }
    let tables = custom.tables(&dry.lookup_tables).await.map_err(invalid)?;
    let (wit, size) = dry.request.to_wit().map_err(invalid)?;
    let context = CallContext {
        limits: loaded.limits,
        config: dry.config.as_ref().map(Value::to_string),
        tables,
    };
    let engine = custom.engine().clone();
    let prepared = loaded.prepared.clone();
    let (outcome, report) =
        tokio::task::spawn_blocking(move || engine.allocate(&prepared, &wit, size, &context))
            .await
            .map_err(|e| ServiceError::Internal(format!("the policy host stopped: {e}")))?;
    let hubs: Vec<String> = dry
        .request
        .linked_hubs
        .iter()
        .map(|h| h.name.clone())
        .collect();
    Ok(Reply::ok(dry_run_body(
        &loaded.label,
        outcome,
        &report,
        &hubs,
    )))
}

/// The dry-run answer, shared with `berth policy test`.
pub fn dry_run_body(
    label: &str,
    outcome: Result<
        Result<
            crate::policy::bindings::types::Allocation,
            crate::policy::bindings::types::AllocationError,
        >,
        crate::policy::PolicyError,
    >,
    report: &crate::policy::CallReport,
    linked_hubs: &[String],
) -> Value {
    // As in a registration, the hub must be one of the offered linked hubs.
    let checked = crate::provisioning::custom::interpret(label, outcome).and_then(|decision| {
        match linked_hubs.iter().find(|hub| hub.eq_ignore_ascii_case(&decision.hub)) {
            Some(hub) => Ok(crate::allocation::custom::CustomDecision { hub: hub.clone(), ..decision }),
            None => Err(crate::allocation::custom::CustomFailure::Failed(format!(
                "custom allocation chose hub '{}', which is not one of the enrollment's linked hubs",
                decision.hub
            ))),
        }
    });
    let decision = match checked {
        Ok(decision) => json!({
            "status": "assigned",
            "iotHubHostName": decision.hub,
            "deviceId": decision.device_id,
            "initialTwin": decision.initial_twin,
            "payload": decision.payload,
        }),
        Err(failure) => json!({
            "status": "failed",
            "errorCode": failure.error_code(),
            "errorMessage": failure.to_string(),
        }),
    };
    json!({
        "policy": label,
        "decision": decision,
        "logs": report.logs,
        "logsTruncated": report.logs_truncated,
        "wallTimeMicros": report.wall_time_micros,
        "memoryBytes": report.memory_bytes,
    })
}

pub(super) async fn put_table(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    check_policy_name(name).map_err(invalid)?;
    let table: serde_json::Map<String, Value> = call.json()?;
    let doc = Value::Object(table).to_string();
    let version = state.store.insert_table_version(name, &doc).await?;
    Ok(Reply::ok(
        json!({"name": version.name, "version": version.version, "size": version.size, "createdDateTimeUtc": version.created}),
    ))
}

pub(super) async fn list_tables(state: &ServiceState) -> Result<Reply, ServiceError> {
    let tables = state.store.tables().await?;
    Ok(Reply::ok(Value::Array(
        tables
            .iter()
            .map(|t| json!({"name": t.name, "version": t.version, "size": t.size, "createdDateTimeUtc": t.created}))
            .collect(),
    )))
}

pub(super) async fn get_table(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    let (meta, doc) =
        state.store.table(name).await?.ok_or_else(|| {
            ServiceError::not_found(crate::error::NotFoundKind::LookupTable, name)
        })?;
    let users = users_of_table(state, name).await?;
    Ok(Reply::ok(json!({
        "name": meta.name,
        "version": meta.version,
        "size": meta.size,
        "createdDateTimeUtc": meta.created,
        "usedBy": users,
        "entries": serde_json::from_str::<Value>(&doc).unwrap_or(Value::Null),
    })))
}

async fn users_of_table(state: &ServiceState, name: &str) -> Result<Vec<String>, ServiceError> {
    let rows = state.store.enrollments_mentioning(name).await?;
    Ok(rows
        .iter()
        .filter(|row| {
            row.record
                .doc
                .policy_binding
                .as_ref()
                .and_then(|b| b.lookup_tables.as_ref())
                .is_some_and(|tables| tables.iter().any(|t| t.eq_ignore_ascii_case(name)))
        })
        .map(enrollment_label)
        .collect())
}

pub(super) async fn delete_table(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    let users = users_of_table(state, name).await?;
    if !users.is_empty() {
        return Err(ServiceError::Conflict(format!(
            "lookup table '{name}' is granted to {}; unbind it first",
            users.join(", ")
        )));
    }
    if state.store.delete_table(name).await? == 0 {
        return Err(ServiceError::not_found(
            crate::error::NotFoundKind::LookupTable,
            name,
        ));
    }
    Ok(Reply::no_content())
}

/// Checks that an enrollment's policies and tables exist and fit their roles.
pub(super) async fn check_bindings(
    state: &ServiceState,
    doc: &crate::model::enrollment::Enrollment,
) -> Result<(), ServiceError> {
    let binding = doc.policy_binding.clone().unwrap_or_default();
    let mut wanted: Vec<(PolicyRef, World, &str)> = Vec::new();
    if let Some(reference) = &binding.allocation {
        wanted.push((
            PolicyRef::parse(reference).map_err(invalid)?,
            World::AllocationPolicy,
            "policyBinding.allocation",
        ));
    } else if let Some(Ok(reference)) = doc
        .custom_allocation_definition
        .as_ref()
        .and_then(|d| PolicyRef::from_webhook_url(&d.webhook_url))
    {
        wanted.push((
            reference,
            World::AllocationPolicy,
            "customAllocationDefinition.webhookUrl",
        ));
    }
    if let Some(reference) = &binding.reprovisioning {
        wanted.push((
            PolicyRef::parse(reference).map_err(invalid)?,
            World::ReprovisioningRule,
            "policyBinding.reprovisioning",
        ));
    }
    for (reference, world, field) in wanted {
        let versions = state.store.policy_versions(&reference.name).await?;
        let version = match reference.version {
            Some(v) => versions.iter().find(|p| p.version == v),
            None => versions.last(),
        };
        let Some(version) = version else {
            return Err(invalid(format!(
                "{field}: there is no policy '{}'{}",
                reference.name,
                reference
                    .version
                    .map_or(String::new(), |v| format!(" version {v}"))
            )));
        };
        if World::parse(&version.world) != Some(world) {
            return Err(invalid(format!(
                "{field}: policy '{}' is a {}, not a {}",
                reference.name,
                version.world,
                world.as_str()
            )));
        }
    }
    for table in binding.lookup_tables.unwrap_or_default() {
        if state.store.table(&table).await?.is_none() {
            return Err(invalid(format!(
                "policyBinding.lookupTables: there is no lookup table '{table}'"
            )));
        }
    }
    Ok(())
}
