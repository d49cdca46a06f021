//! Custom allocation by webhook: DPS's `AllocationRequest` sent by POST to the enrollment's
//! `customAllocationDefinition.webhookUrl`, and the `AllocationResponse` read back
//! (wire-protocol.md §9).
//!
//! What a caller can rely on:
//! - the URL is used verbatim, query string included (Azure Functions put their key there), but
//!   the key never appears in the request's enrollment copy, in logs or in a failure message:
//!   the query is shown as `?****`, as DPS's docs show it (§9.1);
//! - the answer is interpreted per the troubleshooting table (§9.3): a 200 naming a linked hub is
//!   a [`CustomDecision`]; a 200 naming no hub is [`CustomFailure::HubNotSpecified`] (400208);
//!   401 is [`CustomFailure::Unauthorized`] (400209); anything else is
//!   [`CustomFailure::Failed`] (400207);
//! - 429, 5xx, timeouts and connection failures are retried on DPS's schedule ("10 times, initial
//!   interval 1 s, then increments of 9 s", read literally as waits of 1, 10, 19, … s; §12 item 21),
//!   so one call can take minutes: the device keeps polling `assigning` meanwhile (§9.3). A TLS
//!   refusal (untrusted or wrong certificate) is not retried: it stays so.
//! - redirects are not followed (a 3xx fails), and an answer is read up to
//!   [`MAX_RESPONSE_BYTES`] only.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::{StatusCode, Url};
use serde_json::{json, Map, Value};

use super::custom::{CustomDecision, CustomFailure, CustomRequest};
use crate::hubs::azure::{error_chain, is_tls_refusal};
use crate::model::enrollment::{redacted, AttestationType, EnrollmentKind};

/// Largest webhook answer read. An `AllocationResponse` is a hub name, a twin (IoT Hub caps tags
/// at 8 KiB and desired properties at 32 KiB) and a payload: 96 KiB leaves room and bounds memory.
pub const MAX_RESPONSE_BYTES: usize = 96 * 1024;
/// Longest wait for the TCP (and TLS) connection, when shorter than the call timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a webhook-supplied string (a hub name) a message or log line carries.
const MAX_QUOTED_CHARS: usize = 256;
/// The `Content-Type` DPS is assumed to send (§9.1: the real headers are UNCONFIRMED).
const REQUEST_CONTENT_TYPE: &str = "application/json; charset=utf-8";
/// What replaces a URL's query (and any user info) wherever the URL is shown.
const MASK: &str = "****";

/// Timeouts and the retry schedule. The defaults are DPS's (§9.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Longest one call may take, answer included. Azure Functions cold starts take 15–30 s.
    pub timeout: Duration,
    /// Total tries of a call that meets 429, 5xx, a timeout or a connection failure (at least 1).
    pub attempts: u32,
    /// Wait before the second try.
    pub initial_interval: Duration,
    /// How much longer each following wait is than the one before.
    pub interval_step: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            attempts: 10,
            initial_interval: Duration::from_secs(1),
            interval_step: Duration::from_secs(9),
        }
    }
}

impl WebhookSettings {
    /// The wait before try number `attempt` (1-based): none before the first, then
    /// `initial_interval`, `initial_interval + interval_step`, … .
    pub fn delay_before(&self, attempt: u32) -> Duration {
        match attempt {
            0 | 1 => Duration::ZERO,
            n => self
                .initial_interval
                .saturating_add(self.interval_step.saturating_mul(n - 2)),
        }
    }
}

/// Calls allocation webhooks over HTTP or HTTPS. Cheap to clone: clones share one connection
/// pool.
#[derive(Clone, Debug)]
pub struct WebhookClient {
    http: reqwest::Client,
    settings: WebhookSettings,
}

impl WebhookClient {
    /// `extra_ca`: a PEM file of CA certificates to trust in addition to the system roots
    /// (tests, webhooks behind a private CA). Plain `http://` webhooks are allowed, as DPS
    /// validates only the URL's form.
    pub fn new(settings: WebhookSettings, extra_ca: Option<&Path>) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // The function key travels in the query: never follow the webhook elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(CONNECT_TIMEOUT))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read the webhook CA file {}: {e}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("the webhook CA file {} is not PEM: {e}", path.display()))?;
            if certificates.is_empty() {
                return Err(format!(
                    "the webhook CA file {} holds no certificate",
                    path.display()
                ));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
        Ok(Self { http, settings })
    }

    /// POSTs the `AllocationRequest` (§9.1) to `url` (verbatim, query string included) and
    /// interprets the answer per the troubleshooting table (§9.3). `api_version` is the
    /// enrollment's `customAllocationDefinition.apiVersion`: DPS serializes the enrollment in
    /// that schema version; Berth has one schema and sends it whatever the version, so the
    /// version is only logged.
    pub async fn allocate(
        &self,
        url: &str,
        api_version: &str,
        request: &CustomRequest,
    ) -> Result<CustomDecision, CustomFailure> {
        let shown_url = masked_url(url);
        let target = parse_webhook_url(url, &shown_url)?;
        let body = serde_json::to_vec(&allocation_request(request)?)
            .map(Bytes::from)
            .map_err(|e| {
                CustomFailure::Failed(format!(
                    "Custom allocation failed: cannot encode the allocation request: {e}"
                ))
            })?;
        let key = url.split_once('?').map(|(_, query)| query);
        let attempts = self.settings.attempts.max(1);
        let mut attempt = 1;
        loop {
            let outcome = self.attempt(target.clone(), body.clone(), key).await;
            let transient = match outcome {
                Attempt::Answer { status, body } => {
                    let decision = interpret(status, &body, request);
                    match &decision {
                        Ok(decision) => tracing::info!(
                            url = %shown_url,
                            registration_id = %request.registration_id,
                            api_version,
                            attempt,
                            status = status.as_u16(),
                            hub = %decision.hub,
                            "allocation webhook assigned a hub"
                        ),
                        Err(failure) => tracing::warn!(
                            url = %shown_url,
                            registration_id = %request.registration_id,
                            api_version,
                            attempt,
                            status = status.as_u16(),
                            error = %failure,
                            "allocation webhook gave no usable hub"
                        ),
                    }
                    return decision;
                }
                Attempt::Fatal(message) => {
                    tracing::warn!(
                        url = %shown_url,
                        registration_id = %request.registration_id,
                        attempt,
                        error = %message,
                        "allocation webhook call failed; not retried"
                    );
                    return Err(CustomFailure::Failed(message));
                }
                Attempt::Transient(transient) => transient,
            };
            if attempt >= attempts {
                tracing::warn!(
                    url = %shown_url,
                    registration_id = %request.registration_id,
                    attempt,
                    status = transient.status(),
                    error = %transient.message(),
                    "allocation webhook call failed; retries exhausted"
                );
                return Err(CustomFailure::Failed(transient.message()));
            }
            let wait = self.settings.delay_before(attempt + 1);
            tracing::warn!(
                url = %shown_url,
                registration_id = %request.registration_id,
                attempt,
                status = transient.status(),
                error = %transient.message(),
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "allocation webhook call failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One try: the POST, and for a success the answer read within [`MAX_RESPONSE_BYTES`].
    /// `key` is the URL's query, scrubbed from any error text that might quote it.
    async fn attempt(&self, url: Url, body: Bytes, key: Option<&str>) -> Attempt {
        let sent = self
            .http
            .post(url)
            .header(CONTENT_TYPE, REQUEST_CONTENT_TYPE)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                let fatal = error.is_builder() || is_tls_refusal(&error);
                let description = self.describe(error, key);
                if fatal {
                    return Attempt::Fatal(format!("Custom allocation failed: {description}"));
                }
                return Attempt::Transient(Transient::Unreachable(description));
            }
        };
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Attempt::Transient(Transient::Status(status));
        }
        if !status.is_success() {
            // 401, other 4xx, and 1xx/3xx (redirects are not followed): the body is not needed.
            return Attempt::Answer {
                status,
                body: Vec::new(),
            };
        }
        let too_large = || {
            Attempt::Fatal(format!(
                "Custom allocation failed: the webhook's answer is larger than \
                 {MAX_RESPONSE_BYTES} bytes"
            ))
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
        {
            return too_large();
        }
        let mut answer = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if answer.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
                        return too_large();
                    }
                    answer.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => {
                    return Attempt::Transient(Transient::Unreachable(format!(
                        "the webhook broke off its answer: {}",
                        self.describe(error, key)
                    )));
                }
            }
        }
        Attempt::Answer {
            status,
            body: answer,
        }
    }

    /// A reqwest error as one line, without the URL (it holds the function key); `key` is
    /// scrubbed too, in case a cause quotes it.
    fn describe(&self, error: reqwest::Error, key: Option<&str>) -> String {
        let error = error.without_url();
        let text = if error.is_timeout() {
            format!(
                "the webhook did not answer within {}",
                shown_duration(self.settings.timeout)
            )
        } else {
            format!("cannot reach the webhook: {}", error_chain(&error))
        };
        match key {
            Some(key) if !key.is_empty() => text.replace(key, MASK),
            _ => text,
        }
    }
}

/// The outcome of one try.
enum Attempt {
    /// An answer to interpret: any status but 429 and 5xx, with the body of a success.
    Answer { status: StatusCode, body: Vec<u8> },
    /// Worth another try.
    Transient(Transient),
    /// Trying again cannot help; the message is the failure's.
    Fatal(String),
}

/// Why a try is worth repeating.
enum Transient {
    /// 429 or 5xx.
    Status(StatusCode),
    /// No answer: connection refused or broken, or the timeout.
    Unreachable(String),
}

impl Transient {
    fn status(&self) -> Option<u16> {
        match self {
            Self::Status(status) => Some(status.as_u16()),
            Self::Unreachable(_) => None,
        }
    }

    /// The failure's message once retries are exhausted.
    fn message(&self) -> String {
        match self {
            Self::Status(status) => status_failure(*status),
            Self::Unreachable(description) => format!("Custom allocation failed: {description}"),
        }
    }
}

/// `30 s`, or `200 ms` when not whole seconds.
fn shown_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// DPS's message for a refusal by status (§9.3).
fn status_failure(status: StatusCode) -> String {
    format!(
        "Custom allocation failed with status code: {}",
        status.as_u16()
    )
}

/// The URL as reqwest needs it; only `http` and `https` are webhooks (`wasm:` is not).
fn parse_webhook_url(url: &str, shown_url: &str) -> Result<Url, CustomFailure> {
    let parsed = Url::parse(url).map_err(|_| {
        CustomFailure::Failed(format!(
            "Custom allocation failed: the webhook URL {shown_url} is not a valid URL"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CustomFailure::Failed(format!(
            "Custom allocation failed: the webhook URL {shown_url} is not an http or https URL"
        )));
    }
    Ok(parsed)
}

/// The `AllocationRequest` body (§9.1).
fn allocation_request(request: &CustomRequest) -> Result<Value, CustomFailure> {
    let mut enrollment = redacted(&request.enrollment);
    if let Some(definition) = enrollment.custom_allocation_definition.as_mut() {
        definition.webhook_url = masked_url(&definition.webhook_url);
    }
    let enrollment = serde_json::to_value(&enrollment).map_err(|e| {
        CustomFailure::Failed(format!(
            "Custom allocation failed: cannot encode the enrollment: {e}"
        ))
    })?;
    let enrollment_field = match request.kind {
        EnrollmentKind::Individual => "individualEnrollment",
        EnrollmentKind::Group => "enrollmentGroup",
    };
    let linked_hubs: Vec<&str> = request
        .linked_hubs
        .iter()
        .map(|hub| hub.name.as_str())
        .collect();
    let mut body = Map::new();
    body.insert(enrollment_field.to_owned(), enrollment);
    body.insert(
        "deviceRuntimeContext".to_owned(),
        device_runtime_context(request),
    );
    body.insert("linkedHubs".to_owned(), json!(linked_hubs));
    Ok(Value::Object(body))
}

/// `deviceRuntimeContext`: the registration ID, the current assignment on re-registration, one
/// attestation sub-object, and the device's payload when it sent one (§9.1).
fn device_runtime_context(request: &CustomRequest) -> Value {
    let mut context = Map::new();
    context.insert(
        "registrationId".to_owned(),
        Value::String(request.registration_id.clone()),
    );
    if let Some(hub) = &request.current_hub {
        context.insert(
            "currentIotHubHostName".to_owned(),
            Value::String(hub.clone()),
        );
    }
    if let Some(device_id) = &request.current_device_id {
        context.insert(
            "currentDeviceId".to_owned(),
            Value::String(device_id.clone()),
        );
    }
    let (name, attestation) = attestation_context(request);
    context.insert(name.to_owned(), attestation);
    if let Some(payload) = &request.payload {
        context.insert("payload".to_owned(), payload.clone());
    }
    Value::Object(context)
}

/// The attestation sub-object of `deviceRuntimeContext`, by the enrollment's attestation type.
///
/// - `symmetricKey`: `{}`, as in DPS's real requests.
/// - `tpm`: `{endorsementKey, storageRootKey}` per the docs table, taken from the enrollment
///   (TPM enrollments are individual; neither key is secret).
/// - `x509`: `clientCertificate`, the leaf as Base64 DER (what third-party functions read),
///   with its `certificateInfo` in the service API's shape and the `certificateChain` as sent.
fn attestation_context(request: &CustomRequest) -> (&'static str, Value) {
    if let Some(leaf) = &request.certificate {
        return (
            "x509",
            json!({
                "clientCertificate": leaf.chain.first(),
                "certificateChain": leaf.chain,
                "certificateInfo": {
                    "subjectName": leaf.subject_name,
                    "sha1Thumbprint": leaf.sha1_thumbprint,
                    "sha256Thumbprint": leaf.sha256_thumbprint,
                    "issuerName": leaf.issuer_name,
                    "notBeforeUtc": leaf.not_before,
                    "notAfterUtc": leaf.not_after,
                    "serialNumber": leaf.serial_number,
                },
            }),
        );
    }
    let attestation = request.enrollment.attestation.as_ref();
    match attestation.map(|a| a.kind) {
        Some(AttestationType::Tpm) => {
            let mut tpm = Map::new();
            if let Some(keys) = attestation.and_then(|a| a.tpm.as_ref()) {
                tpm.insert(
                    "endorsementKey".to_owned(),
                    Value::String(keys.endorsement_key.clone()),
                );
                if let Some(storage_root_key) = &keys.storage_root_key {
                    tpm.insert(
                        "storageRootKey".to_owned(),
                        Value::String(storage_root_key.clone()),
                    );
                }
            }
            ("tpm", Value::Object(tpm))
        }
        Some(AttestationType::X509) => ("x509", json!({})),
        Some(AttestationType::SymmetricKey | AttestationType::None) | None => {
            ("symmetricKey", json!({}))
        }
    }
}

/// The decision or failure for the webhook's answer (§9.2, §9.3). `body` is empty unless the
/// status is a success.
fn interpret(
    status: StatusCode,
    body: &[u8],
    request: &CustomRequest,
) -> Result<CustomDecision, CustomFailure> {
    if status == StatusCode::UNAUTHORIZED {
        return Err(CustomFailure::Unauthorized(status_failure(status)));
    }
    if !status.is_success() {
        return Err(CustomFailure::Failed(status_failure(status)));
    }
    // A success with no body (204) names no hub.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(CustomFailure::HubNotSpecified);
    }
    let answer: Value = serde_json::from_slice(body).map_err(|_| {
        CustomFailure::Failed(format!(
            "Custom allocation failed: the webhook answered {} with a body that is not JSON",
            status.as_u16()
        ))
    })?;
    let Value::Object(answer) = answer else {
        return Err(CustomFailure::Failed(
            "Custom allocation failed: the webhook's answer is not a JSON object".to_owned(),
        ));
    };

    // The docs table spells it `iotHubHostname`, the samples `iotHubHostName` (§9.2).
    let named = match field(&answer, "iotHubHostName") {
        None | Some(Value::Null) => return Err(CustomFailure::HubNotSpecified),
        Some(Value::String(name)) if name.trim().is_empty() => {
            return Err(CustomFailure::HubNotSpecified)
        }
        Some(Value::String(name)) => name.trim(),
        Some(_) => {
            return Err(CustomFailure::Failed(
                "Custom allocation failed: the webhook's iotHubHostName is not a string".to_owned(),
            ))
        }
    };
    let Some(hub) = request
        .linked_hubs
        .iter()
        .find(|hub| hub.name.eq_ignore_ascii_case(named))
    else {
        let linked: Vec<&str> = request
            .linked_hubs
            .iter()
            .map(|hub| hub.name.as_str())
            .collect();
        return Err(CustomFailure::Failed(format!(
            "Custom allocation failed: the webhook returned hub {}, which is not one of the \
             linked hubs ({})",
            quoted(named),
            linked.join(", ")
        )));
    };

    let initial_twin = match field(&answer, "initialTwin") {
        None | Some(Value::Null) => None,
        Some(twin @ Value::Object(_)) => Some(twin.clone()),
        Some(_) => {
            return Err(CustomFailure::Failed(
                "Custom allocation failed: the webhook's initialTwin is not a JSON object"
                    .to_owned(),
            ))
        }
    };
    let payload = match field(&answer, "payload") {
        None | Some(Value::Null) => None,
        Some(payload) => Some(payload.clone()),
    };
    Ok(CustomDecision {
        hub: hub.name.clone(),
        device_id: None,
        initial_twin,
        payload,
    })
}

/// A member of the answer by name, case-insensitively as DPS's .NET deserializer reads it;
/// an exact match wins over other spellings.
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    })
}

/// A webhook-supplied string for a message: quoted, on one line, cut to [`MAX_QUOTED_CHARS`].
fn quoted(text: &str) -> String {
    let mut out = String::from("'");
    for (count, c) in text.chars().enumerate() {
        if count == MAX_QUOTED_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out.push('\'');
    out
}

/// `url` as it may be shown: the query (the function key) replaced by `****`, as DPS's docs
/// show `…/api/HttpTrigger1?****`, and any user info in the authority masked too.
pub fn masked_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, Some(MASK)),
        None => (url, None),
    };
    let mut shown = match base.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{MASK}@{host}{path}"),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if let Some(mask) = query {
        let _ = write!(shown, "?{mask}");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_key_and_user_info_are_masked() {
        assert_eq!(
            masked_url("https://f.example/api/HttpTrigger1?code=secret&x=1"),
            "https://f.example/api/HttpTrigger1?****"
        );
        assert_eq!(
            masked_url("https://f.example/api/a"),
            "https://f.example/api/a"
        );
        assert_eq!(
            masked_url("https://user:pw@f.example/api?code=k"),
            "https://****@f.example/api?****"
        );
        assert_eq!(masked_url("not a url?k"), "not a url?****");
    }

    #[test]
    fn the_default_schedule_is_one_second_then_steps_of_nine() {
        let settings = WebhookSettings::default();
        let waits: Vec<u64> = (1..=settings.attempts)
            .map(|attempt| settings.delay_before(attempt).as_secs())
            .collect();
        assert_eq!(waits, [0, 1, 10, 19, 28, 37, 46, 55, 64, 73]);
    }

    #[test]
    fn webhook_strings_in_messages_are_bounded_and_on_one_line() {
        assert_eq!(quoted("a\nb"), "'a b'");
        assert_eq!(
            quoted(&"x".repeat(1000)).chars().count(),
            MAX_QUOTED_CHARS + 3
        );
    }
}
