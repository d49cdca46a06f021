//! A device over AMQP 1.0 (wire-protocol.md §6) with fe2o3-amqp's client, the crate Berth's
//! server uses, on a TLS stream opened here (the client certificate is the X.509 credential):
//! the SASL header with PLAIN (authcid `{idScope}/registrations/{id}`, password the SAS token)
//! for symmetric keys, the bare AMQP header for X.509; `open`, one `begin`, a receiver and a
//! sender link on `{idScope}/registrations/{id}`. A request is one message with the
//! application property `iotdps-operation-type` (and `iotdps-operation-id` for a status poll)
//! and a `correlation-id`; the server settles it `accepted` and answers on the receiver link
//! with one data section of JSON, or settles it `rejected` with the DPS error as the
//! description.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::link::{
    DetachError, LinkStateError, ReceiverAttachError, RecvError, SendError, SenderAttachError,
};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::types::sasl::SaslCode;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::device::{Answer, DpsRequest, API_VERSION};
use crate::net;
use crate::outcome::{snippet, Failure, FailureKind};

const OPERATION_TYPE: &str = "iotdps-operation-type";
const OPERATION_ID: &str = "iotdps-operation-id";
const REGISTER: &str = "iotdps-register";
const OPERATION_STATUS: &str = "iotdps-get-operationstatus";
/// Messages read while waiting for one answer before giving up on the connection.
const MAX_MESSAGES_PER_ANSWER: usize = 16;
/// Detach, end and close after the device is done: best effort, not timed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One device's AMQP connection, opened at its first request.
pub struct AmqpLink {
    address: SocketAddr,
    config: Arc<ClientConfig>,
    /// Checked in the TLS handshake, and sent as the `hostname` of `open`.
    server_name: ServerName<'static>,
    timeout: Duration,
    registration_id: String,
    /// `{idScope}/registrations/{registrationId}`: both links, and the SASL authcid.
    link_address: String,
    /// The SAS token for SASL PLAIN; `None` for X.509 (no SASL layer).
    password: Option<String>,
    session: Option<AmqpSession>,
    next_correlation: u64,
}

struct AmqpSession {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
}

/// The name of an error condition, e.g. `amqp:unauthorized-access`.
fn condition_name(condition: &ErrorCondition) -> String {
    match condition {
        ErrorCondition::AmqpError(error) => Symbol::from(error).as_str().to_owned(),
        ErrorCondition::ConnectionError(error) => Symbol::from(error).as_str().to_owned(),
        ErrorCondition::SessionError(error) => Symbol::from(error).as_str().to_owned(),
        ErrorCondition::LinkError(error) => Symbol::from(error).as_str().to_owned(),
        ErrorCondition::Custom(symbol) => symbol.as_str().to_owned(),
        #[allow(unreachable_patterns)] // the `transaction` feature adds a variant
        other => format!("{other:?}"),
    }
}

/// A whole number of seconds from an AMQP value (ints of any width, or a numeric string).
fn seconds(value: &Value) -> Option<Duration> {
    let n: Option<u64> = match value {
        Value::Ubyte(n) => Some(u64::from(*n)),
        Value::Ushort(n) => Some(u64::from(*n)),
        Value::Uint(n) => Some(u64::from(*n)),
        Value::Ulong(n) => Some(*n),
        Value::Byte(n) => u64::try_from(*n).ok(),
        Value::Short(n) => u64::try_from(*n).ok(),
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Long(n) => u64::try_from(*n).ok(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    };
    n.map(Duration::from_secs)
}

fn simple_seconds(value: &SimpleValue) -> Option<Duration> {
    let n: Option<u64> = match value {
        SimpleValue::Ubyte(n) => Some(u64::from(*n)),
        SimpleValue::Ushort(n) => Some(u64::from(*n)),
        SimpleValue::Uint(n) => Some(u64::from(*n)),
        SimpleValue::Ulong(n) => Some(*n),
        SimpleValue::Byte(n) => u64::try_from(*n).ok(),
        SimpleValue::Short(n) => u64::try_from(*n).ok(),
        SimpleValue::Int(n) => u64::try_from(*n).ok(),
        SimpleValue::Long(n) => u64::try_from(*n).ok(),
        SimpleValue::String(text) => text.trim().parse().ok(),
        _ => None,
    };
    n.map(Duration::from_secs)
}

/// A refusal (a `rejected` outcome, or a link or connection closed with an error) as an
/// answer with a status: DPS error codes are the HTTP status × 1000 + n, so the status is
/// the JSON description's `errorCode` ÷ 1000; without one it follows the condition. The body
/// is the description (the DPS error JSON), so the failure carries its `errorCode` and
/// `message`.
fn refusal(error: Option<&AmqpError>) -> Answer {
    let Some(error) = error else {
        return Answer {
            status: 400,
            retry_after: None,
            body: Bytes::from_static(b"rejected without an error"),
        };
    };
    let condition = condition_name(&error.condition);
    let description = error.description.clone().unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_str(&description).ok();
    let from_code = parsed
        .as_ref()
        .and_then(|v| v.get("errorCode"))
        .and_then(serde_json::Value::as_i64)
        .map(|code| code / 1000)
        .filter(|status| (400..600).contains(status))
        .and_then(|status| u16::try_from(status).ok());
    let status = from_code.unwrap_or(match condition.as_str() {
        "amqp:unauthorized-access" => 401,
        "amqp:not-found" => 404,
        "com.microsoft:device-container-throttled" | "amqp:resource-limit-exceeded" => 429,
        "amqp:internal-error" => 500,
        _ => 400,
    });
    let retry_after = error.info.as_deref().and_then(|info: &Fields| {
        info.get(&Symbol::from("retry-after"))
            .or_else(|| info.get(&Symbol::from("Retry-After")))
            .and_then(seconds)
    });
    let body = if parsed.is_some() {
        Bytes::from(description)
    } else if description.is_empty() {
        Bytes::from(condition)
    } else {
        Bytes::from(format!("{condition}: {description}"))
    };
    Answer {
        status,
        retry_after,
        body,
    }
}

/// A refusal that ends the connection (at open, attach or later) as a failure.
fn refused(error: &AmqpError) -> Failure {
    let answer = refusal(Some(error));
    Failure::status(answer.status, &answer.body)
}

fn amqp(what: &str, error: impl std::fmt::Display) -> Failure {
    Failure::new(FailureKind::Amqp, format!("{what}: {error}"))
}

fn open_failure(error: OpenError) -> Failure {
    match error {
        OpenError::SaslError {
            code,
            additional_data,
        } => {
            let (number, name) = match code {
                SaslCode::Ok => (0, "ok"),
                SaslCode::Auth => (1, "auth"),
                SaslCode::Sys => (2, "sys"),
                SaslCode::SysPerm => (3, "sys-perm"),
                SaslCode::SysTemp => (4, "sys-temp"),
            };
            let data = additional_data
                .map(|d| format!(", additional data {}", snippet(&d)))
                .unwrap_or_default();
            Failure::new(
                FailureKind::SaslOutcome(number),
                format!("the server answered SASL PLAIN with the outcome {name}{data}"),
            )
        }
        OpenError::RemoteClosedWithError(error) => refused(&error),
        other => amqp("open", other),
    }
}

fn detach_failure(what: &str, error: DetachError) -> Failure {
    match error {
        DetachError::RemoteDetachedWithError(error) | DetachError::RemoteClosedWithError(error) => {
            refused(&error)
        }
        other => amqp(what, other),
    }
}

fn link_state_failure(what: &str, error: LinkStateError) -> Failure {
    match error {
        LinkStateError::RemoteDetachedWithError(error)
        | LinkStateError::RemoteClosedWithError(error) => refused(&error),
        other => amqp(what, other),
    }
}

fn send_failure(error: SendError) -> Failure {
    match error {
        SendError::LinkStateError(error) => link_state_failure("sending the request", error),
        SendError::Detached(error) => detach_failure("sending the request", error),
        other => amqp("sending the request", other),
    }
}

fn recv_failure(error: RecvError) -> Failure {
    match error {
        RecvError::LinkStateError(error) => link_state_failure("receiving the answer", error),
        other => amqp("receiving the answer", other),
    }
}

fn sender_attach_failure(error: SenderAttachError) -> Failure {
    match error {
        SenderAttachError::RemoteClosedWithError(error) => refused(&error),
        other => amqp("attaching the request link", other),
    }
}

fn receiver_attach_failure(error: ReceiverAttachError) -> Failure {
    match error {
        ReceiverAttachError::RemoteClosedWithError(error) => refused(&error),
        other => amqp("attaching the response link", other),
    }
}

/// The attach properties Node, C# and C send (informational for the server).
fn attach_properties() -> Fields {
    let mut fields = Fields::new();
    fields.insert(
        Symbol::from("com.microsoft:api-version"),
        Value::String(API_VERSION.to_owned()),
    );
    fields.insert(
        Symbol::from("com.microsoft:client-version"),
        Value::String(concat!("berth-loadgen/", env!("CARGO_PKG_VERSION")).to_owned()),
    );
    fields
}

impl AmqpLink {
    pub fn new(
        address: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        timeout: Duration,
        id_scope: &str,
        registration_id: &str,
        password: Option<String>,
    ) -> Self {
        Self {
            address,
            config,
            server_name,
            timeout,
            registration_id: registration_id.to_owned(),
            link_address: format!("{id_scope}/registrations/{registration_id}"),
            password,
            session: None,
            next_correlation: 1,
        }
    }

    async fn within<T>(
        &self,
        what: &'static str,
        work: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Failure::timeout(what, self.timeout))?
    }

    /// TCP and TLS (each within the timeout), then SASL, `open`, `begin` and both attaches
    /// (together within the timeout).
    async fn connect(&self) -> Result<AmqpSession, Failure> {
        let stream = net::connect(
            self.address,
            Arc::clone(&self.config),
            self.server_name.clone(),
            self.timeout,
        )
        .await?;
        let host = self.server_name.to_str();
        // Boxed: fe2o3's open is a large future, and a device holds it only while connecting.
        self.within(
            "open",
            Box::pin(async {
                let mut builder = Connection::builder()
                    .container_id(format!("berth-loadgen {}", self.registration_id))
                    .hostname(&*host);
                if let Some(password) = &self.password {
                    builder = builder.sasl_profile(SaslProfile::Plain {
                        username: self.link_address.clone(),
                        password: password.clone(),
                    });
                }
                let mut connection = builder
                    .open_with_stream(stream)
                    .await
                    .map_err(open_failure)?;
                let mut session = Session::begin(&mut connection)
                    .await
                    .map_err(|e| amqp("begin", e))?;
                let receiver = Receiver::builder()
                    .name("berth-loadgen-responses")
                    .source(self.link_address.as_str())
                    .properties(attach_properties())
                    .attach(&mut session)
                    .await
                    .map_err(receiver_attach_failure)?;
                let sender = Sender::builder()
                    .name("berth-loadgen-requests")
                    .target(self.link_address.as_str())
                    .properties(attach_properties())
                    .attach(&mut session)
                    .await
                    .map_err(sender_attach_failure)?;
                Ok(AmqpSession {
                    connection,
                    session,
                    sender,
                    receiver,
                })
            }),
        )
        .await
    }

    /// Sends a request, waits for its outcome, and for an accepted one its response.
    pub async fn request(
        &mut self,
        request: &DpsRequest<'_>,
        registration_body: &[u8],
    ) -> Result<Answer, Failure> {
        let mut session = match self.session.take() {
            Some(session) => session,
            None => Box::pin(self.connect()).await?,
        };
        let correlation = MessageId::from(format!(
            "{}/{}",
            self.registration_id, self.next_correlation
        ));
        self.next_correlation += 1;
        let (properties, body) = match request {
            DpsRequest::Register => (
                ApplicationProperties::builder().insert(OPERATION_TYPE, REGISTER),
                registration_body.to_vec(),
            ),
            DpsRequest::Poll(operation_id) => (
                ApplicationProperties::builder()
                    .insert(OPERATION_TYPE, OPERATION_STATUS)
                    .insert(OPERATION_ID, *operation_id),
                Vec::new(),
            ),
        };
        let message = Message::builder()
            .properties(Properties {
                correlation_id: Some(correlation.clone()),
                ..Properties::default()
            })
            .application_properties(properties.build())
            .data(Binary::from(body))
            .build();
        let outcome = self
            .within("answer", async {
                session.sender.send(message).await.map_err(send_failure)
            })
            .await?;
        let answer = match outcome {
            Outcome::Accepted(_) => {
                self.within("answer", Self::await_answer(&mut session, &correlation))
                    .await?
            }
            Outcome::Rejected(rejected) => refusal(rejected.error.as_ref()),
            other => {
                return Err(Failure::protocol(format!(
                    "the request was settled {other:?}, neither accepted nor rejected"
                )))
            }
        };
        self.session = Some(session);
        Ok(answer)
    }

    async fn await_answer(
        session: &mut AmqpSession,
        correlation: &MessageId,
    ) -> Result<Answer, Failure> {
        for _ in 0..MAX_MESSAGES_PER_ANSWER {
            let delivery = session
                .receiver
                .recv::<Body<Value>>()
                .await
                .map_err(recv_failure)?;
            // Responses come settled; this is a no-op then, and accepts an unsettled one.
            session
                .receiver
                .accept(&delivery)
                .await
                .map_err(|e| amqp("accepting the answer", e))?;
            let message = delivery.message();
            let answered = message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.as_ref());
            if answered != Some(correlation) {
                continue;
            }
            let Body::Data(batch) = delivery.body() else {
                return Err(Failure::protocol(format!(
                    "an answer whose body is not a data section: {:?}",
                    delivery.body()
                )));
            };
            let bytes: Vec<u8> = batch.iter().flat_map(|d| d.0.iter().copied()).collect();
            let retry_after = message.application_properties.as_ref().and_then(|a| {
                a.0.get("retry-after")
                    .or_else(|| a.0.get("Retry-After"))
                    .and_then(simple_seconds)
            });
            // AMQP answers carry no status code (§6.6): `assigning` is the 202 of HTTPS.
            let assigning = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .is_some_and(|v| {
                    v.get("status").and_then(serde_json::Value::as_str) == Some("assigning")
                });
            return Ok(Answer {
                status: if assigning { 202 } else { 200 },
                retry_after,
                body: Bytes::from(bytes),
            });
        }
        Err(Failure::protocol(format!(
            "no answer with correlation-id {correlation:?} among {MAX_MESSAGES_PER_ANSWER} messages"
        )))
    }

    /// Detaches both links, ends the session and closes the connection, best effort (not
    /// part of the timing).
    pub async fn close(mut self) {
        if let Some(session) = self.session.take() {
            let AmqpSession {
                mut connection,
                mut session,
                sender,
                receiver,
            } = session;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = sender.close().await;
                let _ = receiver.close().await;
                let _ = session.end().await;
                let _ = connection.close().await;
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::AmqpError as Condition;

    #[test]
    fn a_rejection_gives_the_status_of_its_error_code() {
        let error = AmqpError::new(
            Condition::UnauthorizedAccess,
            Some(
                r#"{"errorCode":401002,"trackingId":"t","message":"Unauthorized","timestampUtc":"x"}"#
                    .to_owned(),
            ),
            None,
        );
        let failure = refused(&error);
        assert_eq!(
            failure.kind,
            FailureKind::Status {
                status: 401,
                error_code: Some(401_002)
            }
        );
        assert_eq!(failure.message, "Unauthorized");
    }

    #[test]
    fn a_throttled_rejection_carries_its_retry_after() {
        let mut info = Fields::new();
        info.insert(Symbol::from("retry-after"), Value::Int(3));
        let error = AmqpError::new(
            ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")),
            Some(r#"{"errorCode":429001,"message":"slow down"}"#.to_owned()),
            Some(info),
        );
        let answer = refusal(Some(&error));
        assert_eq!(answer.status, 429);
        assert_eq!(answer.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_rejection_without_json_follows_its_condition() {
        let error = AmqpError::new(Condition::NotFound, Some("no such thing".to_owned()), None);
        let failure = refused(&error);
        assert_eq!(
            failure.kind,
            FailureKind::Status {
                status: 404,
                error_code: None
            }
        );
        assert_eq!(failure.message, "amqp:not-found: no such thing");
        assert_eq!(refusal(None).status, 400);
    }
}
