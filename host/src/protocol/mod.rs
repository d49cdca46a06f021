//! Transports: bytes in, calls to the service API (and later the provisioning core) out.
//! `tls` builds the server's TLS configuration; `https` is the listener on port 443.
//! MQTT and AMQP adapters arrive with their issues.

pub mod device_http;
pub mod https;
pub mod mqtt;
pub mod tls;
