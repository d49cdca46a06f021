//! A fake IoT Hub registry: a test double, not an IoT Hub. It serves the few registry and
//! twin REST calls DPS makes toward a linked hub (wire-protocol.md §10.2) over HTTPS on
//! `127.0.0.1`, keeps devices and twins in memory, and records every request so a test can
//! assert what a driver did.
//!
//! It enforces what a driver relies on, as IoT Hub does:
//! - a service SAS token signed with its key, `sr` = its host (`localhost:PORT`), `skn` = its
//!   policy name, not expired; otherwise 401 `IotHubUnauthorizedAccess`;
//! - an `api-version` query parameter; otherwise 400;
//! - `PUT /devices/{id}` without `If-Match` on an existing device: 409 `DeviceAlreadyExists`;
//!   with an `If-Match` that is neither `"*"` nor the current etag: 412 `PreconditionFailed`;
//!   with `If-Match` on an absent device: 404 `DeviceNotFound`;
//! - unknown devices and twins: 404 `DeviceNotFound`;
//! - SAS identities need both keys, each Base64 of 16 to 64 bytes: otherwise 400.
//!
//! Error bodies have IoT Hub's shape: `{"Message":"ErrorCode:Code;text","ExceptionMessage":…}`.
//! A test can make the next N requests fail with any status ([`FakeHub::fail_next`]).
//!
//! Include it from a test file with `mod fake_hub;`. It runs on its own thread and runtime, so
//! it serves sync and async tests alike; it stops when the [`FakeHub`] is dropped.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use berth::attestation::sas::SasToken;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use serde_json::{json, Map, Value};

/// The shared access policy name of the fake hub's connection string.
pub const KEY_NAME: &str = "iothubowner";
/// What the fake puts in every `*Time` field it does not track.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// One request as the fake received it, and what it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path as sent (percent-encoded), without the query: `/devices/dev-1`.
    pub path: String,
    pub query: Option<String>,
    pub if_match: Option<String>,
    pub content_type: Option<String>,
    /// The JSON body, when there was one and it parsed.
    pub body: Option<Value>,
    /// The status the fake answered.
    pub status: u16,
    /// Why the fake refused, when it did (for test failure messages).
    pub reason: Option<String>,
}

/// A running fake hub. Dropping it stops the server.
pub struct FakeHub {
    shared: Arc<Shared>,
    ca_pem_path: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeHub {
    /// Starts a fake hub on a free port of `127.0.0.1`, with a fresh CA, server certificate
    /// and key.
    pub fn start() -> FakeHub {
        let dir = tempfile::tempdir().unwrap();
        let (tls, ca_pem) = tls_identity();
        let ca_pem_path = dir.path().join("fake-hub-ca.pem");
        std::fs::write(&ca_pem_path, ca_pem).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let key: [u8; 32] = rand::random();
        let shared = Arc::new(Shared {
            host: format!("localhost:{port}"),
            key: key.to_vec(),
            state: Mutex::new(HubState::default()),
        });

        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        std::thread::Builder::new()
            .name(format!("fake-hub-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(serve(listener, tls, app, stopped));
            })
            .unwrap();
        FakeHub {
            shared,
            ca_pem_path,
            _dir: dir,
            shutdown: Some(shutdown),
        }
    }

    /// `localhost:PORT`: the hub's host name, and the `sr` its tokens must carry.
    pub fn host(&self) -> &str {
        &self.shared.host
    }

    /// The hub's key, Base64.
    pub fn key(&self) -> String {
        BASE64.encode(&self.shared.key)
    }

    /// `HostName=localhost:PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=…`.
    pub fn connection_string(&self) -> String {
        self.connection_string_with_key(&self.key())
    }

    /// The connection string with another key, which the hub will refuse.
    pub fn connection_string_with_key(&self, key_base64: &str) -> String {
        format!(
            "HostName={};SharedAccessKeyName={KEY_NAME};SharedAccessKey={key_base64}",
            self.host()
        )
    }

    /// The PEM of the CA that signed the hub's certificate, for the client to trust.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// Every device, as `GET /devices/{id}` would answer it, by device ID.
    pub fn devices(&self) -> BTreeMap<String, Value> {
        let state = self.state();
        state
            .devices
            .iter()
            .map(|(id, device)| (id.clone(), device.to_json(id)))
            .collect()
    }

    /// The device's twin, as `GET /twins/{id}` would answer it.
    pub fn twin(&self, device_id: &str) -> Option<Value> {
        let state = self.state();
        state
            .devices
            .get(device_id)
            .map(|device| device.twin_json(device_id))
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// `(method, path)` of every request so far, the usual thing to assert.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.state()
            .requests
            .iter()
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// Answers the next `count` requests with `status` and an IoT Hub error body, before
    /// looking at them (they are still recorded). 429 and 503 test retries; any other status
    /// tests a refusal.
    pub fn fail_next(&self, count: usize, status: u16) {
        self.fail_next_with_retry_after(count, status, None);
    }

    /// As [`FakeHub::fail_next`], with a `Retry-After: {seconds}` header on each failure.
    pub fn fail_next_with_retry_after(&self, count: usize, status: u16, seconds: Option<u64>) {
        let mut state = self.state();
        state.failure = Some(Failure {
            remaining: count,
            status,
            retry_after: seconds,
        });
    }

    /// Creates a device with random SAS keys and the given twin (`tags`, `properties.desired`),
    /// as if someone had registered it before the test.
    pub fn seed_device(&self, device_id: &str, twin: &Value) {
        let mut state = self.state();
        let primary = BASE64.encode(rand::random::<[u8; 32]>());
        let secondary = BASE64.encode(rand::random::<[u8; 32]>());
        let etag = state.next_etag();
        let mut device = Device::new(
            json!({"type": "sas", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}}),
            json!({"iotEdge": false}),
            etag,
        );
        device.tags = object_of(twin.get("tags"));
        device.desired = without_dollar_keys(object_of(twin.pointer("/properties/desired")));
        device.twin_version += 1;
        device.desired_version += 1;
        state.devices.insert(device_id.to_owned(), device);
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.shared.state.lock().unwrap()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

struct Shared {
    host: String,
    key: Vec<u8>,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    devices: BTreeMap<String, Device>,
    requests: Vec<RecordedRequest>,
    failure: Option<Failure>,
    etag_counter: u64,
}

impl HubState {
    fn next_etag(&mut self) -> u64 {
        self.etag_counter += 1;
        self.etag_counter
    }
}

struct Failure {
    remaining: usize,
    status: u16,
    retry_after: Option<u64>,
}

struct Device {
    generation_id: String,
    /// Opaque counter; shown as Base64 like IoT Hub's etags.
    etag: u64,
    status: String,
    authentication: Value,
    capabilities: Value,
    tags: Map<String, Value>,
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    twin_version: u64,
    twin_etag: u64,
    desired_version: u64,
}

impl Device {
    fn new(authentication: Value, capabilities: Value, etag: u64) -> Self {
        Self {
            generation_id: format!("{:018}", rand::random::<u64>() % 1_000_000_000_000_000_000),
            etag,
            status: "enabled".to_owned(),
            authentication,
            capabilities,
            tags: Map::new(),
            desired: Map::new(),
            reported: Map::new(),
            twin_version: 1,
            twin_etag: etag,
            desired_version: 1,
        }
    }

    fn etag(&self) -> String {
        BASE64.encode(self.etag.to_string())
    }

    fn twin_etag(&self) -> String {
        BASE64.encode(self.twin_etag.to_be_bytes())
    }

    fn to_json(&self, device_id: &str) -> Value {
        json!({
            "deviceId": device_id,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": "Disconnected",
            "status": self.status,
            "statusReason": null,
            "connectionStateUpdatedTime": NEVER,
            "statusUpdatedTime": NEVER,
            "lastActivityTime": NEVER,
            "cloudToDeviceMessageCount": 0,
            "authentication": self.authentication,
            "capabilities": self.capabilities,
        })
    }

    fn twin_json(&self, device_id: &str) -> Value {
        let mut desired = self.desired.clone();
        desired.insert("$metadata".to_owned(), json!({"$lastUpdated": NEVER}));
        desired.insert("$version".to_owned(), json!(self.desired_version));
        let mut reported = self.reported.clone();
        reported.insert("$metadata".to_owned(), json!({"$lastUpdated": NEVER}));
        reported.insert("$version".to_owned(), json!(1));
        let mut twin = json!({
            "deviceId": device_id,
            "etag": self.twin_etag(),
            "deviceEtag": self.etag(),
            "status": self.status,
            "statusUpdateTime": NEVER,
            "connectionState": "Disconnected",
            "lastActivityTime": NEVER,
            "cloudToDeviceMessageCount": 0,
            "authenticationType": self.authentication.get("type").cloned().unwrap_or(Value::Null),
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "modelId": "",
            "version": self.twin_version,
            "properties": {"desired": desired, "reported": reported},
            "capabilities": self.capabilities,
        });
        // IoT Hub leaves `tags` out of a twin that has none.
        if !self.tags.is_empty() {
            twin["tags"] = Value::Object(self.tags.clone());
        }
        twin
    }
}

/// What the fake answers: status, JSON body, and an optional `Retry-After`.
struct Answer {
    status: StatusCode,
    body: Option<Value>,
    retry_after: Option<u64>,
    reason: Option<String>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: Some(body),
            retry_after: None,
            reason: None,
        }
    }

    fn no_content() -> Self {
        Self {
            status: StatusCode::NO_CONTENT,
            body: None,
            retry_after: None,
            reason: None,
        }
    }

    /// An IoT Hub error: `{"Message":"ErrorCode:{code};{text}","ExceptionMessage":…}`.
    fn error(status: StatusCode, code: &str, text: &str) -> Self {
        Self {
            status,
            body: Some(json!({
                "Message": format!("ErrorCode:{code};{text}"),
                "ExceptionMessage": format!(
                    "Tracking ID:{}-G:0-TimeStamp:{}",
                    uuid::Uuid::new_v4().simple(),
                    berth::clock::now_utc()
                ),
            })),
            retry_after: None,
            reason: Some(format!("{code}: {text}")),
        }
    }
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let json_body = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<Value>(&body).ok()
    };
    let mut state = shared.state.lock().unwrap();
    let answer = if !body.is_empty() && json_body.is_none() {
        Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "The request body is not JSON.",
        )
    } else {
        answer(
            &shared,
            &mut state,
            &method,
            &uri,
            header("authorization").as_deref(),
            header("if-match").as_deref(),
            json_body.as_ref(),
        )
    };
    state.requests.push(RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        if_match: header("if-match"),
        content_type: header("content-type"),
        body: json_body,
        status: answer.status.as_u16(),
        reason: answer.reason.clone(),
    });
    drop(state);

    let mut response = match answer.body {
        Some(body) => (answer.status, axum::Json(body)).into_response(),
        None => answer.status.into_response(),
    };
    if let Some(seconds) = answer.retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    if let Some(code) = answer
        .reason
        .as_deref()
        .and_then(|r| r.split(':').next())
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        response.headers_mut().insert("iothub-errorcode", code);
    }
    response
}

fn answer(
    shared: &Shared,
    state: &mut HubState,
    method: &Method,
    uri: &Uri,
    authorization: Option<&str>,
    if_match: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    if let Some(failure) = state.failure.as_mut().filter(|f| f.remaining > 0) {
        failure.remaining -= 1;
        let status = StatusCode::from_u16(failure.status).unwrap();
        let code = match failure.status {
            429 => "ThrottlingException",
            503 => "ServiceUnavailable",
            400 => "ArgumentInvalid",
            401 => "IotHubUnauthorizedAccess",
            403 => "IotHubQuotaExceeded",
            s if s >= 500 => "ServerError",
            _ => "InjectedFailure",
        };
        let mut answer = Answer::error(status, code, "The fake hub was told to fail this request.");
        answer.retry_after = failure.retry_after;
        return answer;
    }

    if let Err(reason) = check_token(shared, authorization) {
        let mut answer = Answer::error(
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
        );
        answer.reason = Some(format!("IotHubUnauthorizedAccess: {reason}"));
        return answer;
    }
    let has_api_version = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p.starts_with("api-version=") && p.len() > "api-version=".len())
    });
    if !has_api_version {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "InvalidProtocolVersion",
            "The api-version query parameter is missing.",
        );
    }

    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let (collection, device_id) = match segments.as_slice() {
        [collection, id] if !id.is_empty() => (
            *collection,
            percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned(),
        ),
        _ => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "ArgumentInvalid",
                &format!("The fake hub has no route {}.", uri.path()),
            )
        }
    };
    let if_match = if_match.map(|t| t.trim().trim_matches('"').to_owned());
    match (collection, method.as_str()) {
        ("devices", "GET") => match state.devices.get(&device_id) {
            Some(device) => Answer::ok(device.to_json(&device_id)),
            None => device_not_found(&device_id),
        },
        ("devices", "PUT") => put_device(state, &device_id, if_match.as_deref(), body),
        ("devices", "DELETE") => {
            let Some(device) = state.devices.get(&device_id) else {
                return device_not_found(&device_id);
            };
            if let Some(failed) = precondition(if_match.as_deref(), &device.etag()) {
                return failed;
            }
            state.devices.remove(&device_id);
            Answer::no_content()
        }
        ("twins", "GET") => match state.devices.get(&device_id) {
            Some(device) => Answer::ok(device.twin_json(&device_id)),
            None => device_not_found(&device_id),
        },
        ("twins", "PUT") => replace_twin(state, &device_id, if_match.as_deref(), body),
        ("devices" | "twins", _) => Answer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "InvalidOperation",
            &format!("The fake hub does not support {method} /{collection}."),
        ),
        _ => Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            &format!("The fake hub has no route {}.", uri.path()),
        ),
    }
}

fn check_token(shared: &Shared, authorization: Option<&str>) -> Result<(), String> {
    let header = authorization.ok_or("no Authorization header")?;
    let token = SasToken::parse(header).map_err(|e| e.to_string())?;
    if !token.resource.eq_ignore_ascii_case(&shared.host) {
        return Err(format!(
            "sr '{}' is not the hub '{}'",
            token.resource, shared.host
        ));
    }
    if token.key_name.as_deref() != Some(KEY_NAME) {
        return Err(format!("skn {:?} is not '{KEY_NAME}'", token.key_name));
    }
    token
        .check_expiry(berth::clock::unix_now())
        .map_err(|e| e.to_string())?;
    if !token.signed_with(&shared.key) {
        return Err("the signature does not match the hub's key".to_owned());
    }
    Ok(())
}

fn device_not_found(device_id: &str) -> Answer {
    Answer::error(
        StatusCode::NOT_FOUND,
        "DeviceNotFound",
        &format!("The device with ID '{device_id}' is not registered."),
    )
}

/// `None` when `If-Match` allows the write: absent (the caller decides what that means), `*`,
/// or the current etag.
fn precondition(if_match: Option<&str>, etag: &str) -> Option<Answer> {
    match if_match {
        None | Some("*") => None,
        Some(tag) if tag == etag => None,
        Some(_) => Some(Answer::error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "Precondition failed: the etag does not match.",
        )),
    }
}

fn put_device(
    state: &mut HubState,
    device_id: &str,
    if_match: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let Some(body) = body.filter(|b| b.is_object()) else {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "The device is missing.",
        );
    };
    if body.get("deviceId").and_then(Value::as_str) != Some(device_id) {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "The deviceId in the body does not match the one in the path.",
        );
    }
    let authentication = body
        .get("authentication")
        .cloned()
        .unwrap_or_else(|| json!({"type": "sas"}));
    if let Err(text) = check_authentication(&authentication) {
        return Answer::error(StatusCode::BAD_REQUEST, "ArgumentInvalid", &text);
    }
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("enabled");
    if status != "enabled" && status != "disabled" {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "status must be enabled or disabled.",
        );
    }
    let capabilities = json!({
        "iotEdge": body.pointer("/capabilities/iotEdge").and_then(Value::as_bool).unwrap_or(false)
    });
    let etag = state.next_etag();
    let Some(device) = state.devices.get_mut(device_id) else {
        if if_match.is_some() {
            return device_not_found(device_id);
        }
        let mut device = Device::new(authentication, capabilities, etag);
        status.clone_into(&mut device.status);
        let answer = Answer::ok(device.to_json(device_id));
        state.devices.insert(device_id.to_owned(), device);
        return answer;
    };
    let Some(tag) = if_match else {
        return Answer::error(
            StatusCode::CONFLICT,
            "DeviceAlreadyExists",
            &format!("A device with ID '{device_id}' is already registered."),
        );
    };
    if let Some(failed) = precondition(Some(tag), &device.etag()) {
        return failed;
    }
    device.authentication = authentication;
    device.capabilities = capabilities;
    status.clone_into(&mut device.status);
    device.etag = etag;
    Answer::ok(device.to_json(device_id))
}

fn check_authentication(authentication: &Value) -> Result<(), String> {
    match authentication.get("type").and_then(Value::as_str) {
        Some("sas") => {
            for slot in ["primaryKey", "secondaryKey"] {
                let key = authentication
                    .pointer(&format!("/symmetricKey/{slot}"))
                    .and_then(Value::as_str)
                    .ok_or(format!("symmetricKey.{slot} is missing."))?;
                let length = BASE64
                    .decode(key)
                    .map_err(|_| format!("symmetricKey.{slot} is not Base64."))?
                    .len();
                if !(16..=64).contains(&length) {
                    return Err(format!(
                        "symmetricKey.{slot} must be 16 to 64 bytes, not {length}."
                    ));
                }
            }
            Ok(())
        }
        Some("selfSigned") => {
            for slot in ["primaryThumbprint", "secondaryThumbprint"] {
                let thumbprint = authentication
                    .pointer(&format!("/x509Thumbprint/{slot}"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let hex = thumbprint.chars().all(|c| c.is_ascii_hexdigit());
                if !hex || !(thumbprint.len() == 40 || thumbprint.len() == 64) {
                    return Err(format!(
                        "x509Thumbprint.{slot} must be a SHA-1 or SHA-256 thumbprint."
                    ));
                }
            }
            Ok(())
        }
        Some("certificateAuthority" | "none") => Ok(()),
        other => Err(format!("authentication.type {other:?} is not valid.")),
    }
}

fn replace_twin(
    state: &mut HubState,
    device_id: &str,
    if_match: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let etag = state.next_etag();
    let Some(device) = state.devices.get_mut(device_id) else {
        return device_not_found(device_id);
    };
    if let Some(failed) = precondition(if_match, &device.twin_etag()) {
        return failed;
    }
    let Some(body) = body.filter(|b| b.is_object()) else {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "The twin is missing.",
        );
    };
    let tags = body.get("tags").filter(|t| !t.is_null());
    let desired = body.pointer("/properties/desired").filter(|d| !d.is_null());
    if tags.is_some_and(|t| !t.is_object()) || desired.is_some_and(|d| !d.is_object()) {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "tags and properties.desired must be objects.",
        );
    }
    device.tags = object_of(tags);
    device.desired = without_dollar_keys(object_of(desired));
    device.twin_version += 1;
    device.desired_version += 1;
    device.twin_etag = etag;
    Answer::ok(device.twin_json(device_id))
}

fn object_of(value: Option<&Value>) -> Map<String, Value> {
    value
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// `$metadata`, `$version` and other `$` names are the hub's, never a writer's.
fn without_dollar_keys(mut map: Map<String, Value>) -> Map<String, Value> {
    map.retain(|name, _| !name.starts_with('$'));
    map
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                        .await;
                });
            }
            _ = &mut stopped => break,
        }
    }
}

/// A CA and a `localhost` / `127.0.0.1` server certificate it signs; returns the server
/// config and the CA's PEM.
fn tls_identity() -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Fake IoT hub test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(config), ca.pem())
}
