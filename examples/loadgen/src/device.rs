//! One simulated device: register, poll until a final answer, over HTTPS (its own connection
//! or a shared kept-alive one), MQTT or AMQP. The register/poll logic is the same for every
//! transport; only [`Link::request`] differs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::amqp::AmqpLink;
use crate::certs::DeviceCertificate;
use crate::cli::{Poll, Settings, Transport};
use crate::http::{self, Endpoint, Pool};
use crate::mqtt::MqttLink;
use crate::outcome::{snippet, Failure, FailureKind};
use crate::sas;

/// The device API version sent (the C SDK's and Edge's).
pub const API_VERSION: &str = "2021-06-01";
/// Register attempts answered 429 or 503 before the device gives up.
const REGISTER_ATTEMPTS: u32 = 5;
/// What a device waits when the server asks it to wait but says not how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// `--poll immediate`: the wait after the first "still assigning" poll, doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Path segment characters left as they are.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

/// What a device asks.
#[derive(Debug, Clone, Copy)]
pub enum DpsRequest<'a> {
    Register,
    Poll(&'a str),
}

/// An answer in transport-neutral form: HTTP status (or the MQTT topic's status; over AMQP
/// 202 for `assigning`, 200 for other answers, and for a rejected request the status of its
/// `errorCode`), the retry-after the server sent, the JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// How devices prove who they are.
pub enum Credentials {
    /// Group-derived keys from the group's primary key (raw bytes).
    Symmetric { group_key: Vec<u8> },
    /// A certificate per device (index = device number), presented with the CA.
    X509 {
        ca: CertificateDer<'static>,
        devices: Vec<DeviceCertificate>,
    },
}

/// What all devices of a run share.
pub struct Context {
    pub settings: Settings,
    pub endpoint: Endpoint,
    pub pool: Option<Pool>,
    pub credentials: Credentials,
}

/// The result of one device.
#[derive(Debug)]
pub struct DeviceResult {
    pub index: u64,
    /// Time from the first byte sent to the assigned answer.
    pub outcome: Result<Duration, Failure>,
    pub polls: u32,
    pub throttled: u32,
}

#[derive(Default)]
struct Counters {
    polls: u32,
    throttled: u32,
}

enum Link<'a> {
    Dedicated(http::Dedicated<'a>),
    Pooled(&'a Pool),
    Mqtt(Box<MqttLink>),
    Amqp(Box<AmqpLink>),
}

impl Link<'_> {
    async fn request(
        &mut self,
        context: &Context,
        registration_id: &str,
        token: Option<&str>,
        request: DpsRequest<'_>,
    ) -> Result<Answer, Failure> {
        let body = registration_body(registration_id);
        let make = || https_request(context, registration_id, token, request, &body);
        let reply = match self {
            Link::Dedicated(connection) => connection.send(make).await?,
            Link::Pooled(pool) => pool.send(make).await?,
            Link::Mqtt(link) => return link.request(&request, &body).await,
            Link::Amqp(link) => return link.request(&request, &body).await,
        };
        Ok(Answer {
            status: reply.status,
            retry_after: reply.retry_after(),
            body: reply.body,
        })
    }
}

fn registration_body(registration_id: &str) -> Vec<u8> {
    serde_json::json!({ "registrationId": registration_id })
        .to_string()
        .into_bytes()
}

fn https_request(
    context: &Context,
    registration_id: &str,
    token: Option<&str>,
    request: DpsRequest<'_>,
    body: &[u8],
) -> Result<hyper::Request<http_body_util::Full<Bytes>>, Failure> {
    let scope = utf8_percent_encode(&context.settings.id_scope, SEGMENT);
    let id = utf8_percent_encode(registration_id, SEGMENT);
    let (method, path, body) = match request {
        DpsRequest::Register => (
            Method::PUT,
            format!("/{scope}/registrations/{id}/register?api-version={API_VERSION}"),
            Some(body.to_vec()),
        ),
        DpsRequest::Poll(operation_id) => (
            Method::GET,
            format!(
                "/{scope}/registrations/{id}/operations/{}?api-version={API_VERSION}",
                utf8_percent_encode(operation_id, SEGMENT)
            ),
            None,
        ),
    };
    http::request(method, &context.settings.target, &path, token, body, &[])
}

fn json(body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::protocol(format!("a body that is not JSON ({e}): {}", snippet(body))))
}

/// A final answer (`assigned`, `failed`, `disabled`): Ok for an assignment with its hub and
/// device ID, the registration error otherwise.
fn final_state(body: &Value) -> Result<(), Failure> {
    let state = body.get("registrationState");
    let field = |name: &str| {
        state
            .and_then(|s| s.get(name))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    match body.get("status").and_then(Value::as_str) {
        Some("assigned") => {
            if field("assignedHub").is_some() && field("deviceId").is_some() {
                Ok(())
            } else {
                Err(Failure::protocol(
                    "assigned without registrationState.assignedHub and deviceId",
                ))
            }
        }
        Some(status @ ("failed" | "disabled")) => Err(Failure::new(
            FailureKind::Registration {
                status: status.to_owned(),
                error_code: state
                    .and_then(|s| s.get("errorCode"))
                    .and_then(Value::as_i64),
            },
            field("errorMessage").unwrap_or("(no errorMessage)"),
        )),
        other => Err(Failure::protocol(format!(
            "a final answer with status {other:?}"
        ))),
    }
}

/// Register, then poll until a final answer; bounded by --max-polls and the register retries.
async fn register_and_poll(
    link: &mut Link<'_>,
    context: &Context,
    registration_id: &str,
    token: Option<&str>,
    counters: &mut Counters,
) -> Result<(), Failure> {
    let settings = &context.settings;
    let mut attempts = 0;
    let (operation_id, mut wait) = loop {
        attempts += 1;
        let answer = link
            .request(context, registration_id, token, DpsRequest::Register)
            .await?;
        match answer.status {
            200 | 202 => {
                let body = json(&answer.body)?;
                if body.get("status").and_then(Value::as_str) != Some("assigning") {
                    // A terminal answer to register is allowed (wire-protocol.md §3.4).
                    return final_state(&body);
                }
                let operation_id = body
                    .get("operationId")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| Failure::protocol("an assigning answer with no operationId"))?
                    .to_owned();
                let wait = match settings.poll {
                    Poll::Immediate => Duration::ZERO,
                    Poll::RetryAfter => answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                };
                break (operation_id, wait);
            }
            429 | 503 if attempts < REGISTER_ATTEMPTS => {
                counters.throttled += 1;
                tokio::time::sleep(answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)).await;
            }
            status => return Err(Failure::status(status, &answer.body)),
        }
    };
    let mut backoff = FIRST_BACKOFF;
    while counters.polls < settings.max_polls {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        counters.polls += 1;
        let answer = link
            .request(
                context,
                registration_id,
                token,
                DpsRequest::Poll(&operation_id),
            )
            .await?;
        wait = match answer.status {
            200 => return final_state(&json(&answer.body)?),
            202 => match settings.poll {
                Poll::Immediate => {
                    let this = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    this
                }
                Poll::RetryAfter => answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            },
            429 | 503 => {
                counters.throttled += 1;
                answer.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)
            }
            status => return Err(Failure::status(status, &answer.body)),
        };
    }
    Err(Failure::new(
        FailureKind::PollsExhausted,
        format!("still assigning after {} polls", settings.max_polls),
    ))
}

/// Runs device `index` to its end. Its credentials are made before the clock starts.
pub async fn run(context: Arc<Context>, index: u64) -> DeviceResult {
    let settings = &context.settings;
    let registration_id = settings.registration_id(index);
    let mut counters = Counters::default();
    let prepared = prepare(&context, index, &registration_id);
    let (token, config) = match prepared {
        Ok(prepared) => prepared,
        Err(failure) => {
            return DeviceResult {
                index,
                outcome: Err(failure),
                polls: 0,
                throttled: 0,
            }
        }
    };
    let mut link = match settings.transport {
        Transport::Https => Link::Dedicated(http::Dedicated::new(&context.endpoint, config)),
        Transport::HttpsKeepalive => match &context.pool {
            Some(pool) => Link::Pooled(pool),
            None => Link::Dedicated(http::Dedicated::new(&context.endpoint, config)),
        },
        Transport::Mqtt => Link::Mqtt(Box::new(MqttLink::new(
            settings.mqtt.unwrap_or_else(|| settings.target.https()),
            config,
            context.endpoint.tls.server_name.clone(),
            settings.request_timeout,
            &settings.id_scope,
            &registration_id,
            token.clone(),
        ))),
        Transport::Amqp => Link::Amqp(Box::new(AmqpLink::new(
            settings.amqp.unwrap_or_else(|| settings.target.https()),
            config,
            context.endpoint.tls.server_name.clone(),
            settings.request_timeout,
            &settings.id_scope,
            &registration_id,
            token.clone(),
        ))),
    };
    let started = Instant::now();
    let flow = register_and_poll(
        &mut link,
        &context,
        &registration_id,
        token.as_deref(),
        &mut counters,
    );
    let outcome = match tokio::time::timeout(settings.device_timeout, flow).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(Failure::timeout("device", settings.device_timeout)),
    };
    match link {
        Link::Mqtt(link) => link.close().await,
        Link::Amqp(link) => link.close().await,
        Link::Dedicated(_) | Link::Pooled(_) => {}
    }
    DeviceResult {
        index,
        outcome,
        polls: counters.polls,
        throttled: counters.throttled,
    }
}

/// The device's SAS token (symmetric keys) and its TLS configuration (with its certificate
/// for X.509).
fn prepare(
    context: &Context,
    index: u64,
    registration_id: &str,
) -> Result<(Option<String>, Arc<rustls::ClientConfig>), Failure> {
    match &context.credentials {
        Credentials::Symmetric { group_key } => {
            let key = sas::derive_device_key(group_key, registration_id);
            let token = sas::device_token(&context.settings.id_scope, registration_id, &key);
            Ok((Some(token), Arc::clone(&context.endpoint.tls.anonymous)))
        }
        Credentials::X509 { ca, devices } => {
            let device = usize::try_from(index)
                .ok()
                .and_then(|i| devices.get(i))
                .ok_or_else(|| {
                    Failure::new(FailureKind::Internal, "no certificate for this device")
                })?;
            let chain = vec![device.leaf.clone(), ca.clone()];
            let key = PrivateKeyDer::Pkcs8(device.key.clone_key());
            let config = context
                .endpoint
                .tls
                .with_client_certificate(chain, key)
                .map_err(|e| Failure::new(FailureKind::Tls, e.to_string()))?;
            Ok((None, config))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_assignment_needs_its_hub_and_device_id() {
        let assigned = json!({"operationId": "o", "status": "assigned", "registrationState": {
            "registrationId": "d", "status": "assigned", "assignedHub": "h.example.net", "deviceId": "d"}});
        assert!(final_state(&assigned).is_ok());
        let hubless = json!({"operationId": "o", "status": "assigned", "registrationState": {
            "registrationId": "d", "status": "assigned", "deviceId": "d"}});
        assert_eq!(
            final_state(&hubless).unwrap_err().kind,
            FailureKind::Protocol
        );
    }

    #[test]
    fn a_failed_registration_carries_its_error_code() {
        let failed = json!({"operationId": "o", "status": "failed", "registrationState": {
            "registrationId": "d", "status": "failed", "errorCode": 400_209, "errorMessage": "no"}});
        let failure = final_state(&failed).unwrap_err();
        assert_eq!(
            failure.kind,
            FailureKind::Registration {
                status: "failed".into(),
                error_code: Some(400_209)
            }
        );
        assert_eq!(failure.message, "no");
    }
}
