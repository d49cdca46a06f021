//! The one error type of the service API, carrying what the wire needs: the HTTP status and
//! the six-digit DPS `errorCode` (`errorCode / 1000 == status`, wire-protocol.md §3.8–3.9).
//! It is turned into the DPS error body in exactly one place: `service_api::respond`.

use std::fmt;

/// A failure the service API reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The body is not JSON, or not the JSON this operation takes.
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    /// A field failed validation; the message names the field.
    #[error("{0}")]
    ArgumentInvalid(String),
    /// The body is larger than the 96 KB the seed allows (LIM-07).
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{what} '{id}' was not found")]
    NotFound { what: NotFoundKind, id: String },
    #[error("no operation at {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    Conflict(String),
    #[error("the etag in If-Match does not match the current etag of {0}")]
    PreconditionFailed(String),
    #[error("unsupported content type '{0}': send application/json (application/wasm for policy uploads)")]
    UnsupportedMediaType(String),
    /// Over a rate limit (seed RATE-03/04); the caller retries after `retry_after` seconds.
    #[error("{message}")]
    Throttled { message: String, retry_after: u32 },
    #[error("{0}")]
    Internal(String),
}

/// Which resource a 404 is about; each has its own six-digit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFoundKind {
    Enrollment,
    EnrollmentGroup,
    Registration,
    LinkedHub,
    AccessPolicy,
    IdScope,
    Operation,
    HubDevice,
    Policy,
    LookupTable,
    CaCertificate,
}

impl fmt::Display for NotFoundKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enrollment => "enrollment",
            Self::EnrollmentGroup => "enrollment group",
            Self::Registration => "registration",
            Self::LinkedHub => "linked hub",
            Self::AccessPolicy => "shared access policy",
            Self::IdScope => "ID scope",
            Self::Operation => "operation",
            Self::HubDevice => "device in the hub registry",
            Self::Policy => "policy",
            Self::LookupTable => "lookup table",
            Self::CaCertificate => "CA certificate",
        })
    }
}

impl ServiceError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::ArgumentInvalid(message.into())
    }

    pub fn not_found(what: NotFoundKind, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }

    /// HTTP status code, from the seed's error table (ERR-01..09).
    pub fn status(&self) -> u16 {
        match self {
            Self::MalformedBody(_) | Self::ArgumentInvalid(_) | Self::BodyTooLarge { .. } => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound { .. } | Self::RouteNotFound { .. } => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Conflict(_) => 409,
            Self::PreconditionFailed(_) => 412,
            Self::UnsupportedMediaType(_) => 415,
            Self::Throttled { .. } => 429,
            Self::Internal(_) => 500,
        }
    }

    /// The six-digit DPS error code. Confirmed values are reused (400004, 401002, 404201,
    /// 404202); the rest follow the `status * 1000 + n` convention (wire-protocol.md §3.9).
    pub fn error_code(&self) -> u32 {
        match self {
            Self::MalformedBody(_) => 400_001,
            Self::ArgumentInvalid(_) => 400_004,
            Self::BodyTooLarge { .. } => 400_005,
            Self::Unauthorized(_) => 401_002,
            Self::Forbidden(_) => 403_001,
            Self::NotFound { what, .. } => match what {
                NotFoundKind::Enrollment => 404_201,
                NotFoundKind::EnrollmentGroup => 404_202,
                NotFoundKind::Registration => 404_203,
                NotFoundKind::LinkedHub => 404_204,
                NotFoundKind::AccessPolicy => 404_205,
                NotFoundKind::IdScope => 404_206,
                NotFoundKind::Operation => 404_207,
                NotFoundKind::HubDevice => 404_208,
                NotFoundKind::Policy => 404_209,
                NotFoundKind::LookupTable => 404_210,
                NotFoundKind::CaCertificate => 404_211,
            },
            Self::RouteNotFound { .. } => 404_000,
            Self::MethodNotAllowed { .. } => 405_000,
            Self::Conflict(_) => 409_201,
            Self::PreconditionFailed(_) => 412_001,
            Self::UnsupportedMediaType(_) => 415_001,
            Self::Throttled { .. } => 429_001,
            Self::Internal(_) => 500_000,
        }
    }

    /// The DPS error body devices receive (wire-protocol.md §3.8): over HTTPS, on the MQTT
    /// response topic, and as the description of an AMQP rejection.
    pub fn device_body(&self, tracking_id: &str) -> serde_json::Value {
        serde_json::json!({
            "errorCode": self.error_code(),
            "trackingId": tracking_id,
            "message": self.to_string(),
            "timestampUtc": crate::clock::now_utc(),
        })
    }

    /// The seed's `ResultType` log field (MON-06).
    pub fn result_type(&self) -> &'static str {
        if self.status() >= 500 {
            "Failure"
        } else {
            "ClientError"
        }
    }
}

impl From<crate::store::StoreError> for ServiceError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Conflict(message) => Self::Conflict(message),
            crate::store::StoreError::PreconditionFailed(id) => Self::PreconditionFailed(id),
            crate::store::StoreError::NotFound(kind, id) => Self::NotFound { what: kind, id },
            other => {
                tracing::error!(error = %other, "store failure");
                Self::Internal("the store failed; the operation was not applied".to_owned())
            }
        }
    }
}
