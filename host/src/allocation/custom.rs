//! Custom allocation: the decision a WebAssembly policy or a webhook returns, and the DPS
//! outcomes of a refusal (wire-protocol.md §9.3: 400208 hub not specified, 400209
//! unauthorized, 400207 failed).

use serde_json::Value;

/// What a custom allocation decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CustomDecision {
    /// The hub host name; must be one of the linked hubs the request offered.
    pub hub: String,
    /// A device ID for individual enrollments (ignored for groups).
    pub device_id: Option<String>,
    /// Replaces the enrollment's initial twin (`{"tags":…, "properties":{"desired":…}}`).
    pub initial_twin: Option<Value>,
    /// Returned to the device in `registrationState.payload`.
    pub payload: Option<Value>,
}

/// Why a custom allocation produced no hub; each maps to a DPS error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomFailure {
    #[error("the custom allocation named no IoT hub")]
    HubNotSpecified,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Failed(String),
}

impl CustomFailure {
    pub fn error_code(&self) -> u32 {
        match self {
            Self::HubNotSpecified => 400_208,
            Self::Unauthorized(_) => 400_209,
            Self::Failed(_) => 400_207,
        }
    }
}

/// The facts a custom allocation receives, independent of WASM or webhook encoding.
#[derive(Debug, Clone)]
pub struct CustomRequest {
    pub kind: crate::model::enrollment::EnrollmentKind,
    /// The enrollment as the service API returns it (secrets removed).
    pub enrollment: crate::model::enrollment::Enrollment,
    pub registration_id: String,
    pub payload: Option<Value>,
    pub current_hub: Option<String>,
    pub current_device_id: Option<String>,
    pub protocol: String,
    pub client_address: Option<String>,
    /// X.509 devices: the certificate that proved the identity.
    pub certificate: Option<crate::attestation::chain::LeafFacts>,
    /// The enrollment's hubs that are linked (all linked hubs when it names none).
    pub linked_hubs: Vec<crate::hubs::LinkedHub>,
}
