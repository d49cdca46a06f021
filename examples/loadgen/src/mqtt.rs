//! A device over MQTT 3.1.1 (wire-protocol.md §5), with rumqttc's `mqttbytes::v4` codec, the
//! one Berth's server uses: CONNECT (client ID = registration ID, username
//! `{idScope}/registrations/{id}/api-version=…`, password = SAS token or none for X.509),
//! SUBSCRIBE `$dps/registrations/res/#`, then one PUBLISH per request, answered on
//! `$dps/registrations/res/{status}/?$rid={rid}[&retry-after=n]`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::device::{Answer, DpsRequest, API_VERSION};
use crate::net;
use crate::outcome::{Failure, FailureKind};

/// Largest packet accepted from the server.
const MAX_PACKET: usize = 128 * 1024;
/// Packets read while waiting for one answer before giving up on the connection.
const MAX_PACKETS_PER_ANSWER: usize = 16;
const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const KEEP_ALIVE_SECONDS: u16 = 60;

/// One device's MQTT connection, opened at its first request.
pub struct MqttLink {
    address: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
    client_id: String,
    username: String,
    password: Option<String>,
    session: Option<Session>,
    next_rid: u32,
    next_packet_id: u16,
}

struct Session {
    stream: TlsStream<TcpStream>,
    buffer: BytesMut,
}

impl Session {
    async fn send(&mut self, packet: &Packet) -> Result<(), Failure> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, MAX_PACKET)
            .map_err(|e| Failure::protocol(format!("encoding {packet:?}: {e:?}")))?;
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| Failure::new(FailureKind::Io, e.to_string()))?;
        self.stream
            .flush()
            .await
            .map_err(|e| Failure::new(FailureKind::Io, e.to_string()))
    }

    async fn receive(&mut self) -> Result<Packet, Failure> {
        loop {
            match Packet::read(&mut self.buffer, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(CodecError::InsufficientBytes(_)) => {
                    let mut chunk = [0u8; 4096];
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .await
                        .map_err(|e| Failure::new(FailureKind::Io, e.to_string()))?;
                    if n == 0 {
                        return Err(Failure::new(
                            FailureKind::Io,
                            "the server closed the MQTT connection",
                        ));
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(error) => {
                    return Err(Failure::protocol(format!(
                        "malformed MQTT packet: {error:?}"
                    )))
                }
            }
        }
    }
}

/// The status, `$rid` and retry-after of a response topic; `None` for other topics.
fn parse_response_topic(topic: &str) -> Option<(u16, &str, Option<Duration>)> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let mut rid = None;
    let mut retry_after = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("$rid", value)) => rid = Some(value),
            Some(("retry-after", value)) => {
                retry_after = value.parse::<u64>().ok().map(Duration::from_secs);
            }
            _ => {}
        }
    }
    Some((status, rid?, retry_after))
}

impl MqttLink {
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
            client_id: registration_id.to_owned(),
            username: format!(
                "{id_scope}/registrations/{registration_id}/api-version={API_VERSION}&ClientVersion=berth-loadgen%2F{}",
                env!("CARGO_PKG_VERSION")
            ),
            password,
            session: None,
            next_rid: 1,
            next_packet_id: 1,
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        id
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

    /// TLS, CONNECT and CONNACK, SUBSCRIBE and SUBACK.
    async fn connect(&mut self) -> Result<Session, Failure> {
        let stream = net::connect(
            self.address,
            Arc::clone(&self.config),
            self.server_name.clone(),
            self.timeout,
        )
        .await?;
        let mut session = Session {
            stream,
            buffer: BytesMut::with_capacity(4096),
        };
        let mut connect = Connect::new(self.client_id.clone());
        connect.keep_alive = KEEP_ALIVE_SECONDS;
        // An empty password is left out of the packet: X.509 devices send none.
        connect.login = Some(Login::new(
            self.username.clone(),
            self.password.clone().unwrap_or_default(),
        ));
        session.send(&Packet::Connect(connect)).await?;
        match self.within("answer", session.receive()).await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => {
                return Err(Failure::new(
                    FailureKind::MqttRefused(return_code(ack.code)),
                    format!("CONNECT refused: {:?}", ack.code),
                ))
            }
            other => {
                return Err(Failure::protocol(format!(
                    "expected CONNACK, got {other:?}"
                )))
            }
        }
        let pkid = self.packet_id();
        let mut subscribe = Subscribe::new(RESPONSE_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        session.send(&Packet::Subscribe(subscribe)).await?;
        match self.within("answer", session.receive()).await? {
            Packet::SubAck(ack)
                if ack.pkid == pkid
                    && matches!(
                        ack.return_codes.first(),
                        Some(SubscribeReasonCode::Success(_))
                    ) => {}
            other => {
                return Err(Failure::protocol(format!(
                    "the subscription to {RESPONSE_FILTER} was not granted: {other:?}"
                )))
            }
        }
        Ok(session)
    }

    /// Publishes a request at `QoS` 1 and waits for its response.
    pub async fn request(
        &mut self,
        request: &DpsRequest<'_>,
        registration_body: &[u8],
    ) -> Result<Answer, Failure> {
        let mut session = match self.session.take() {
            Some(session) => session,
            None => self.connect().await?,
        };
        let rid = self.next_rid.to_string();
        self.next_rid += 1;
        let (topic, payload) = match request {
            DpsRequest::Register => (
                format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
                registration_body.to_vec(),
            ),
            DpsRequest::Poll(operation_id) => (
                format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"
                ),
                Vec::new(),
            ),
        };
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = self.packet_id();
        session.send(&Packet::Publish(publish)).await?;
        let answer = self
            .within("answer", Self::await_answer(&mut session, &rid))
            .await?;
        self.session = Some(session);
        Ok(answer)
    }

    async fn await_answer(session: &mut Session, rid: &str) -> Result<Answer, Failure> {
        for _ in 0..MAX_PACKETS_PER_ANSWER {
            match session.receive().await? {
                Packet::PubAck(_) | Packet::PingResp => {}
                Packet::Publish(response) => {
                    if response.qos == QoS::AtLeastOnce {
                        session
                            .send(&Packet::PubAck(PubAck::new(response.pkid)))
                            .await?;
                    }
                    let Some((status, answered, retry_after)) =
                        parse_response_topic(&response.topic)
                    else {
                        return Err(Failure::protocol(format!(
                            "a publish on '{}', which is no DPS response topic",
                            response.topic
                        )));
                    };
                    if answered == rid {
                        return Ok(Answer {
                            status,
                            retry_after,
                            body: Bytes::from(response.payload.to_vec()),
                        });
                    }
                }
                other => {
                    return Err(Failure::protocol(format!(
                        "unexpected MQTT packet {other:?}"
                    )))
                }
            }
        }
        Err(Failure::protocol(format!(
            "no response for $rid={rid} among {MAX_PACKETS_PER_ANSWER} packets"
        )))
    }

    /// DISCONNECT and close, best effort (not part of the timing).
    pub async fn close(mut self) {
        if let Some(mut session) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = session.send(&Packet::Disconnect).await;
                let _ = session.stream.shutdown().await;
            })
            .await;
        }
    }
}

fn return_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_response_topics() {
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=7&retry-after=3"),
            Some((202, "7", Some(Duration::from_secs(3))))
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?$rid=8"),
            Some((200, "8", None))
        );
        assert_eq!(parse_response_topic("devices/x/messages"), None);
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?x=1"),
            None
        );
    }
}
