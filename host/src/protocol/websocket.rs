//! Byte-stream protocols over WebSocket on the HTTPS port (MQTT: subprotocol `mqtt`; AMQP:
//! `AMQPWSB10`): binary frames carry the stream, which the protocol's session code reads like
//! a TLS connection.

use std::future::Future;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

/// Runs `session` on a stream whose bytes are the WebSocket's binary frames, until either
/// side ends. Text frames are not part of these protocols and end the connection.
pub async fn bridge<F, Fut>(socket: WebSocket, session: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let session_task = tokio::spawn(session(theirs));
    let (mut sink, mut stream) = socket.split();
    let (mut from_session, mut to_session) = tokio::io::split(ours);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if to_session.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Close(_)) | Err(_)) | None => break,
            },
            read = from_session.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(buffer[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = sink.close().await;
    session_task.abort();
}

/// The subprotocol token the client offered that equals `wanted` ignoring case, as offered
/// (the C SDK sends `MQTT`, others `mqtt`; the echo must match the offer).
pub fn offered_subprotocol(headers: &axum::http::HeaderMap, wanted: &str) -> Option<String> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|token| token.eq_ignore_ascii_case(wanted))
        .map(str::to_owned)
}
