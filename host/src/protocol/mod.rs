//! Transports: bytes in, calls to the service API and the provisioning core out.
//! `tls` builds the server's TLS configuration; `https` is the listener on port 443, which
//! hands device paths to `device_http` and WebSocket upgrades (`websocket`) to `mqtt` or
//! `amqp` by subprotocol; `mqtt` also serves port 8883 and `amqp` port 5671.

pub mod amqp;
pub mod device_http;
pub mod https;
pub mod mqtt;
pub mod tls;
pub mod websocket;
