//! The service API: Azure DPS's data plane (enrollments, enrollment groups, registration
//! states; wire-protocol.md §8) plus Berth's own resources (linked hubs, shared access
//! policies), all behind service SAS authentication.
//!
//! Routing is done here rather than by axum's router because DPS routes are matched
//! case-insensitively and tolerate a trailing slash (Node sends `/enrollmentgroups/…`), and
//! because 404 and 405 must carry the DPS error body. Errors become responses in `respond`
//! only.

mod access_policies;
pub mod auth;
mod certificates;
mod enrollments;
mod hubs;
pub mod policies;
pub mod query;
mod registrations;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::clock::now_utc;
use crate::error::ServiceError;
use crate::model::access::Right;
use crate::model::enrollment::EnrollmentKind;
use crate::store::Store;
use crate::telemetry::metrics::{Metrics, ServiceOperationLabels};

pub use auth::Audience;

/// The largest request body accepted (seed LIM-07: 96 KB).
pub const MAX_BODY_BYTES: usize = 96 * 1024;
/// Oversized bodies up to this size are drained before the 400 is sent.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;
/// How long draining an oversized body may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// The api-version every answer is given in.
pub const API_VERSION: &str = "2021-10-01";
/// At most this many linked hubs (seed LIM-06).
pub const MAX_LINKED_HUBS: usize = 50;

/// The peer address of a connection, put into request extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The certificate chain the TLS client presented (leaf first, DER), when it presented one;
/// the handshake proved it holds the leaf's key. Put into request extensions by the listener.
#[derive(Debug, Clone)]
pub struct ClientCertificates(pub Arc<Vec<Vec<u8>>>);

/// What every request handler shares.
#[derive(Debug)]
pub struct ServiceState {
    pub store: Store,
    pub audience: Audience,
    pub metrics: Arc<Metrics>,
    /// The device API served on the same listener.
    pub provisioning: Arc<crate::provisioning::Provisioning>,
    /// At most this many CA certificates (the seed's limit is 25).
    pub max_ca_certificates: usize,
}

pub type AppState = Arc<ServiceState>;

/// The HTTP application: health and metrics endpoints, then the service API.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(dispatch)
        .method_not_allowed_fallback(health_method_not_allowed)
        .with_state(state)
}

async fn health_method_not_allowed(request: Request) -> Response {
    let error = ServiceError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    };
    respond(Err(error), &uuid::Uuid::new_v4().to_string())
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// A successful answer: status, optional JSON body, extra headers.
#[derive(Debug)]
pub(crate) struct Reply {
    status: StatusCode,
    body: Option<Value>,
    headers: Vec<(HeaderName, String)>,
    /// A non-JSON body (policy downloads).
    raw: Option<(&'static str, Vec<u8>)>,
}

impl Reply {
    fn json(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: Vec::new(),
            raw: None,
        }
    }

    fn ok(body: Value) -> Self {
        Self::json(StatusCode::OK, body)
    }

    fn no_content() -> Self {
        Self {
            status: StatusCode::NO_CONTENT,
            body: None,
            headers: Vec::new(),
            raw: None,
        }
    }

    fn bytes(content_type: &'static str, bytes: Vec<u8>) -> Self {
        Self {
            status: StatusCode::OK,
            body: None,
            headers: Vec::new(),
            raw: Some((content_type, bytes)),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers
            .push((HeaderName::from_static(name), value.into()));
        self
    }
}

/// One parsed request, as the handlers see it.
#[derive(Debug)]
pub(crate) struct Call {
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn if_match(&self) -> Option<&str> {
        self.header("if-match").filter(|v| !v.trim().is_empty())
    }

    /// The body as JSON of type `T`; a body is required.
    fn json<T: DeserializeOwned>(&self) -> Result<T, ServiceError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(ServiceError::MalformedBody(
                "a JSON request body is required".to_owned(),
            ));
        }
        serde_json::from_slice(&self.body).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => {
                ServiceError::invalid(format!("invalid request body: {error}"))
            }
            _ => ServiceError::MalformedBody(error.to_string()),
        })
    }
}

/// What an operation is, for authorization and the `ServiceOperations` log (MON-06/08).
#[derive(Debug)]
struct Operation {
    name: &'static str,
    resource_type: &'static str,
    id: Option<String>,
    right: Right,
    target: Target,
}

#[derive(Debug)]
enum Target {
    EnrollmentGet(EnrollmentKind, String),
    EnrollmentPut(EnrollmentKind, String),
    EnrollmentDelete(EnrollmentKind, String),
    EnrollmentAttestation(EnrollmentKind, String),
    EnrollmentQuery(EnrollmentKind),
    EnrollmentBulk(EnrollmentKind),
    RegistrationGet(String),
    RegistrationDelete(String),
    RegistrationQuery(String),
    HubList,
    HubGet(String),
    HubPut(String),
    HubDelete(String),
    HubDevice(String, String),
    PolicyList,
    PolicyGet(String),
    PolicyPut(String),
    PolicyDelete(String),
    PolicyRegenerate(String),
    ModuleList,
    ModuleShow(String),
    ModuleUpload(String),
    ModuleDownload(String),
    ModuleDelete(String),
    ModuleDryRun(String),
    TableList,
    TableShow(String),
    TablePut(String),
    TableDelete(String),
    CertificateList,
    CertificateGet(String),
    CertificatePut(String),
    CertificateDelete(String),
    CertificateCode(String),
    CertificateVerify(String),
}

// Arms stay one per resource and method for readability, even where bodies repeat.
#[allow(clippy::match_same_arms)]
fn route(method: &Method, path: &str) -> Result<Operation, ServiceError> {
    let not_found = || ServiceError::RouteNotFound {
        method: method.to_string(),
        path: path.to_owned(),
    };
    let not_allowed = || ServiceError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_owned(),
    };
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let mut segments = Vec::new();
    for raw in trimmed.split('/') {
        let segment = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| not_found())?;
        if segment.is_empty() {
            return Err(not_found());
        }
        segments.push(segment.into_owned());
    }
    let first = segments
        .first()
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    let last_is = |word: &str| {
        segments
            .get(2)
            .is_some_and(|s| s.eq_ignore_ascii_case(word))
    };
    let op = |name, resource_type, id: Option<&String>, right, target| Operation {
        name,
        resource_type,
        id: id.cloned(),
        right,
        target,
    };
    let m = method.clone();
    let enrollment_kind = match first.as_str() {
        "enrollments" => Some(EnrollmentKind::Individual),
        "enrollmentgroups" => Some(EnrollmentKind::Group),
        _ => None,
    };
    if let Some(kind) = enrollment_kind {
        let rt = kind.log_type();
        return match (segments.len(), segments.get(1)) {
            (1, _) if m == Method::POST => Ok(op(
                "BulkOperation",
                rt,
                None,
                Right::EnrollmentWrite,
                Target::EnrollmentBulk(kind),
            )),
            (2, Some(id)) if id.eq_ignore_ascii_case("query") && m == Method::POST => Ok(op(
                "Query",
                rt,
                None,
                Right::EnrollmentRead,
                Target::EnrollmentQuery(kind),
            )),
            (2, Some(id)) if m == Method::GET => Ok(op(
                "Get",
                rt,
                Some(id),
                Right::EnrollmentRead,
                Target::EnrollmentGet(kind, id.clone()),
            )),
            (2, Some(id)) if m == Method::PUT => Ok(op(
                "Upsert",
                rt,
                Some(id),
                Right::EnrollmentWrite,
                Target::EnrollmentPut(kind, id.clone()),
            )),
            (2, Some(id)) if m == Method::DELETE => Ok(op(
                "Delete",
                rt,
                Some(id),
                Right::EnrollmentWrite,
                Target::EnrollmentDelete(kind, id.clone()),
            )),
            (3, Some(id)) if last_is("attestationmechanism") && m == Method::POST => Ok(op(
                "GetAttestationMechanism",
                rt,
                Some(id),
                Right::EnrollmentRead,
                Target::EnrollmentAttestation(kind, id.clone()),
            )),
            (1 | 2, _) => Err(not_allowed()),
            (3, _) if last_is("attestationmechanism") => Err(not_allowed()),
            _ => Err(not_found()),
        };
    }
    let rt_reg = "DeviceRegistrationState";
    match (first.as_str(), segments.len(), segments.get(1)) {
        ("registrations", 2, Some(id)) if m == Method::GET => Ok(op(
            "Get",
            rt_reg,
            Some(id),
            Right::RegistrationStatusRead,
            Target::RegistrationGet(id.clone()),
        )),
        ("registrations", 2, Some(id)) if m == Method::DELETE => Ok(op(
            "Delete",
            rt_reg,
            Some(id),
            Right::RegistrationStatusWrite,
            Target::RegistrationDelete(id.clone()),
        )),
        ("registrations", 3, Some(id)) if last_is("query") && m == Method::POST => Ok(op(
            "Query",
            rt_reg,
            Some(id),
            Right::RegistrationStatusRead,
            Target::RegistrationQuery(id.clone()),
        )),
        ("registrations", 2, _) => Err(not_allowed()),
        ("registrations", 3, _) if last_is("query") => Err(not_allowed()),
        ("linkedhubs", 1, _) if m == Method::GET => Ok(op(
            "List",
            "LinkedHub",
            None,
            Right::ServiceConfig,
            Target::HubList,
        )),
        ("linkedhubs", 2, Some(name)) if m == Method::GET => Ok(op(
            "Get",
            "LinkedHub",
            Some(name),
            Right::ServiceConfig,
            Target::HubGet(name.clone()),
        )),
        ("linkedhubs", 2, Some(name)) if m == Method::PUT => Ok(op(
            "Upsert",
            "LinkedHub",
            Some(name),
            Right::ServiceConfig,
            Target::HubPut(name.clone()),
        )),
        ("linkedhubs", 2, Some(name)) if m == Method::DELETE => Ok(op(
            "Delete",
            "LinkedHub",
            Some(name),
            Right::ServiceConfig,
            Target::HubDelete(name.clone()),
        )),
        ("linkedhubs", 4, Some(name))
            if segments
                .get(2)
                .is_some_and(|s| s.eq_ignore_ascii_case("devices"))
                && m == Method::GET =>
        {
            let device = segments.get(3).cloned().unwrap_or_default();
            Ok(op(
                "GetDevice",
                "LinkedHub",
                Some(name),
                Right::ServiceConfig,
                Target::HubDevice(name.clone(), device),
            ))
        }
        ("linkedhubs", 1 | 2, _) => Err(not_allowed()),
        ("accesspolicies", 1, _) if m == Method::GET => Ok(op(
            "List",
            "AccessPolicy",
            None,
            Right::ServiceConfig,
            Target::PolicyList,
        )),
        ("accesspolicies", 2, Some(name)) if m == Method::GET => Ok(op(
            "Get",
            "AccessPolicy",
            Some(name),
            Right::ServiceConfig,
            Target::PolicyGet(name.clone()),
        )),
        ("accesspolicies", 2, Some(name)) if m == Method::PUT => Ok(op(
            "Upsert",
            "AccessPolicy",
            Some(name),
            Right::ServiceConfig,
            Target::PolicyPut(name.clone()),
        )),
        ("accesspolicies", 2, Some(name)) if m == Method::DELETE => Ok(op(
            "Delete",
            "AccessPolicy",
            Some(name),
            Right::ServiceConfig,
            Target::PolicyDelete(name.clone()),
        )),
        ("accesspolicies", 3, Some(name)) if last_is("regeneratekey") && m == Method::POST => {
            Ok(op(
                "RegenerateKey",
                "AccessPolicy",
                Some(name),
                Right::ServiceConfig,
                Target::PolicyRegenerate(name.clone()),
            ))
        }
        ("accesspolicies", 3, _) if last_is("regeneratekey") => Err(not_allowed()),
        ("accesspolicies", 1 | 2, _) => Err(not_allowed()),
        ("policies", 1, _) if m == Method::GET => Ok(op(
            "List",
            "Policy",
            None,
            Right::ServiceConfig,
            Target::ModuleList,
        )),
        ("policies", 2, Some(name)) if m == Method::GET => Ok(op(
            "Get",
            "Policy",
            Some(name),
            Right::ServiceConfig,
            Target::ModuleShow(name.clone()),
        )),
        ("policies", 2, Some(name)) if m == Method::PUT => Ok(op(
            "Upload",
            "Policy",
            Some(name),
            Right::ServiceConfig,
            Target::ModuleUpload(name.clone()),
        )),
        ("policies", 2, Some(name)) if m == Method::DELETE => Ok(op(
            "Delete",
            "Policy",
            Some(name),
            Right::ServiceConfig,
            Target::ModuleDelete(name.clone()),
        )),
        ("policies", 3, Some(name)) if last_is("content") && m == Method::GET => Ok(op(
            "Download",
            "Policy",
            Some(name),
            Right::ServiceConfig,
            Target::ModuleDownload(name.clone()),
        )),
        ("policies", 3, Some(name)) if last_is("dryrun") && m == Method::POST => Ok(op(
            "DryRun",
            "Policy",
            Some(name),
            Right::ServiceConfig,
            Target::ModuleDryRun(name.clone()),
        )),
        ("policies", 1 | 2, _) => Err(not_allowed()),
        ("policies", 3, _) if last_is("content") || last_is("dryrun") => Err(not_allowed()),
        ("lookuptables", 1, _) if m == Method::GET => Ok(op(
            "List",
            "LookupTable",
            None,
            Right::ServiceConfig,
            Target::TableList,
        )),
        ("lookuptables", 2, Some(name)) if m == Method::GET => Ok(op(
            "Get",
            "LookupTable",
            Some(name),
            Right::ServiceConfig,
            Target::TableShow(name.clone()),
        )),
        ("lookuptables", 2, Some(name)) if m == Method::PUT => Ok(op(
            "Upload",
            "LookupTable",
            Some(name),
            Right::ServiceConfig,
            Target::TablePut(name.clone()),
        )),
        ("lookuptables", 2, Some(name)) if m == Method::DELETE => Ok(op(
            "Delete",
            "LookupTable",
            Some(name),
            Right::ServiceConfig,
            Target::TableDelete(name.clone()),
        )),
        ("lookuptables", 1 | 2, _) => Err(not_allowed()),
        ("certificates", 1, _) if m == Method::GET => Ok(op(
            "List",
            "Certificate",
            None,
            Right::ServiceConfig,
            Target::CertificateList,
        )),
        ("certificates", 2, Some(name)) if m == Method::GET => Ok(op(
            "Get",
            "Certificate",
            Some(name),
            Right::ServiceConfig,
            Target::CertificateGet(name.clone()),
        )),
        ("certificates", 2, Some(name)) if m == Method::PUT => Ok(op(
            "Upsert",
            "Certificate",
            Some(name),
            Right::ServiceConfig,
            Target::CertificatePut(name.clone()),
        )),
        ("certificates", 2, Some(name)) if m == Method::DELETE => Ok(op(
            "Delete",
            "Certificate",
            Some(name),
            Right::ServiceConfig,
            Target::CertificateDelete(name.clone()),
        )),
        ("certificates", 3, Some(name))
            if last_is("generateverificationcode") && m == Method::POST =>
        {
            Ok(op(
                "GenerateVerificationCode",
                "Certificate",
                Some(name),
                Right::ServiceConfig,
                Target::CertificateCode(name.clone()),
            ))
        }
        ("certificates", 3, Some(name)) if last_is("verify") && m == Method::POST => Ok(op(
            "Verify",
            "Certificate",
            Some(name),
            Right::ServiceConfig,
            Target::CertificateVerify(name.clone()),
        )),
        ("certificates", 1 | 2, _) => Err(not_allowed()),
        ("certificates", 3, _) if last_is("generateverificationcode") || last_is("verify") => {
            Err(not_allowed())
        }
        _ => Err(not_found()),
    }
}

/// Policy uploads are component bytes: `application/wasm` or `application/octet-stream`.
fn check_binary_content_type(headers: &HeaderMap, body: &Bytes) -> Result<(), ServiceError> {
    if body.is_empty() {
        return Ok(());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/wasm" || essence == "application/octet-stream" {
        Ok(())
    } else {
        Err(ServiceError::UnsupportedMediaType(content_type.to_owned()))
    }
}

/// Checks the media type of a request that carries a body (415 otherwise).
pub(crate) fn check_content_type(headers: &HeaderMap, body: &Bytes) -> Result<(), ServiceError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
    {
        Ok(())
    } else {
        Err(ServiceError::UnsupportedMediaType(content_type.to_owned()))
    }
}

pub(crate) async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ServiceError> {
    read_body_limited(headers, body, MAX_BODY_BYTES).await
}

/// Reads a body of at most `limit` bytes (oversized ones are drained, then refused).
pub(crate) async fn read_body_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ServiceError> {
    use http_body_util::BodyExt as _;
    let too_large = ServiceError::BodyTooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT.max(limit)) {
        return Err(too_large);
    }
    // An oversized body is read to its end (up to DRAIN_LIMIT, within DRAIN_TIME) and thrown
    // away, so that the client, still sending, reads the 400 instead of a reset connection.
    let mut body = body;
    let mut collected = bytes::BytesMut::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => {
                return Err(if total > limit {
                    too_large
                } else {
                    ServiceError::MalformedBody("the request body could not be read".to_owned())
                })
            }
        };
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            if total <= limit {
                collected.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT.max(limit) {
                break;
            }
        }
    }
    if total > limit {
        return Err(too_large);
    }
    Ok(collected.freeze())
}

async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let tracking_id = uuid::Uuid::new_v4().to_string();
    let (parts, body) = request.into_parts();
    let caller: Option<IpAddr> = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
    let correlation_id = [
        "request-id",
        "x-ms-client-request-id",
        "x-ms-correlation-request-id",
    ]
    .iter()
    .find_map(|name| parts.headers.get(*name).and_then(|v| v.to_str().ok()))
    .map_or_else(|| tracking_id.clone(), |v| v.chars().take(128).collect());
    let path = parts.uri.path().to_owned();

    if parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    {
        if crate::protocol::amqp::wants_websocket(&parts.headers) {
            return crate::protocol::amqp::websocket(state.provisioning.clone(), parts, caller)
                .await;
        }
        return crate::protocol::mqtt::websocket(state.provisioning.clone(), parts, caller).await;
    }
    if let Some(device_route) = crate::protocol::device_http::route(&parts.method, &path) {
        let outcome = match device_route {
            Ok(device_route) => {
                crate::protocol::device_http::handle(
                    &state.provisioning,
                    device_route,
                    &parts.headers,
                    parts.uri.query(),
                    body,
                    caller,
                    parts
                        .extensions
                        .get::<ClientCertificates>()
                        .map(|c| c.0.as_slice()),
                )
                .await
            }
            Err(error) => Err(error),
        };
        return outcome.unwrap_or_else(|error| respond(Err(error), &tracking_id));
    }

    let operation = route(&parts.method, &path);
    let (name, resource_type, id) = match &operation {
        Ok(op) => (op.name, op.resource_type, op.id.clone()),
        Err(_) => ("Unknown", "Unknown", None),
    };
    let outcome = match operation {
        Ok(operation) => {
            serve(
                &state,
                operation,
                parts.headers,
                body,
                &path,
                parts.uri.query().map(str::to_owned),
            )
            .await
        }
        Err(error) => Err(error),
    };

    let duration = started.elapsed();
    let (status, result_type, description) = match &outcome {
        Ok(reply) => (reply.status.as_u16(), "Success", String::new()),
        Err(error) => (error.status(), error.result_type(), error.to_string()),
    };
    let properties = json!({ "id": id, "type": resource_type, "protocol": "Http" });
    tracing::info!(
        target: "berth::service_operations",
        category = "ServiceOperations",
        operation_name = name,
        operation_version = "October2021",
        result_type,
        result_signature = status,
        result_description = description.as_str(),
        duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        caller_ip_address = crate::telemetry::masked_address(caller).as_str(),
        correlation_id = correlation_id.as_str(),
        tracking_id = tracking_id.as_str(),
        properties = %properties,
        "service operation"
    );
    let labels = ServiceOperationLabels {
        operation: name.to_owned(),
        resource_type: resource_type.to_owned(),
        result_type: result_type.to_owned(),
        status,
    };
    state
        .metrics
        .service_operations
        .get_or_create(&labels)
        .inc();
    state
        .metrics
        .service_operation_seconds
        .get_or_create(&labels)
        .observe(duration.as_secs_f64());
    respond(outcome, &tracking_id)
}

async fn serve(
    state: &ServiceState,
    operation: Operation,
    headers: HeaderMap,
    body: Body,
    path: &str,
    query: Option<String>,
) -> Result<Reply, ServiceError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let policy = auth::authenticate(&state.store, &state.audience, authorization, path).await?;
    if !policy.rights.contains(operation.right) {
        return Err(ServiceError::Forbidden(format!(
            "policy '{}' lacks the {} right this operation needs",
            policy.name,
            operation.right.name()
        )));
    }
    let body = match &operation.target {
        Target::ModuleUpload(_) => {
            let body = read_body_limited(&headers, body, policies::MAX_UPLOAD_BYTES).await?;
            check_binary_content_type(&headers, &body)?;
            body
        }
        Target::TablePut(_) => {
            let body = read_body_limited(&headers, body, policies::MAX_TABLE_BYTES).await?;
            check_content_type(&headers, &body)?;
            body
        }
        _ => {
            let body = read_body(&headers, body).await?;
            check_content_type(&headers, &body)?;
            body
        }
    };
    let call = Call {
        query,
        headers,
        body,
    };
    match operation.target {
        Target::EnrollmentGet(kind, id) => enrollments::get(state, kind, &id).await,
        Target::EnrollmentPut(kind, id) => enrollments::put(state, kind, &id, &call).await,
        Target::EnrollmentDelete(kind, id) => enrollments::delete(state, kind, &id, &call).await,
        Target::EnrollmentAttestation(kind, id) => enrollments::attestation(state, kind, &id).await,
        Target::EnrollmentQuery(kind) => enrollments::query(state, kind, &call).await,
        Target::EnrollmentBulk(kind) => enrollments::bulk(state, kind, &call).await,
        Target::RegistrationGet(id) => registrations::get(state, &id).await,
        Target::RegistrationDelete(id) => registrations::delete(state, &id, &call).await,
        Target::RegistrationQuery(group) => registrations::query(state, &group, &call).await,
        Target::HubList => hubs::list(state).await,
        Target::HubGet(name) => hubs::get(state, &name).await,
        Target::HubPut(name) => hubs::put(state, &name, &call).await,
        Target::HubDelete(name) => hubs::delete(state, &name, &call).await,
        Target::HubDevice(name, device) => hubs::device(state, &name, &device).await,
        Target::PolicyList => access_policies::list(state).await,
        Target::PolicyGet(name) => access_policies::get(state, &name).await,
        Target::PolicyPut(name) => access_policies::put(state, &name, &call).await,
        Target::PolicyDelete(name) => access_policies::delete(state, &name, &call).await,
        Target::PolicyRegenerate(name) => access_policies::regenerate(state, &name, &call).await,
        Target::ModuleList => policies::list(state).await,
        Target::ModuleShow(name) => policies::show(state, &name).await,
        Target::ModuleUpload(name) => policies::upload(state, &name, &call).await,
        Target::ModuleDownload(name) => policies::download(state, &name, &call).await,
        Target::ModuleDelete(name) => policies::delete(state, &name).await,
        Target::ModuleDryRun(name) => policies::dry_run(state, &name, &call).await,
        Target::TableList => policies::list_tables(state).await,
        Target::TableShow(name) => policies::get_table(state, &name).await,
        Target::TablePut(name) => policies::put_table(state, &name, &call).await,
        Target::TableDelete(name) => policies::delete_table(state, &name).await,
        Target::CertificateList => certificates::list(state).await,
        Target::CertificateGet(name) => certificates::get(state, &name).await,
        Target::CertificatePut(name) => certificates::put(state, &name, &call).await,
        Target::CertificateDelete(name) => certificates::delete(state, &name, &call).await,
        Target::CertificateCode(name) => certificates::generate_code(state, &name, &call).await,
        Target::CertificateVerify(name) => certificates::verify(state, &name, &call).await,
    }
}

/// The one place where outcomes become HTTP responses; errors get the DPS error body
/// (wire-protocol.md §3.8) and the `x-ms-error-code` header.
fn respond(outcome: Result<Reply, ServiceError>, tracking_id: &str) -> Response {
    match outcome {
        Ok(reply) => {
            let mut response = match (reply.body, reply.raw) {
                (Some(body), _) => (reply.status, axum::Json(body)).into_response(),
                (None, Some((content_type, bytes))) => {
                    (reply.status, [(header::CONTENT_TYPE, content_type)], bytes).into_response()
                }
                (None, None) => reply.status.into_response(),
            };
            for (name, value) in reply.headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Err(error) => {
            let status =
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = json!({
                "errorCode": error.error_code(),
                "trackingId": tracking_id,
                "message": error.to_string(),
                "timestampUtc": now_utc(),
            });
            let mut response = (status, axum::Json(body)).into_response();
            if let Ok(code) = HeaderValue::from_str(&error.error_code().to_string()) {
                response.headers_mut().insert("x-ms-error-code", code);
            }
            if let ServiceError::Throttled { retry_after, .. } = &error {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from(*retry_after));
            }
            response
        }
    }
}

/// The DPS error body for `error`, for transports that fail before a handler runs.
pub(crate) fn error_response(error: ServiceError) -> Response {
    respond(Err(error), &uuid::Uuid::new_v4().to_string())
}

/// Page size from `x-ms-max-item-count` (default 100, at most 1000).
fn page_size(call: &Call) -> Result<usize, ServiceError> {
    match call.header("x-ms-max-item-count") {
        None => Ok(100),
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ServiceError::invalid(format!(
                "x-ms-max-item-count '{text}' must be a number from 1 to 1000"
            ))),
        },
    }
}

/// Decodes `x-ms-continuation` (an opaque token: Base64url of the last key of the page).
fn continuation(call: &Call) -> Result<Option<String>, ServiceError> {
    use base64::Engine as _;
    let Some(token) = call.header("x-ms-continuation").filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or_else(|| ServiceError::invalid("x-ms-continuation is not a valid continuation token"))
}

fn encode_continuation(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

/// A query page: the array, `x-ms-item-type` always, `x-ms-continuation` only when more
/// pages exist (wire-protocol.md §8.4).
fn page_reply(
    items: Vec<Value>,
    item_type: &'static str,
    page_size: usize,
    next: Option<String>,
) -> Reply {
    let mut reply = Reply::ok(Value::Array(items))
        .header("x-ms-item-type", item_type)
        .header("x-ms-max-item-count", page_size.to_string());
    if let Some(next) = next {
        reply = reply.header("x-ms-continuation", encode_continuation(&next));
    }
    reply
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod device_tests;

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod amqp_tests;
#[cfg(test)]
mod certificate_tests;
#[cfg(test)]
mod tpm_tests;
#[cfg(test)]
mod x509_tests;
