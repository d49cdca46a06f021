//! AMQP 1.0 for DPS (wire-protocol.md §6): over TLS on port 5671 and over WebSocket on the
//! HTTPS port (subprotocol `AMQPWSB10`, any path). The connection, session and link machinery
//! is `fe2o3-amqp`'s acceptor; every fe2o3 type stays inside this module.
//!
//! A connection:
//! 1. The 8-byte protocol header chooses the credential: the SASL header (`AMQP 3 1 0 0`) for
//!    symmetric keys (`PLAIN`: authcid `{idScope}/registrations/{id}`, password the SAS token)
//!    and TPM (the `TPM` mechanism, §6.3: the `authenticationKey` blob in challenges, then a SAS
//!    token signed with the key it delivered); the AMQP header (`AMQP 0 1 0 0`) for X.509
//!    devices, whose TLS client certificate is the credential. SASL runs here, frame by
//!    frame with fe2o3's codec, so that the check can be asynchronous; a failed check is
//!    answered with the SASL outcome `auth`.
//! 2. `open`, one `begin`, and two links on `{idScope}/registrations/{id}` (spelled with an
//!    `amqps://host/` prefix or a leading `/` by some SDKs): the device's sender (requests)
//!    and receiver (responses). A SASL device's links must name the identity it proved, or
//!    the link is closed with `amqp:unauthorized-access`. An X.509 device's links are
//!    accepted and its requests judged, so a refused device gets the DPS error on its
//!    request (the Node client never returns when every attach is refused).
//! 3. Requests (`iotdps-operation-type` `iotdps-register` or `iotdps-get-operationstatus`
//!    with `iotdps-operation-id`) are settled `accepted` and answered on the receiver link
//!    with one data section of JSON, the correlation id echoed, and `retry-after` /
//!    `Retry-After` while assigning. A refused request is settled `rejected` with the DPS
//!    error body as the description.
//!
//! Malformed frames, oversized messages, silence and protocol errors end that connection only.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::FromRequestParts as _;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SessionAcceptor};
use fe2o3_amqp::frames::sasl::{Frame as SaslFrame, FrameCodec as SaslCodec};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::types::definitions::Role;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpFailure, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Properties, Target, TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, Binary, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use fe2o3_amqp::{Receiver, Sendable, Sender};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::codec::{Decoder as _, Encoder as _};

use crate::error::ServiceError;
use crate::provisioning::{
    DeviceCall, DeviceRegistration, OperationStatus, Protocol, Provisioning, RETRY_AFTER_SECONDS,
};

const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// TLS, the protocol header, SASL, `open`, `begin` and both attaches must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection with no request for this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(240);
/// Sending a response waits this long for the device's credit.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest request accepted: a 96 KB body plus headers, as on the other transports.
const MAX_MESSAGE: u64 = 96 * 1024 + 2048;
const MAX_FRAME: u32 = 64 * 1024;
/// SASL frames come before `open`, so both sides keep to the 512-byte minimum frame size.
const MAX_SASL_FRAME: usize = 512;
const OPERATION_TYPE: &str = "iotdps-operation-type";
const OPERATION_ID: &str = "iotdps-operation-id";
const REGISTER: &str = "iotdps-register";
const OPERATION_STATUS: &str = "iotdps-get-operationstatus";

/// How a connection ended early; only logged.
#[derive(Debug, thiserror::Error)]
enum AmqpEnd {
    #[error("the connection closed")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Refused(String),
    #[error("AMQP: {0}")]
    Protocol(String),
}

fn protocol_error(error: impl std::fmt::Display) -> AmqpEnd {
    AmqpEnd::Protocol(error.to_string())
}

/// Who the device proved to be in SASL; X.509 devices prove it per request.
#[derive(Debug, Clone)]
struct SaslIdentity {
    id_scope: String,
    registration_id: String,
    /// The SAS token, checked again with every request as on the other transports.
    authorization: String,
}

/// Accepts AMQP-over-TLS connections until `shutdown` resolves.
pub async fn run_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    provisioning: Arc<Provisioning>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    super::tls::serve_device_port(
        "AMQP",
        listener,
        tls,
        shutdown,
        move |stream, peer, chain| {
            connection(
                stream,
                provisioning.clone(),
                Protocol::Amqp,
                Some(peer.ip()),
                chain,
            )
        },
    )
    .await;
}

/// Upgrades an HTTPS request offering the `AMQPWSB10` subprotocol to an AMQP connection.
pub async fn websocket(
    provisioning: Arc<Provisioning>,
    mut parts: Parts,
    peer: Option<IpAddr>,
) -> Response {
    let Some(token) = super::websocket::offered_subprotocol(&parts.headers, "AMQPWSB10") else {
        let error = ServiceError::invalid("AMQP over WebSocket needs the 'AMQPWSB10' subprotocol");
        return crate::service_api::error_response(error);
    };
    let certificates = parts
        .extensions
        .get::<crate::service_api::ClientCertificates>()
        .map(|c| c.0.clone());
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .protocols([token])
        // A WebSocket message carries AMQP frames (at most MAX_FRAME each, a message spanning
        // several); twice the largest request leaves room for the frames' own headers.
        .max_message_size(usize::try_from(MAX_MESSAGE).map_or(usize::MAX, |m| m.saturating_mul(2)))
        .on_upgrade(move |socket| {
            super::websocket::bridge(socket, move |stream| {
                connection(stream, provisioning, Protocol::AmqpWs, peer, certificates)
            })
        })
}

/// True when a WebSocket upgrade asks for AMQP rather than MQTT.
pub fn wants_websocket(headers: &axum::http::HeaderMap) -> bool {
    super::websocket::offered_subprotocol(headers, "AMQPWSB10").is_some()
}

/// Serves one AMQP connection to its end.
pub async fn connection<S>(
    stream: S,
    provisioning: Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
    certificates: Option<Arc<Vec<Vec<u8>>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: the connection's state machine is large, and it lives as long as the connection.
    let outcome = Box::pin(serve(stream, &provisioning, protocol, peer, certificates)).await;
    match outcome {
        Ok(()) | Err(AmqpEnd::Closed) => tracing::debug!(peer = ?peer, "AMQP connection ended"),
        Err(error) => {
            tracing::info!(peer = ?peer, error = %error, "AMQP connection closed by the server");
        }
    }
}

async fn serve<S>(
    mut stream: S,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
    certificates: Option<Arc<Vec<Vec<u8>>>>,
) -> Result<(), AmqpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut header = [0u8; 8];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut header))
        .await
        .map_err(|_| AmqpEnd::Timeout("protocol header"))?
        .map_err(|_| AmqpEnd::Closed)?;
    match header {
        SASL_HEADER => {
            let identity = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                sasl(&mut stream, provisioning, protocol, peer),
            )
            .await
            .map_err(|_| AmqpEnd::Timeout("SASL"))??;
            // fe2o3 wants a Debug stream; nothing is replayed after SASL.
            let stream = Rewind::new(Vec::new(), stream);
            session(stream, provisioning, protocol, peer, Some(identity), None).await
        }
        AMQP_HEADER => {
            let Some(certificates) = certificates.filter(|c| !c.is_empty()) else {
                // No SASL and no certificate: say that SASL is required, then close.
                stream.write_all(&SASL_HEADER).await?;
                let _ = stream.shutdown().await;
                return Err(AmqpEnd::Refused(
                    "an AMQP header without SASL needs a TLS client certificate (X.509)".to_owned(),
                ));
            };
            let replay = Rewind::new(header.to_vec(), stream);
            session(
                replay,
                provisioning,
                protocol,
                peer,
                None,
                Some(certificates),
            )
            .await
        }
        _ => {
            // Not AMQP 1.0 (§2.2 of the AMQP spec): answer with the header we speak, close.
            stream.write_all(&SASL_HEADER).await?;
            let _ = stream.shutdown().await;
            Err(AmqpEnd::Refused(format!(
                "protocol header {header:02x?} is not AMQP 1.0"
            )))
        }
    }
}

// ---- SASL ------------------------------------------------------------------------------

async fn read_sasl_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Result<SaslFrame, AmqpEnd> {
    let size = usize::try_from(stream.read_u32().await.map_err(|_| AmqpEnd::Closed)?)
        .unwrap_or(usize::MAX);
    if !(8..=MAX_SASL_FRAME).contains(&size) {
        return Err(AmqpEnd::Protocol(format!(
            "SASL frame of {size} bytes; 8 to {MAX_SASL_FRAME} are allowed"
        )));
    }
    let mut body = BytesMut::zeroed(size - 4);
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| AmqpEnd::Closed)?;
    SaslCodec {}
        .decode(&mut body)
        .map_err(protocol_error)?
        .ok_or_else(|| AmqpEnd::Protocol("an empty SASL frame".to_owned()))
}

async fn write_sasl_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: SaslFrame,
) -> Result<(), AmqpEnd> {
    let mut body = BytesMut::new();
    SaslCodec {}
        .encode(frame, &mut body)
        .map_err(protocol_error)?;
    let size = u32::try_from(body.len() + 4).map_err(protocol_error)?;
    stream.write_all(&size.to_be_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    Ok(())
}

async fn sasl_outcome<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: SaslCode,
) -> Result<(), AmqpEnd> {
    write_sasl_frame(
        stream,
        SaslFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        }),
    )
    .await
}

/// Runs SASL after the client's SASL header: offers `TPM` and `PLAIN` (Java checks that its
/// mechanism is offered), checks the credential, answers the outcome.
async fn sasl<S>(
    stream: &mut S,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
) -> Result<SaslIdentity, AmqpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&SASL_HEADER).await?;
    write_sasl_frame(
        stream,
        SaslFrame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: Array::from(vec![Symbol::from("TPM"), Symbol::from("PLAIN")]),
        }),
    )
    .await?;
    let SaslFrame::Init(init) = read_sasl_frame(stream).await? else {
        return Err(AmqpEnd::Protocol("expected sasl-init".to_owned()));
    };
    let response = init
        .initial_response
        .map(Binary::into_vec)
        .unwrap_or_default();
    match init.mechanism.as_str() {
        "PLAIN" => {
            let identity = plain(&response);
            let checked: Result<(), String> = match &identity {
                Some(identity) => provisioning
                    .authenticate(DeviceCall {
                        id_scope: &identity.id_scope,
                        registration_id: &identity.registration_id,
                        authorization: Some(&identity.authorization),
                        protocol,
                        client: peer,
                        api_version: None,
                        certificates: None,
                    })
                    .await
                    .map_err(|e| e.to_string()),
                None => Err(
                    "the PLAIN response is not \\0{idScope}/registrations/{id}\\0{SAS token}"
                        .to_owned(),
                ),
            };
            match (identity, checked) {
                (Some(identity), Ok(())) => {
                    sasl_outcome(stream, SaslCode::Ok).await?;
                    Ok(identity)
                }
                (_, Err(why)) => {
                    sasl_outcome(stream, SaslCode::Auth).await?;
                    Err(AmqpEnd::Refused(format!("SASL PLAIN refused: {why}")))
                }
                (None, Ok(())) => Err(AmqpEnd::Closed),
            }
        }
        "TPM" => match tpm(stream, provisioning, protocol, peer, &response).await {
            Ok(identity) => {
                sasl_outcome(stream, SaslCode::Ok).await?;
                Ok(identity)
            }
            Err(TpmStep::Refused(why)) => {
                sasl_outcome(stream, SaslCode::Auth).await?;
                Err(AmqpEnd::Refused(format!("SASL TPM refused: {why}")))
            }
            Err(TpmStep::Ended(end)) => Err(end),
        },
        other => {
            sasl_outcome(stream, SaslCode::Auth).await?;
            Err(AmqpEnd::Refused(format!(
                "SASL mechanism '{other}' is not offered"
            )))
        }
    }
}

/// How the TPM exchange stopped: a refusal (answered with the outcome `auth`) or the
/// connection's end.
enum TpmStep {
    Refused(String),
    Ended(AmqpEnd),
}

impl From<AmqpEnd> for TpmStep {
    fn from(end: AmqpEnd) -> Self {
        Self::Ended(end)
    }
}

/// Control bytes of the TPM mechanism's challenges (§6.3): a blob segment, the last one,
/// and the segment's sequence number in the low bits.
const SEGMENT: u8 = 0x80;
const LAST_SEGMENT: u8 = 0x40;

async fn challenge<S>(stream: &mut S, bytes: Vec<u8>) -> Result<Vec<u8>, AmqpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_sasl_frame(
        stream,
        SaslFrame::Challenge(fe2o3_amqp::types::sasl::SaslChallenge {
            challenge: Binary::from(bytes),
        }),
    )
    .await?;
    match read_sasl_frame(stream).await? {
        SaslFrame::Response(response) => Ok(response.response.into_vec()),
        _ => Err(AmqpEnd::Protocol("expected sasl-response".to_owned())),
    }
}

/// The SASL `TPM` mechanism (wire-protocol.md §6.3): init `\0 idScope \0 registrationId \0
/// EK`, challenge `[0x00]` for the SRK, the `authenticationKey` blob in two segments, then the
/// SAS token signed with the key the blob delivered.
async fn tpm<S>(
    stream: &mut S,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
    init: &[u8],
) -> Result<SaslIdentity, TpmStep>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refused = |why: &str| TpmStep::Refused(why.to_owned());
    let malformed = "the TPM sasl-init is not \\0{idScope}\\0{registrationId}\\0{EK}";
    let rest = init
        .strip_prefix(&[0u8])
        .ok_or_else(|| refused(malformed))?;
    let (scope, rest) = split_nul(rest).ok_or_else(|| refused(malformed))?;
    let (registration_id, endorsement_key) = split_nul(rest).ok_or_else(|| refused(malformed))?;
    let (Ok(id_scope), Ok(registration_id)) = (
        std::str::from_utf8(scope),
        std::str::from_utf8(registration_id),
    ) else {
        return Err(refused(malformed));
    };
    let srk = challenge(stream, vec![0x00]).await?;
    let storage_root_key = srk
        .strip_prefix(&[0u8])
        .ok_or_else(|| refused("the response to the SRK challenge does not start with 0x00"))?;
    let presented =
        crate::provisioning::tpm::Presented::from_raw(endorsement_key, storage_root_key)
            .map_err(|e| TpmStep::Refused(e.to_string()))?;
    let mut call = DeviceCall {
        id_scope,
        registration_id,
        authorization: None,
        protocol,
        client: peer,
        api_version: None,
        certificates: None,
    };
    // A device the service refuses still gets a (useless) blob and is refused at the end:
    // the Node client hangs when the outcome comes in the middle of the exchange.
    let (blob, refusal) = match provisioning.tpm_challenge(call, &presented).await {
        Ok(blob) => (blob, None),
        Err(error) if error.status() == 401 => (
            crate::provisioning::tpm::decoy(&presented)
                .map_err(|e| TpmStep::Refused(e.to_string()))?,
            Some(error.to_string()),
        ),
        Err(error) => return Err(TpmStep::Refused(error.to_string())),
    };
    let blob = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, blob)
        .map_err(|e| TpmStep::Ended(protocol_error(e)))?;
    let (first, second) = blob.split_at(blob.len().div_ceil(2));
    let mut segment = vec![SEGMENT];
    segment.extend_from_slice(first);
    challenge(stream, segment).await?;
    let mut segment = vec![SEGMENT | LAST_SEGMENT | 1];
    segment.extend_from_slice(second);
    let sas = challenge(stream, segment).await?;
    let token = sas
        .strip_prefix(&[0u8])
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| refused("the last TPM response is not \\0 followed by a SAS token"))?;
    if let Some(why) = refusal {
        return Err(TpmStep::Refused(why));
    }
    call.authorization = Some(token);
    provisioning
        .authenticate(call)
        .await
        .map_err(|e| TpmStep::Refused(e.to_string()))?;
    Ok(SaslIdentity {
        id_scope: id_scope.to_owned(),
        registration_id: registration_id.to_owned(),
        authorization: token.to_owned(),
    })
}

/// Splits at the first NUL byte: (before, after).
fn split_nul(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == 0)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// `[authzid] \0 authcid \0 passwd`, authcid `{idScope}/registrations/{registrationId}`.
fn plain(response: &[u8]) -> Option<SaslIdentity> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let authcid = std::str::from_utf8(parts.next()?).ok()?;
    let password = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    let (id_scope, registration_id) = parse_address(authcid)?;
    Some(SaslIdentity {
        id_scope,
        registration_id,
        authorization: password.to_owned(),
    })
}

/// `{idScope}/registrations/{registrationId}`, after dropping an `amqps://host/` prefix and a
/// leading `/` (§6.4). The registration ID is percent-decoded.
fn parse_address(address: &str) -> Option<(String, String)> {
    let path = match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, path)| path),
        None => address,
    };
    let mut segments = path.trim_start_matches('/').split('/');
    let id_scope = segments.next().filter(|s| !s.is_empty())?;
    if !segments.next()?.eq_ignore_ascii_case("registrations") {
        return None;
    }
    let registration_id = segments.next().filter(|s| !s.is_empty())?;
    if segments.next().is_some_and(|s| !s.is_empty()) {
        return None;
    }
    let registration_id = percent_encoding::percent_decode_str(registration_id)
        .decode_utf8()
        .ok()?
        .into_owned();
    Some((id_scope.to_owned(), registration_id))
}

// ---- connection, session, links ------------------------------------------------------

/// The two links of a device and the address they name.
struct Links {
    from_device: Receiver,
    to_device: Sender,
    id_scope: String,
    registration_id: String,
    api_version: Option<String>,
}

fn unauthorized_error(message: &str) -> AmqpFailure {
    let body = ServiceError::Unauthorized(message.to_owned())
        .device_body(&uuid::Uuid::new_v4().to_string());
    AmqpFailure::new(AmqpError::UnauthorizedAccess, Some(body.to_string()), None)
}

async fn session<S>(
    stream: S,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
    identity: Option<SaslIdentity>,
    certificates: Option<Arc<Vec<Vec<u8>>>>,
) -> Result<(), AmqpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
{
    let acceptor = ConnectionAcceptor::builder()
        .container_id("berth")
        .max_frame_size(MAX_FRAME)
        .build();
    let (mut connection, links) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut connection = acceptor.accept(stream).await.map_err(protocol_error)?;
        let mut session = SessionAcceptor::new()
            .accept(&mut connection)
            .await
            .map_err(protocol_error)?;
        let links = attach_links(&mut session, identity.as_ref()).await;
        Ok::<_, AmqpEnd>((connection, links.map(|l| (l, session))))
    })
    .await
    .map_err(|_| AmqpEnd::Timeout("open, begin and attach"))??;
    let (mut links, mut session) = match links {
        Ok(pair) => pair,
        Err(error) => {
            let _ = connection.close().await;
            return Err(error);
        }
    };
    let authorization = identity.as_ref().map(|i| i.authorization.clone());
    let outcome = requests(
        &mut links,
        provisioning,
        protocol,
        peer,
        authorization.as_deref(),
        certificates.as_deref().map(Vec::as_slice),
    )
    .await;
    let _ = links.to_device.close().await;
    let _ = links.from_device.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    outcome
}

/// Accepts the device's sender and receiver links, both on the device's address.
async fn attach_links(
    session: &mut fe2o3_amqp::acceptor::ListenerSessionHandle,
    identity: Option<&SaslIdentity>,
) -> Result<Links, AmqpEnd> {
    let acceptor = LinkAcceptor::builder()
        .max_message_size(MAX_MESSAGE)
        .build();
    let mut from_device: Option<Receiver> = None;
    let mut to_device: Option<Sender> = None;
    let mut named: Option<(String, String)> = None;
    let mut api_version = None;
    while from_device.is_none() || to_device.is_none() {
        let mut attach: Attach = session
            .next_incoming_attach()
            .await
            .ok_or(AmqpEnd::Closed)?;
        let address = match attach.role {
            // The device sends on this link: the address is its target.
            Role::Sender => attach.target.as_deref().and_then(|t| match t {
                TargetArchetype::Target(target) => target.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            }),
            Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
        };
        if api_version.is_none() {
            api_version = attach_property(&attach, "com.microsoft:api-version");
        }
        // proton-j (Java SDK) attaches its receiver without a target; fe2o3 refuses that.
        if attach.role == Role::Receiver && attach.target.is_none() {
            attach.target = Some(Box::new(TargetArchetype::Target(Target::default())));
        }
        let parsed = address.as_deref().and_then(parse_address);
        let refusal = match (&parsed, identity, &named) {
            (None, _, _) => Some(format!(
                "the link address '{}' is not {{idScope}}/registrations/{{registrationId}}",
                address.as_deref().unwrap_or("")
            )),
            (Some((scope, id)), Some(identity), _)
                if !scope.eq_ignore_ascii_case(&identity.id_scope)
                    || !id.eq_ignore_ascii_case(&identity.registration_id) =>
            {
                Some(format!(
                    "the link address names {scope}/registrations/{id}, but the connection \
                     authenticated {}/registrations/{}",
                    identity.id_scope, identity.registration_id
                ))
            }
            (Some(a), _, Some(b))
                if !a.0.eq_ignore_ascii_case(&b.0) || !a.1.eq_ignore_ascii_case(&b.1) =>
            {
                Some("both links of a connection must name the same registration".to_owned())
            }
            _ => None,
        };
        let endpoint = acceptor
            .accept_incoming_attach(attach, session)
            .await
            .map_err(protocol_error)?;
        if let Some(why) = refusal {
            let error = unauthorized_error(&why);
            match endpoint {
                LinkEndpoint::Sender(sender) => {
                    let _ = sender.close_with_error(error).await;
                }
                LinkEndpoint::Receiver(receiver) => {
                    let _ = receiver.close_with_error(error).await;
                }
            }
            return Err(AmqpEnd::Refused(why));
        }
        named = parsed;
        match endpoint {
            LinkEndpoint::Receiver(mut receiver) => {
                receiver.set_auto_accept(false);
                from_device = Some(receiver);
            }
            LinkEndpoint::Sender(sender) => to_device = Some(sender),
        }
    }
    let (id_scope, registration_id) = named.ok_or(AmqpEnd::Closed)?;
    match (from_device, to_device) {
        (Some(from_device), Some(to_device)) => Ok(Links {
            from_device,
            to_device,
            id_scope,
            registration_id,
            api_version,
        }),
        _ => Err(AmqpEnd::Closed),
    }
}

fn attach_property(attach: &Attach, name: &str) -> Option<String> {
    let properties: &Fields = attach.properties.as_ref()?;
    match properties.get(&Symbol::from(name))? {
        Value::String(text) => Some(text.clone()),
        Value::Symbol(symbol) => Some(symbol.as_str().to_owned()),
        _ => None,
    }
}

// ---- requests -------------------------------------------------------------------------

/// A request's operation, from its application properties.
#[derive(Debug, PartialEq, Eq)]
enum Operation {
    Register,
    Status(String),
}

fn application_property(message: &Message<Body<Value>>, name: &str) -> Option<String> {
    let properties = message.application_properties.as_ref()?;
    match properties.0.get(name)? {
        fe2o3_amqp::types::primitives::SimpleValue::String(text) => Some(text.clone()),
        fe2o3_amqp::types::primitives::SimpleValue::Symbol(symbol) => {
            Some(symbol.as_str().to_owned())
        }
        _ => None,
    }
}

fn operation(message: &Message<Body<Value>>) -> Result<Operation, ServiceError> {
    match application_property(message, OPERATION_TYPE).as_deref() {
        Some(REGISTER) => Ok(Operation::Register),
        Some(OPERATION_STATUS) => application_property(message, OPERATION_ID)
            .filter(|id| !id.is_empty())
            .map(Operation::Status)
            .ok_or_else(|| {
                ServiceError::invalid(format!(
                    "{OPERATION_STATUS} needs the application property {OPERATION_ID}"
                ))
            }),
        Some(other) => Err(ServiceError::invalid(format!(
            "operation type '{other}' is not {REGISTER} or {OPERATION_STATUS}"
        ))),
        None => Err(ServiceError::invalid(format!(
            "the request has no application property {OPERATION_TYPE}"
        ))),
    }
}

/// The body's bytes, whatever section carries them (C sends data, C# an amqp-value string).
fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(batch) => batch
            .iter()
            .flat_map(|data| data.0.iter().copied())
            .collect(),
        Body::Value(value) => match &value.0 {
            Value::String(text) => text.as_bytes().to_vec(),
            Value::Binary(bytes) => bytes.to_vec(),
            _ => Vec::new(),
        },
        Body::Sequence(_) | Body::Empty => Vec::new(),
    }
}

async fn requests(
    links: &mut Links,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<IpAddr>,
    authorization: Option<&str>,
    certificates: Option<&[Vec<u8>]>,
) -> Result<(), AmqpEnd> {
    loop {
        let delivery: Delivery<Body<Value>> =
            match tokio::time::timeout(IDLE_LIMIT, links.from_device.recv()).await {
                Err(_) => return Err(AmqpEnd::Timeout("idle")),
                Ok(Ok(delivery)) => delivery,
                Ok(Err(error)) => {
                    return match error {
                        fe2o3_amqp::link::RecvError::LinkStateError(_) => Err(AmqpEnd::Closed),
                        other => Err(protocol_error(other)),
                    }
                }
            };
        let correlation_id: Option<MessageId> = delivery
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone());
        let call = DeviceCall {
            id_scope: &links.id_scope,
            registration_id: &links.registration_id,
            authorization,
            protocol,
            client: peer,
            api_version: links.api_version.as_deref(),
            certificates,
        };
        let outcome = match operation(delivery.message()) {
            Ok(Operation::Register) => {
                let bytes = body_bytes(delivery.body());
                let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                    Ok(DeviceRegistration::default())
                } else {
                    serde_json::from_slice::<DeviceRegistration>(&bytes)
                        .map_err(|e| ServiceError::MalformedBody(e.to_string()))
                };
                match body {
                    Ok(body) => provisioning.register(call, body).await,
                    Err(error) => Err(error),
                }
            }
            Ok(Operation::Status(operation_id)) => {
                provisioning.operation_status(call, &operation_id).await
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(status) => {
                links
                    .from_device
                    .accept(&delivery)
                    .await
                    .map_err(protocol_error)?;
                respond(&mut links.to_device, &status, correlation_id).await?;
            }
            Err(error) => {
                links
                    .from_device
                    .reject(&delivery, rejection(&error))
                    .await
                    .map_err(protocol_error)?;
            }
        }
    }
}

/// A refused request: the DPS error body as the description, the condition by status, and
/// `retry-after` for throttling.
fn rejection(error: &ServiceError) -> AmqpFailure {
    let condition: ErrorCondition = match error.status() {
        401 | 403 => AmqpError::UnauthorizedAccess.into(),
        404 => AmqpError::NotFound.into(),
        429 => ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")),
        500.. => AmqpError::InternalError.into(),
        _ => AmqpError::InvalidField.into(),
    };
    let body = error.device_body(&uuid::Uuid::new_v4().to_string());
    let info = match error {
        ServiceError::Throttled { retry_after, .. } => {
            let mut fields = Fields::new();
            fields.insert(
                Symbol::from("retry-after"),
                Value::Int(i32::try_from(*retry_after).unwrap_or(i32::MAX)),
            );
            fields.insert(
                Symbol::from("Retry-After"),
                Value::Int(i32::try_from(*retry_after).unwrap_or(i32::MAX)),
            );
            Some(fields)
        }
        _ => None,
    };
    AmqpFailure::new(condition, Some(body.to_string()), info)
}

async fn respond(
    to_device: &mut Sender,
    status: &OperationStatus,
    correlation_id: Option<MessageId>,
) -> Result<(), AmqpEnd> {
    let body = serde_json::to_vec(status).map_err(protocol_error)?;
    let properties = Properties {
        correlation_id,
        content_type: Some(Symbol::from("application/json")),
        content_encoding: Some(Symbol::from("utf-8")),
        ..Properties::default()
    };
    let mut application = ApplicationProperties::builder();
    if status.is_assigning() {
        let seconds = i32::try_from(RETRY_AFTER_SECONDS).unwrap_or(i32::MAX);
        application = application
            .insert("retry-after", seconds)
            .insert("Retry-After", seconds);
    }
    let message = Message::builder()
        .properties(properties)
        .application_properties(application.build())
        .data(Binary::from(body))
        .build();
    let sendable = Sendable::builder().message(message).settled(true).build();
    tokio::time::timeout(SEND_TIMEOUT, to_device.send(sendable))
        .await
        .map_err(|_| AmqpEnd::Timeout("no credit to send the response"))?
        .map_err(protocol_error)?;
    Ok(())
}

// ---- replaying the protocol header ----------------------------------------------------

/// A stream that first yields the bytes already read (the protocol header), then the rest.
struct Rewind<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<S> std::fmt::Debug for Rewind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind")
            .field("replayed", &self.offset)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let rest = &self.prefix[self.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.offset += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_every_sdk_spelling() {
        let expected = Some(("0ne00000001".to_owned(), "dev-1".to_owned()));
        assert_eq!(parse_address("0ne00000001/registrations/dev-1"), expected);
        assert_eq!(parse_address("/0ne00000001/registrations/dev-1"), expected);
        assert_eq!(
            parse_address("amqps://localhost/0ne00000001/registrations/dev-1"),
            expected
        );
        assert_eq!(parse_address("0ne00000001/Registrations/dev-1"), expected);
        assert_eq!(parse_address("0ne00000001/devices/dev-1"), None);
        assert_eq!(parse_address("0ne00000001/registrations/"), None);
        assert_eq!(parse_address("0ne00000001/registrations/a/b"), None);
        assert_eq!(parse_address(""), None);
    }

    #[test]
    fn plain_responses() {
        let identity =
            plain(b"\x000ne00000001/registrations/dev-1\x00SharedAccessSignature sr=x").unwrap();
        assert_eq!(identity.registration_id, "dev-1");
        assert_eq!(identity.authorization, "SharedAccessSignature sr=x");
        assert!(plain(b"no separators").is_none());
        assert!(plain(b"\x00not-an-address\x00sas").is_none());
        assert!(plain(b"\x000ne1/registrations/d\x00sas\x00extra").is_none());
    }
}
