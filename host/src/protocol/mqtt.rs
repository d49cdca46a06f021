//! MQTT 3.1.1 for DPS (wire-protocol.md §5): over TLS on port 8883, and over WebSocket on
//! the HTTPS port (subprotocol `mqtt`, any path). DPS is not a broker: a session is one
//! CONNECT, one subscription to `$dps/registrations/res/#`, and requests on the two request
//! topics, each answered on `$dps/registrations/res/{status}/?$rid={rid}[&retry-after=n]`.
//!
//! The packet codec is rumqttc's `mqttbytes::v4`; the session rules are ours:
//! - CONNECT: protocol level 4, `ClientId` = the registration ID of the username
//!   `{idScope}/registrations/{registrationId}/api-version=…`; the password is the SAS token.
//!   Credentials are checked on each request and a failure answered on `res/401`, as DPS does
//!   (§5.6), so devices get the DPS error body. CONNACK always has `SessionPresent` 0.
//! - SUBSCRIBE: only the response filter is granted, at `QoS` 1 (`QoS` 2 is granted as 1);
//!   other filters get 0x80.
//! - PUBLISH at `QoS` 1 is acknowledged before the response is sent; `QoS` 2, unknown topics,
//!   malformed or oversized packets and keep-alive expiry end the connection (only it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts as _;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use percent_encoding::percent_decode_str;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::error::ServiceError;
use crate::provisioning::{
    DeviceCall, DeviceRegistration, Protocol, Provisioning, RETRY_AFTER_SECONDS,
};

/// The largest packet accepted: a 96 KB body plus topic and headers.
const MAX_PACKET: usize = 96 * 1024 + 2048;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle limit when the client asks for no keep-alive (keep-alive 0).
const IDLE_LIMIT: Duration = Duration::from_secs(300);
const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// Accepts MQTT-over-TLS connections until `shutdown` resolves.
pub async fn run_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    provisioning: Arc<Provisioning>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    super::tls::serve_device_port(
        "MQTT",
        listener,
        tls,
        shutdown,
        move |stream, peer, chain| {
            session(
                stream,
                provisioning.clone(),
                Protocol::Mqtt,
                Some(peer),
                chain,
            )
        },
    )
    .await;
}

/// Upgrades an HTTPS request with `Upgrade: websocket` to an MQTT session, echoing the
/// subprotocol token exactly as the client offered it (`mqtt`, or `MQTT` from the C SDK).
pub async fn websocket(
    provisioning: Arc<Provisioning>,
    mut parts: Parts,
    peer: Option<std::net::IpAddr>,
) -> Response {
    let offered = super::websocket::offered_subprotocol(&parts.headers, "mqtt");
    let Some(token) = offered else {
        let error =
            ServiceError::invalid("WebSocket connections must offer the 'mqtt' subprotocol");
        return crate::service_api::error_response(error);
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let peer = peer.map(|ip| SocketAddr::new(ip, 0));
    let certificates = parts
        .extensions
        .get::<crate::service_api::ClientCertificates>()
        .map(|c| c.0.clone());
    upgrade
        .protocols([token])
        .max_message_size(MAX_PACKET)
        .on_upgrade(move |socket| bridge(socket, provisioning, peer, certificates))
}

/// An MQTT session over a WebSocket: the frames are bridged into the same session code.
async fn bridge(
    socket: WebSocket,
    provisioning: Arc<Provisioning>,
    peer: Option<SocketAddr>,
    certificates: Option<Arc<Vec<Vec<u8>>>>,
) {
    super::websocket::bridge(socket, move |stream| {
        session(stream, provisioning, Protocol::MqttWs, peer, certificates)
    })
    .await;
}

/// Why a session ended early; only logged.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("the connection closed")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed or oversized MQTT packet: {0:?}")]
    Codec(CodecError),
    #[error("idle for too long")]
    Idle,
    #[error("{0}")]
    Refused(String),
}

async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
) -> Result<Packet, SessionEnd> {
    loop {
        match Packet::read(buffer, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(CodecError::InsufficientBytes(_)) => {
                if buffer.len() > MAX_PACKET {
                    return Err(SessionEnd::Codec(CodecError::PayloadSizeLimitExceeded(
                        buffer.len(),
                    )));
                }
                let mut chunk = [0u8; 4096];
                let n = reader.read(&mut chunk).await?;
                if n == 0 {
                    return Err(SessionEnd::Closed);
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            Err(error) => return Err(SessionEnd::Codec(error)),
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(
    writer: &mut W,
    packet: &Packet,
) -> Result<(), SessionEnd> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, usize::MAX)
        .map_err(SessionEnd::Codec)?;
    writer.write_all(&out).await?;
    writer.flush().await?;
    Ok(())
}

/// The identity a CONNECT claims.
#[derive(Debug, PartialEq, Eq)]
struct Claim {
    id_scope: String,
    registration_id: String,
    api_version: Option<String>,
}

/// Parses `{idScope}/registrations/{registrationId}/api-version=…[&ClientVersion=…]`.
fn parse_username(username: &str) -> Option<Claim> {
    let (identity, query) = match username.find("/api-version=") {
        Some(at) => (&username[..at], Some(&username[at + 1..])),
        None => (username.trim_end_matches('/'), None),
    };
    let mut parts = identity.split('/');
    let (id_scope, keyword, registration_id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !keyword.eq_ignore_ascii_case("registrations")
        || id_scope.is_empty()
        || registration_id.is_empty()
    {
        return None;
    }
    let api_version = query.and_then(|q| {
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.eq_ignore_ascii_case("api-version")
                .then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
        })
    });
    Some(Claim {
        id_scope: id_scope.to_owned(),
        registration_id: registration_id.to_owned(),
        api_version,
    })
}

/// A request on one of the two request topics.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Register { rid: String },
    Poll { rid: String, operation_id: String },
}

fn parse_topic(topic: &str) -> Option<Request> {
    let (path, query) = topic.split_once("/?")?;
    let mut rid = None;
    let mut operation_id = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=')?;
        let slot = match key {
            "$rid" => &mut rid,
            "operationId" => &mut operation_id,
            _ => continue,
        };
        if slot.replace(value.to_owned()).is_some() {
            return None;
        }
    }
    // `$rid` is echoed into the response topic: keep it to characters that cannot break it.
    let rid = rid.filter(|r| {
        !r.is_empty()
            && r.len() <= 128
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~%".contains(c))
    })?;
    match path {
        "$dps/registrations/PUT/iotdps-register" => Some(Request::Register { rid }),
        "$dps/registrations/GET/iotdps-get-operationstatus" => {
            let operation_id = operation_id.filter(|o| !o.is_empty() && o.len() <= 256)?;
            Some(Request::Poll { rid, operation_id })
        }
        _ => None,
    }
}

fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    match retry_after {
        Some(seconds) => {
            format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={seconds}")
        }
        None => format!("$dps/registrations/res/{status}/?$rid={rid}"),
    }
}

/// Reads until the protocol name and level of the first packet are known. The first packet
/// must be a CONNECT (type 1).
async fn connect_version<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
) -> Result<(String, u8), SessionEnd> {
    loop {
        if let Some(&first) = buffer.first() {
            if first >> 4 != 1 {
                return Err(SessionEnd::Refused(
                    "the first packet was not CONNECT".to_owned(),
                ));
            }
        }
        if let Some((name, level)) = parse_connect_version(buffer) {
            return Ok((String::from_utf8_lossy(name).into_owned(), level));
        }
        if buffer.len() > 64 {
            return Err(SessionEnd::Refused("a malformed CONNECT".to_owned()));
        }
        let mut chunk = [0u8; 256];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(SessionEnd::Closed);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// The protocol name and level of a CONNECT at the start of `buffer`, once they are there.
fn parse_connect_version(buffer: &[u8]) -> Option<(&[u8], u8)> {
    // Fixed header: the type byte, then one to four bytes of remaining length.
    let mut at = 1;
    loop {
        let byte = *buffer.get(at)?;
        at += 1;
        if byte & 0x80 == 0 || at >= 5 {
            break;
        }
    }
    let length = usize::from(u16::from_be_bytes([*buffer.get(at)?, *buffer.get(at + 1)?]));
    let name = buffer.get(at + 2..at + 2 + length)?;
    let level = *buffer.get(at + 2 + length)?;
    Some((name, level))
}

/// Serves one MQTT connection to its end. `certificates`: the client's TLS certificate
/// chain, the credential of an X.509 device (which then sends no password).
pub async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    provisioning: Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<SocketAddr>,
    certificates: Option<Arc<Vec<Vec<u8>>>>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buffer = BytesMut::with_capacity(4096);
    let outcome = run_session(
        &mut reader,
        &mut writer,
        &mut buffer,
        &provisioning,
        protocol,
        peer,
        certificates.as_deref().map(Vec::as_slice),
    )
    .await;
    match outcome {
        Ok(()) | Err(SessionEnd::Closed) => tracing::debug!(peer = ?peer, "MQTT session ended"),
        Err(error) => {
            tracing::info!(peer = ?peer, error = %error, "MQTT session closed by the server");
        }
    }
    let _ = writer.shutdown().await;
}

async fn run_session<R, W>(
    reader: &mut R,
    writer: &mut W,
    buffer: &mut BytesMut,
    provisioning: &Arc<Provisioning>,
    protocol: Protocol,
    peer: Option<SocketAddr>,
    certificates: Option<&[Vec<u8>]>,
) -> Result<(), SessionEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connack = |code| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        })
    };
    // Refuse other protocol versions with CONNACK 1 before parsing the rest: an MQTT 5
    // CONNECT does not parse as 3.1.1.
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_version(reader, buffer)).await {
        Err(_) => return Err(SessionEnd::Idle),
        Ok(Err(error)) => return Err(error),
        Ok(Ok((name, level))) if name != "MQTT" || level != 4 => {
            write_packet(writer, &connack(ConnectReturnCode::RefusedProtocolVersion)).await?;
            return Err(SessionEnd::Refused(format!(
                "protocol {name} level {level}; DPS speaks MQTT 3.1.1 (level 4)"
            )));
        }
        Ok(Ok(_)) => {}
    }
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(reader, buffer)).await {
        Err(_) => return Err(SessionEnd::Idle),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(_)) => {
            return Err(SessionEnd::Refused(
                "the first packet was not CONNECT".to_owned(),
            ))
        }
    };
    let (username, password) = connect
        .login
        .as_ref()
        .map_or((String::new(), None), |login| {
            (
                login.username.clone(),
                Some(login.password.clone()).filter(|p| !p.is_empty()),
            )
        });
    let Some(claim) = parse_username(&username) else {
        write_packet(writer, &connack(ConnectReturnCode::BadUserNamePassword)).await?;
        return Err(SessionEnd::Refused(format!("username '{username}' is not {{idScope}}/registrations/{{registrationId}}/api-version=…")));
    };
    if !connect
        .client_id
        .eq_ignore_ascii_case(&claim.registration_id)
    {
        write_packet(writer, &connack(ConnectReturnCode::BadClientId)).await?;
        return Err(SessionEnd::Refused(
            "ClientId differs from the username's registration ID".to_owned(),
        ));
    }
    write_packet(writer, &connack(ConnectReturnCode::Success)).await?;
    let idle = if connect.keep_alive == 0 {
        IDLE_LIMIT
    } else {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500)
    };
    let mut next_packet_id: u16 = 0;
    loop {
        let packet = match tokio::time::timeout(idle, read_packet(reader, buffer)).await {
            Err(_) => return Err(SessionEnd::Idle),
            Ok(packet) => packet?,
        };
        match packet {
            Packet::Subscribe(subscribe) => {
                let return_codes = subscribe
                    .filters
                    .iter()
                    .map(|filter| {
                        if filter.path == RESPONSE_FILTER {
                            SubscribeReasonCode::Success(if filter.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                write_packet(
                    writer,
                    &Packet::SubAck(SubAck {
                        pkid: subscribe.pkid,
                        return_codes,
                    }),
                )
                .await?;
            }
            Packet::Unsubscribe(unsubscribe) => {
                write_packet(
                    writer,
                    &Packet::UnsubAck(UnsubAck {
                        pkid: unsubscribe.pkid,
                    }),
                )
                .await?;
            }
            Packet::PingReq => write_packet(writer, &Packet::PingResp).await?,
            Packet::Disconnect => return Ok(()),
            Packet::PubAck(_) => {}
            Packet::Publish(publish) => {
                if publish.qos == QoS::ExactlyOnce {
                    return Err(SessionEnd::Refused(
                        "QoS 2 requests are not supported".to_owned(),
                    ));
                }
                let Some(request) = parse_topic(&publish.topic) else {
                    return Err(SessionEnd::Refused(format!(
                        "'{}' is not a DPS request topic",
                        publish.topic
                    )));
                };
                if publish.qos == QoS::AtLeastOnce {
                    write_packet(writer, &Packet::PubAck(PubAck { pkid: publish.pkid })).await?;
                }
                let call = DeviceCall {
                    id_scope: &claim.id_scope,
                    registration_id: &claim.registration_id,
                    authorization: password.as_deref(),
                    protocol,
                    client: peer.map(|p| p.ip()),
                    api_version: claim.api_version.as_deref(),
                    certificates,
                };
                let (rid, status, body, retry_after) =
                    answer(provisioning, call, request, &publish.payload).await;
                next_packet_id = next_packet_id.checked_add(1).unwrap_or(1);
                let mut response = Publish::new(
                    response_topic(status, &rid, retry_after),
                    QoS::AtLeastOnce,
                    body,
                );
                response.pkid = next_packet_id;
                write_packet(writer, &Packet::Publish(response)).await?;
            }
            other => return Err(SessionEnd::Refused(format!("unexpected packet {other:?}"))),
        }
    }
}

/// Runs a request; returns the `$rid`, the status, the JSON body and the retry-after.
async fn answer(
    provisioning: &Arc<Provisioning>,
    call: DeviceCall<'_>,
    request: Request,
    payload: &[u8],
) -> (String, u16, Vec<u8>, Option<u32>) {
    let tracking_id = uuid::Uuid::new_v4().to_string();
    let (rid, outcome) = match request {
        Request::Register { rid } => {
            let text = String::from_utf8_lossy(payload);
            let body = if text.trim().is_empty() {
                Ok(DeviceRegistration::default())
            } else {
                serde_json::from_str::<DeviceRegistration>(&text)
                    .map_err(|e| ServiceError::MalformedBody(e.to_string()))
            };
            let outcome = match body {
                Ok(body) => provisioning.register(call, body).await,
                Err(error) => Err(error),
            };
            (rid, outcome)
        }
        Request::Poll { rid, operation_id } => {
            let operation_id = percent_decode_str(&operation_id)
                .decode_utf8_lossy()
                .into_owned();
            (
                rid,
                provisioning.operation_status(call, &operation_id).await,
            )
        }
    };
    match outcome {
        Ok(status) => {
            let body = serde_json::to_vec(&status).unwrap_or_default();
            if status.is_assigning() {
                (rid, 202, body, Some(RETRY_AFTER_SECONDS))
            } else {
                (rid, 200, body, None)
            }
        }
        Err(error) => {
            let retry_after = match &error {
                ServiceError::Throttled { retry_after, .. } => Some(*retry_after),
                _ => None,
            };
            let body = error.device_body(&tracking_id);
            (
                rid,
                error.status(),
                serde_json::to_vec(&body).unwrap_or_default(),
                retry_after,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_protocol_version_of_a_connect() {
        let mut out = BytesMut::new();
        Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("dev"))
            .write(&mut out, 1024)
            .unwrap();
        assert_eq!(parse_connect_version(&out), Some((&b"MQTT"[..], 4)));
        assert_eq!(
            parse_connect_version(&[0x10, 0x10, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 3]),
            Some((&b"MQIsdp"[..], 3))
        );
        assert_eq!(parse_connect_version(&[0x10, 0x10, 0x00]), None);
    }

    #[test]
    fn parses_the_usernames_the_sdks_send() {
        let claim = parse_username("0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.0").unwrap();
        assert_eq!(claim.id_scope, "0ne00000001");
        assert_eq!(claim.registration_id, "dev-1");
        assert_eq!(claim.api_version.as_deref(), Some("2019-03-31"));
        assert!(parse_username("0ne00000001/registrations/dev-1/api-version=2019-03-31").is_some());
        assert!(parse_username("0ne00000001/devices/dev-1/api-version=1").is_none());
        assert!(parse_username("garbage").is_none());
        assert!(parse_username("a/registrations/b/c/api-version=1").is_none());
    }

    #[test]
    fn parses_request_topics_and_refuses_others() {
        assert_eq!(
            parse_topic("$dps/registrations/PUT/iotdps-register/?$rid=1"),
            Some(Request::Register { rid: "1".into() })
        );
        assert_eq!(
            parse_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.abc.def"
            ),
            Some(Request::Poll {
                rid: "2".into(),
                operation_id: "4.abc.def".into()
            })
        );
        assert!(parse_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2").is_none());
        assert!(parse_topic("devices/x/messages/events/").is_none());
        assert!(parse_topic("$dps/registrations/PUT/iotdps-register/?$rid=a/b").is_none());
        assert!(parse_topic("$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2").is_none());
        assert_eq!(
            response_topic(202, "7", Some(3)),
            "$dps/registrations/res/202/?$rid=7&retry-after=3"
        );
        assert_eq!(
            response_topic(200, "7", None),
            "$dps/registrations/res/200/?$rid=7"
        );
    }
}
