//! The `azure` hub driver: the IoT Hub registry and twin REST API (api-version 2021-04-12),
//! authenticated with a SAS token made from the linked hub's connection string
//! (wire-protocol.md §10.1, §10.2).
//!
//! What a caller can rely on:
//! - every call carries a fresh token (`sr` = the hub host name, one hour of validity), so a
//!   long-lived driver never sends an expired one;
//! - throttling (429), server errors (5xx) and connection failures are retried a bounded number
//!   of times ([`RETRY_DELAYS`], or the hub's `Retry-After` up to [`MAX_RETRY_AFTER`]); any other
//!   refusal fails at once;
//! - a failure is a [`HubError`] with the hub's HTTP status and the start of the hub's own error
//!   text (`{"Message":"ErrorCode:…"}`), which the registration reports as its `errorMessage`
//!   (§10.3 "Failures"). The connection string's key never appears in errors or logs.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_MATCH, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};

use super::driver::{DeviceIdentity, HubError, Twin};
use super::HubConnectionString;
use crate::attestation::sas;

/// The registry API version the C# service SDK uses (wire-protocol.md §10.2).
const API_VERSION: &str = "2021-04-12";
/// Longest a single hub request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Validity of the SAS token made for each request.
const TOKEN_LIFETIME_SECONDS: i64 = 3600;
/// Waits before each retry of a throttled, failed or unreachable call; its length is the retry
/// budget, so a call is tried at most `RETRY_DELAYS.len() + 1` times.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];
/// Longest `Retry-After` honoured; a registration must not hang on a hub's say-so.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Largest hub answer read; a twin is at most about 100 KiB (8 KiB tags, 32 KiB per property set).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// How much of the hub's error text a [`HubError`] carries.
const MAX_ERROR_TEXT_CHARS: usize = 300;
/// `If-Match` that forces an update whatever the current etag (§10.2).
const IF_MATCH_ANY: &str = "\"*\"";
/// A device ID as one path segment: everything but RFC 3986 unreserved characters is encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// IoT Hub's limit on device ID length.
const MAX_DEVICE_ID_LEN: usize = 128;

/// Talks HTTPS to `IoT` hubs. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct AzureDriver {
    http: reqwest::Client,
}

impl AzureDriver {
    /// `extra_ca`: a PEM file of CA certificates to trust in addition to the system roots
    /// (tests, private hubs behind their own CA).
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, HubError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            // The token travels in a header: never follow the hub elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path).map_err(|e| {
                HubError::new(
                    None,
                    format!("cannot read the hub CA file {}: {e}", path.display()),
                )
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                HubError::new(
                    None,
                    format!("the hub CA file {} is not PEM: {e}", path.display()),
                )
            })?;
            if certificates.is_empty() {
                return Err(HubError::new(
                    None,
                    format!("the hub CA file {} holds no certificate", path.display()),
                ));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| HubError::new(None, format!("cannot build the hub HTTP client: {e}")))?;
        Ok(Self { http })
    }

    /// Creates the device with SAS keys and the `iotEdge` capability, or, when it exists,
    /// overwrites its identity (`If-Match: "*"`): DPS's view of the device wins (§10.2).
    ///
    /// Only SAS identities are written for now: an identity without a primary key is refused.
    /// A missing secondary key repeats the primary, because the hub wants both.
    pub async fn upsert_device(
        &self,
        connection_string: &str,
        identity: &DeviceIdentity,
    ) -> Result<(), HubError> {
        let hub = Hub::parse(connection_string)?;
        let device_id = identity.device_id.as_str();
        check_device_id(device_id)?;
        let device = device_json(identity)?;

        let read = Call::new(Method::GET, "devices", device_id);
        let existing = self.send(&hub, &read).await?;
        let exists = match existing.status {
            StatusCode::NOT_FOUND => false,
            status if status.is_success() => true,
            _ => return Err(refused(&hub, &read, &existing)),
        };

        let mut write = Call::new(Method::PUT, "devices", device_id).with_body(&device);
        if exists {
            write = write.if_match(IF_MATCH_ANY);
        }
        let mut answer = self.send(&hub, &write).await?;
        if answer.status == StatusCode::CONFLICT && !exists {
            // Created since the read: by another node, or by an earlier attempt of this PUT whose
            // answer was lost. DPS's identity still wins.
            tracing::debug!(hub = %hub.host_name, device_id, "device appeared since it was read; forcing the update");
            write = write.if_match(IF_MATCH_ANY);
            answer = self.send(&hub, &write).await?;
        }
        if !answer.status.is_success() {
            return Err(refused(&hub, &write, &answer));
        }
        tracing::info!(
            hub = %hub.host_name,
            device_id,
            updated = write.if_match.is_some(),
            iot_edge = identity.iot_edge,
            "device identity written to the hub"
        );
        Ok(())
    }

    /// The device's twin as DPS manages it: `{"tags": {…}, "properties": {"desired": {…}}}`,
    /// without the hub's `$metadata` and `$version`; `None` when the hub has no such device.
    pub async fn get_twin(
        &self,
        connection_string: &str,
        device_id: &str,
    ) -> Result<Option<Twin>, HubError> {
        let hub = Hub::parse(connection_string)?;
        check_device_id(device_id)?;
        let call = Call::new(Method::GET, "twins", device_id);
        let answer = self.send(&hub, &call).await?;
        if answer.status == StatusCode::NOT_FOUND {
            tracing::debug!(hub = %hub.host_name, device_id, "the hub has no twin for the device");
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err(refused(&hub, &call, &answer));
        }
        let twin: Value = serde_json::from_slice(&answer.body).map_err(|e| {
            tracing::warn!(hub = %hub.host_name, device_id, error = %e, "the hub's twin is not JSON");
            HubError::new(
                Some(answer.status.as_u16()),
                format!(
                    "IoT hub {} answered a twin for '{device_id}' that is not JSON",
                    hub.host_name
                ),
            )
        })?;
        Ok(Some(managed_twin(&twin)))
    }

    /// Replaces the device's tags and desired properties with those of `twin` (the hub's
    /// replace-twin semantics; reported properties are untouched). The device must exist.
    pub async fn replace_twin(
        &self,
        connection_string: &str,
        device_id: &str,
        twin: &Twin,
    ) -> Result<(), HubError> {
        let hub = Hub::parse(connection_string)?;
        check_device_id(device_id)?;
        let body = managed_twin(twin);
        let call = Call::new(Method::PUT, "twins", device_id)
            .if_match(IF_MATCH_ANY)
            .with_body(&body);
        let answer = self.send(&hub, &call).await?;
        if !answer.status.is_success() {
            return Err(refused(&hub, &call, &answer));
        }
        tracing::info!(hub = %hub.host_name, device_id, "device twin replaced on the hub");
        Ok(())
    }

    /// Deletes the device whatever its etag; a device the hub does not have is already deleted.
    pub async fn delete_device(
        &self,
        connection_string: &str,
        device_id: &str,
    ) -> Result<(), HubError> {
        let hub = Hub::parse(connection_string)?;
        check_device_id(device_id)?;
        let call = Call::new(Method::DELETE, "devices", device_id).if_match(IF_MATCH_ANY);
        let answer = self.send(&hub, &call).await?;
        if answer.status == StatusCode::NOT_FOUND {
            tracing::debug!(hub = %hub.host_name, device_id, "device already absent from the hub");
            return Ok(());
        }
        if !answer.status.is_success() {
            return Err(refused(&hub, &call, &answer));
        }
        tracing::info!(hub = %hub.host_name, device_id, "device deleted from the hub");
        Ok(())
    }

    /// Sends `call`, retrying transient failures within the budget. Returns the hub's final
    /// answer whatever its status, except 429 and 5xx, which become an error once the budget is
    /// spent.
    async fn send(&self, hub: &Hub, call: &Call<'_>) -> Result<Answer, HubError> {
        let url = hub.url(call)?;
        let mut delays = RETRY_DELAYS.iter();
        loop {
            let (error, retry_after) = match self.attempt(hub, call, url.clone()).await {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Fatal(error) => return Err(error),
                Attempt::Transient { error, retry_after } => (error, retry_after),
            };
            let Some(backoff) = delays.next() else {
                tracing::warn!(
                    hub = %hub.host_name,
                    device_id = call.device_id,
                    status = error.status,
                    error = %error,
                    "hub call failed; retries exhausted"
                );
                return Err(error);
            };
            let wait = retry_after.map_or(*backoff, |seconds| seconds.min(MAX_RETRY_AFTER));
            tracing::warn!(
                hub = %hub.host_name,
                device_id = call.device_id,
                status = error.status,
                error = %error,
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "hub call failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One try of `call`: a fresh token, the body, and the answer read within its size limit.
    async fn attempt(&self, hub: &Hub, call: &Call<'_>, url: Url) -> Attempt {
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .header(AUTHORIZATION, hub.token())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json");
        if let Some(tag) = call.if_match {
            request = request.header(IF_MATCH, tag);
        }
        if let Some(body) = call.body {
            request = request.body(body.to_string());
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) if error.is_builder() => {
                return Attempt::Fatal(HubError::new(
                    None,
                    format!(
                        "cannot build the request {} for IoT hub {}: {}",
                        call.describe(),
                        hub.host_name,
                        error_chain(&error)
                    ),
                ));
            }
            Err(error) => {
                let error_text = HubError::new(
                    None,
                    format!(
                        "cannot reach IoT hub {} for {}: {}",
                        hub.host_name,
                        call.describe(),
                        error_chain(&error)
                    ),
                );
                // An untrusted or wrong certificate stays so: retrying only delays the answer.
                if is_tls_refusal(&error) {
                    return Attempt::Fatal(error_text);
                }
                return Attempt::Transient {
                    error: error_text,
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
                        return Attempt::Fatal(HubError::new(
                            Some(status.as_u16()),
                            format!(
                                "IoT hub {} answered {} with more than {MAX_RESPONSE_BYTES} bytes",
                                hub.host_name,
                                call.describe()
                            ),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => {
                    return Attempt::Transient {
                        error: HubError::new(
                            Some(status.as_u16()),
                            format!(
                                "IoT hub {} broke off its answer to {}: {}",
                                hub.host_name,
                                call.describe(),
                                error_chain(&error)
                            ),
                        ),
                        retry_after: None,
                    };
                }
            }
        }
        let answer = Answer { status, body };
        tracing::debug!(
            hub = %hub.host_name,
            device_id = call.device_id,
            method = %call.method,
            status = status.as_u16(),
            "hub answered"
        );
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Attempt::Transient {
                error: refusal(hub, call, &answer),
                retry_after,
            };
        }
        Attempt::Done(answer)
    }
}

/// The parts of a connection string a call needs; the key is decoded once per operation.
/// No `Debug`: it holds the key.
struct Hub {
    host_name: String,
    key_name: String,
    key: Vec<u8>,
}

impl Hub {
    fn parse(connection_string: &str) -> Result<Self, HubError> {
        let parsed = HubConnectionString::parse(connection_string).map_err(|e| {
            HubError::new(
                None,
                format!("the linked hub's connection string is not usable: {e}"),
            )
        })?;
        let key = BASE64.decode(parsed.key.as_bytes()).map_err(|_| {
            HubError::new(None, "the linked hub's connection string key is not Base64")
        })?;
        Ok(Self {
            host_name: parsed.host_name,
            key_name: parsed.key_name,
            key,
        })
    }

    /// A service token for the whole hub, as the service SDKs make it (§10.1).
    fn token(&self) -> String {
        sas::build_token(
            &self.host_name,
            &self.key,
            Some(&self.key_name),
            crate::clock::unix_now() + TOKEN_LIFETIME_SECONDS,
        )
    }

    fn url(&self, call: &Call<'_>) -> Result<Url, HubError> {
        let text = format!(
            "https://{}/{}/{}?api-version={API_VERSION}",
            self.host_name,
            call.collection,
            utf8_percent_encode(call.device_id, PATH_SEGMENT)
        );
        Url::parse(&text).map_err(|e| {
            HubError::new(
                None,
                format!("cannot make a URL for IoT hub {}: {e}", self.host_name),
            )
        })
    }
}

/// One REST call: `{method} /{collection}/{device_id}`.
struct Call<'a> {
    method: Method,
    collection: &'static str,
    device_id: &'a str,
    if_match: Option<&'static str>,
    body: Option<&'a Value>,
}

impl<'a> Call<'a> {
    fn new(method: Method, collection: &'static str, device_id: &'a str) -> Self {
        Self {
            method,
            collection,
            device_id,
            if_match: None,
            body: None,
        }
    }

    fn if_match(mut self, tag: &'static str) -> Self {
        self.if_match = Some(tag);
        self
    }

    fn with_body(mut self, body: &'a Value) -> Self {
        self.body = Some(body);
        self
    }

    fn describe(&self) -> String {
        format!("{} /{}/{}", self.method, self.collection, self.device_id)
    }
}

/// The hub's final answer to a call.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

enum Attempt {
    Done(Answer),
    /// Worth another try: throttled, a server error, or no answer at all.
    Transient {
        error: HubError,
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help.
    Fatal(HubError),
}

/// The error for a hub's refusal, logged with its fields.
fn refused(hub: &Hub, call: &Call<'_>, answer: &Answer) -> HubError {
    let error = refusal(hub, call, answer);
    tracing::warn!(
        hub = %hub.host_name,
        device_id = call.device_id,
        status = error.status,
        error = %error,
        "hub refused the call"
    );
    error
}

/// `IoT hub h answered 401 Unauthorized to GET /devices/d: {"Message":"ErrorCode:…"}`.
fn refusal(hub: &Hub, call: &Call<'_>, answer: &Answer) -> HubError {
    HubError::new(
        Some(answer.status.as_u16()),
        format!(
            "IoT hub {} answered {} to {}: {}",
            hub.host_name,
            answer.status,
            call.describe(),
            error_text(&answer.body)
        ),
    )
}

/// The hub's error body on one line, cut to [`MAX_ERROR_TEXT_CHARS`].
fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no error text)".to_owned();
    }
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MAX_ERROR_TEXT_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// `Retry-After` in seconds (the form IoT Hub uses); an HTTP date is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A reqwest error with its causes, which carry the useful part (refused, TLS, timeout).
/// Shared with the webhook client.
pub(crate) fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// True when TLS itself refused the peer (certificate, protocol), not the network.
/// Shared with the webhook client.
pub(crate) fn is_tls_refusal(error: &reqwest::Error) -> bool {
    /// rustls errors reach reqwest wrapped in `io::Error`s, whose `source` skips the wrapped
    /// error, so each `io::Error` is opened with `get_ref`.
    fn holds_rustls_error(cause: &(dyn std::error::Error + 'static)) -> bool {
        if cause.is::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if holds_rustls_error(inner) {
                return true;
            }
        }
        cause.source().is_some_and(holds_rustls_error)
    }
    std::error::Error::source(error).is_some_and(holds_rustls_error)
}

fn check_device_id(device_id: &str) -> Result<(), HubError> {
    if device_id.is_empty() || device_id.len() > MAX_DEVICE_ID_LEN {
        return Err(HubError::new(
            None,
            format!("the device ID must be 1 to {MAX_DEVICE_ID_LEN} characters long"),
        ));
    }
    Ok(())
}

/// The Device JSON DPS writes (§10.2): SAS keys, or the X.509 thumbprint.
fn device_json(identity: &DeviceIdentity) -> Result<Value, HubError> {
    let authentication = identity.authentication().ok_or_else(|| {
        HubError::new(
            None,
            format!(
                "device '{}' has neither a symmetric key nor a certificate thumbprint",
                identity.device_id
            ),
        )
    })?;
    Ok(json!({
        "deviceId": identity.device_id,
        "status": "enabled",
        "authentication": authentication,
        "capabilities": { "iotEdge": identity.iot_edge },
    }))
}

/// `{"tags": {…}, "properties": {"desired": {…}}}` from a hub twin or a caller's twin: absent
/// or non-object parts become `{}`, and the hub's `$metadata` and `$version` are dropped.
fn managed_twin(twin: &Value) -> Twin {
    let object = |value: Option<&Value>| {
        value
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let tags = object(twin.get("tags"));
    let mut desired: Map<String, Value> = object(twin.pointer("/properties/desired"));
    desired.remove("$metadata");
    desired.remove("$version");
    json!({ "tags": tags, "properties": { "desired": desired } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_one_line_and_bounded() {
        assert_eq!(error_text(b"  a\nb  "), "a b");
        assert_eq!(error_text(b""), "(no error text)");
        let long = "x".repeat(1000);
        assert_eq!(
            error_text(long.as_bytes()).chars().count(),
            MAX_ERROR_TEXT_CHARS + 1
        );
    }

    #[test]
    fn device_ids_are_encoded_as_one_path_segment() {
        let hub = Hub {
            host_name: "hub.example:8443".to_owned(),
            key_name: "owner".to_owned(),
            key: vec![1],
        };
        let url = hub
            .url(&Call::new(Method::GET, "devices", "a/b c:d"))
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://hub.example:8443/devices/a%2Fb%20c%3Ad?api-version=2021-04-12"
        );
    }

    #[test]
    fn a_missing_secondary_key_repeats_the_primary() {
        let identity = DeviceIdentity {
            device_id: "d".to_owned(),
            primary_key: Some("cHJpbWFyeQ==".to_owned()),
            secondary_key: None,
            x509_thumbprint: None,
            iot_edge: true,
        };
        let device = device_json(&identity).unwrap();
        assert_eq!(
            device["authentication"]["symmetricKey"]["secondaryKey"],
            "cHJpbWFyeQ=="
        );
        assert_eq!(device["capabilities"]["iotEdge"], true);
    }

    #[test]
    fn an_x509_device_is_self_signed_with_its_thumbprint_in_both_slots() {
        let identity = DeviceIdentity {
            device_id: "d".to_owned(),
            primary_key: None,
            secondary_key: None,
            x509_thumbprint: Some("AB".repeat(32)),
            iot_edge: false,
        };
        let device = device_json(&identity).unwrap();
        assert_eq!(device["authentication"]["type"], "selfSigned");
        assert_eq!(
            device["authentication"]["x509Thumbprint"]["secondaryThumbprint"],
            "AB".repeat(32)
        );
        assert!(device["authentication"].get("symmetricKey").is_none());
    }
}
