//! Why a device did not end up assigned, in the kinds the report counts.

use std::fmt;

/// A kind of failure; the report counts devices per kind. Ordered for a stable report.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// An answer with an HTTP status (or MQTT response status, or for a rejected AMQP request
    /// the status of its `errorCode`) that is an error, with the DPS `errorCode` of its body
    /// when it had one.
    Status {
        status: u16,
        error_code: Option<i64>,
    },
    /// The registration ended `failed` or `disabled`, with `registrationState.errorCode`.
    Registration {
        status: String,
        error_code: Option<i64>,
    },
    /// The MQTT CONNECT was refused with this CONNACK return code.
    MqttRefused(u8),
    /// AMQP SASL ended with this outcome code instead of `ok` (1 = `auth`: the credential
    /// was refused).
    SaslOutcome(u8),
    /// Still `assigning` after the last poll the run allows.
    PollsExhausted,
    /// No TCP connection.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The connection broke, or the HTTP exchange failed.
    Io,
    /// The AMQP connection, session or links failed (not a refusal with a DPS error).
    Amqp,
    /// An answer this program could not make sense of.
    Protocol,
    /// A wait ran out: `connect`, `tls`, `open` (AMQP), `answer` or `device`.
    Timeout(&'static str),
    /// The device's task panicked (a bug in the load generator).
    Internal,
}

impl FailureKind {
    /// The four families of the report: HTTP status, DPS registration error, transport, timeout.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Status { .. } | Self::MqttRefused(_) => "status",
            Self::Registration { .. } | Self::PollsExhausted => "registration",
            Self::Connect
            | Self::Tls
            | Self::Io
            | Self::SaslOutcome(_)
            | Self::Amqp
            | Self::Protocol
            | Self::Internal => "transport",
            Self::Timeout(_) => "timeout",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status {
                status,
                error_code: Some(code),
            } => write!(f, "status {status}, errorCode {code}"),
            Self::Status {
                status,
                error_code: None,
            } => write!(f, "status {status}"),
            Self::Registration {
                status,
                error_code: Some(code),
            } => write!(f, "{status}, errorCode {code}"),
            Self::Registration {
                status,
                error_code: None,
            } => write!(f, "{status}"),
            Self::MqttRefused(code) => write!(f, "CONNACK return code {code}"),
            Self::SaslOutcome(1) => f.write_str("SASL authentication refused (outcome auth)"),
            Self::SaslOutcome(code) => write!(f, "SASL outcome code {code}"),
            Self::PollsExhausted => f.write_str("still assigning after the last poll"),
            Self::Connect => f.write_str("TCP connect"),
            Self::Tls => f.write_str("TLS handshake"),
            Self::Io => f.write_str("connection or HTTP error"),
            Self::Amqp => f.write_str("AMQP connection or link error"),
            Self::Protocol => f.write_str("unexpected answer"),
            Self::Timeout(what) => write!(f, "timeout ({what})"),
            Self::Internal => f.write_str("load generator bug"),
        }
    }
}

/// A failure with a message for the example column of the report.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Protocol, message)
    }

    pub fn timeout(what: &'static str, after: std::time::Duration) -> Self {
        Self::new(
            FailureKind::Timeout(what),
            format!("no progress within {} s", after.as_secs()),
        )
    }

    /// An error answer: the status, and the `errorCode` and `message` of a DPS error body.
    pub fn status(status: u16, body: &[u8]) -> Self {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let error_code = parsed
            .as_ref()
            .and_then(|v| v.get("errorCode"))
            .and_then(serde_json::Value::as_i64);
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| snippet(body), str::to_owned);
        Self::new(FailureKind::Status { status, error_code }, message)
    }
}

/// The start of a body, for messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_gives_its_code_and_message() {
        let failure = Failure::status(
            401,
            br#"{"errorCode":401002,"trackingId":"t","message":"Unauthorized","timestampUtc":"x"}"#,
        );
        assert_eq!(
            failure.kind,
            FailureKind::Status {
                status: 401,
                error_code: Some(401_002)
            }
        );
        assert_eq!(failure.message, "Unauthorized");
        assert_eq!(failure.kind.to_string(), "status 401, errorCode 401002");
        let bare = Failure::status(502, b"bad gateway");
        assert_eq!(bare.kind.to_string(), "status 502");
        assert_eq!(bare.message, "bad gateway");
    }
}
