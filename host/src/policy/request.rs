//! The allocation request as JSON (camelCase, mirroring the WIT `allocation-request`), used
//! by the dry-run API and `berth policy test`, and its conversion to the WIT types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bindings::types as wit;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestDoc {
    pub enrollment: EnrollmentDoc,
    pub device: DeviceDoc,
    #[serde(default)]
    pub linked_hubs: Vec<LinkedHubDoc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentDoc {
    /// "individual" or "group".
    pub kind: String,
    pub id: String,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub iot_hubs: Vec<String>,
    #[serde(default)]
    pub initial_twin: Option<Value>,
    #[serde(default)]
    pub iot_edge: bool,
    #[serde(default)]
    pub reprovision_policy: Option<crate::model::enrollment::ReprovisionPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDoc {
    pub registration_id: String,
    #[serde(default)]
    pub attestation: AttestationDoc,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub current_hub: Option<String>,
    #[serde(default)]
    pub current_device_id: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default)]
    pub client_address: Option<String>,
}

fn default_protocol() -> String {
    "Http".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationDoc {
    /// "symmetricKey", "x509" or "tpm".
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub certificate: Option<CertificateDoc>,
    #[serde(default)]
    pub endorsement_key: Option<String>,
}

impl Default for AttestationDoc {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            certificate: None,
            endorsement_key: None,
        }
    }
}

fn default_kind() -> String {
    "symmetricKey".to_owned()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateDoc {
    pub subject_name: String,
    #[serde(default)]
    pub issuer_name: String,
    #[serde(default)]
    pub common_name: Option<String>,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub organizational_unit: Option<String>,
    #[serde(default)]
    pub sha1_thumbprint: String,
    #[serde(default)]
    pub sha256_thumbprint: String,
    #[serde(default)]
    pub not_before: String,
    #[serde(default)]
    pub not_after: String,
    #[serde(default)]
    pub subject_alternative_names: Vec<String>,
    #[serde(default)]
    pub serial_number: String,
    #[serde(default)]
    pub subject_attributes: Vec<(String, String)>,
    #[serde(default)]
    pub issuer_attributes: Vec<(String, String)>,
    /// Leaf first, Base64 DER.
    #[serde(default)]
    pub chain: Vec<String>,
}

impl From<&crate::attestation::chain::LeafFacts> for CertificateDoc {
    fn from(leaf: &crate::attestation::chain::LeafFacts) -> Self {
        Self {
            subject_name: leaf.subject_name.clone(),
            issuer_name: leaf.issuer_name.clone(),
            common_name: Some(leaf.common_name.clone()),
            organization: leaf.organization.clone(),
            organizational_unit: leaf.organizational_unit.clone(),
            sha1_thumbprint: leaf.sha1_thumbprint.clone(),
            sha256_thumbprint: leaf.sha256_thumbprint.clone(),
            not_before: leaf.not_before.clone(),
            not_after: leaf.not_after.clone(),
            subject_alternative_names: leaf.subject_alternative_names.clone(),
            serial_number: leaf.serial_number.clone(),
            subject_attributes: leaf.subject_attributes.clone(),
            issuer_attributes: leaf.issuer_attributes.clone(),
            chain: leaf.chain.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubDoc {
    pub name: String,
    #[serde(default = "one")]
    pub allocation_weight: u32,
    #[serde(default = "yes")]
    pub apply_allocation_policy: bool,
    #[serde(default)]
    pub location: Option<String>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl RequestDoc {
    /// From what the provisioning core knows about a registration.
    pub fn from_custom(request: &crate::allocation::custom::CustomRequest) -> Self {
        use crate::model::enrollment::EnrollmentKind;
        let e = &request.enrollment;
        let id = match request.kind {
            EnrollmentKind::Individual => e.registration_id.clone(),
            EnrollmentKind::Group => e.enrollment_group_id.clone(),
        };
        Self {
            enrollment: EnrollmentDoc {
                kind: match request.kind {
                    EnrollmentKind::Individual => "individual".to_owned(),
                    EnrollmentKind::Group => "group".to_owned(),
                },
                id: id.unwrap_or_default(),
                device_id: e.device_id.clone(),
                iot_hubs: e.iot_hubs.clone().unwrap_or_default(),
                initial_twin: e.initial_twin.clone(),
                iot_edge: e.capabilities.is_some_and(|c| c.iot_edge),
                reprovision_policy: e.reprovision_policy,
            },
            device: DeviceDoc {
                registration_id: request.registration_id.clone(),
                attestation: attestation_doc(request),
                payload: request.payload.clone(),
                current_hub: request.current_hub.clone(),
                current_device_id: request.current_device_id.clone(),
                protocol: request.protocol.clone(),
                client_address: request.client_address.clone(),
            },
            linked_hubs: request
                .linked_hubs
                .iter()
                .map(|hub| LinkedHubDoc {
                    name: hub.name.clone(),
                    allocation_weight: u32::try_from(hub.allocation_weight.max(1))
                        .unwrap_or(u32::MAX),
                    apply_allocation_policy: hub.apply_allocation_policy,
                    location: hub.location.clone(),
                })
                .collect(),
        }
    }
}

/// What the device proved: its certificate (X.509), or the enrollment's attestation kind
/// and endorsement key (TPM enrollments are individual and their keys are not secret).
fn attestation_doc(request: &crate::allocation::custom::CustomRequest) -> AttestationDoc {
    use crate::model::enrollment::AttestationType;
    if let Some(leaf) = &request.certificate {
        return AttestationDoc {
            kind: "x509".to_owned(),
            certificate: Some(CertificateDoc::from(leaf)),
            endorsement_key: None,
        };
    }
    let attestation = request.enrollment.attestation.as_ref();
    match attestation.map(|a| a.kind) {
        Some(AttestationType::Tpm) => AttestationDoc {
            kind: "tpm".to_owned(),
            certificate: None,
            endorsement_key: attestation
                .and_then(|a| a.tpm.as_ref())
                .map(|t| t.endorsement_key.clone()),
        },
        _ => AttestationDoc::default(),
    }
}

impl RequestDoc {
    /// The WIT value; fails on an unknown kind. Also returns its size in bytes (the input limit).
    pub fn to_wit(&self) -> Result<(wit::AllocationRequest, usize), String> {
        let kind = match self.enrollment.kind.to_ascii_lowercase().as_str() {
            "individual" => wit::EnrollmentKind::Individual,
            "group" => wit::EnrollmentKind::Group,
            other => {
                return Err(format!(
                    "enrollment.kind '{other}' is not individual or group"
                ))
            }
        };
        let attestation_kind = match self.device.attestation.kind.to_ascii_lowercase().as_str() {
            "symmetrickey" => wit::AttestationKind::SymmetricKey,
            "x509" => wit::AttestationKind::X509,
            "tpm" => wit::AttestationKind::Tpm,
            other => {
                return Err(format!(
                    "device.attestation.kind '{other}' is not symmetricKey, x509 or tpm"
                ))
            }
        };
        let policy = self.enrollment.reprovision_policy.unwrap_or(
            crate::model::enrollment::ReprovisionPolicy {
                update_hub_assignment: true,
                migrate_device_data: true,
            },
        );
        let twin = self
            .enrollment
            .initial_twin
            .as_ref()
            .filter(|v| !v.is_null())
            .map(Value::to_string);
        let payload = self
            .device
            .payload
            .as_ref()
            .filter(|v| !v.is_null())
            .map(Value::to_string);
        // The input limit counts the text the policy receives; summing the strings avoids
        // serializing the request once more on every call.
        let hubs_size: usize = self
            .linked_hubs
            .iter()
            .map(|h| h.name.len() + h.location.as_ref().map_or(0, String::len) + 16)
            .sum();
        let size = self.enrollment.id.len()
            + self.enrollment.device_id.as_ref().map_or(0, String::len)
            + self
                .enrollment
                .iot_hubs
                .iter()
                .map(String::len)
                .sum::<usize>()
            + twin.as_ref().map_or(0, String::len)
            + self.device.registration_id.len()
            + payload.as_ref().map_or(0, String::len)
            + self.device.current_hub.as_ref().map_or(0, String::len)
            + self
                .device
                .current_device_id
                .as_ref()
                .map_or(0, String::len)
            + self.device.protocol.len()
            + self.device.client_address.as_ref().map_or(0, String::len)
            + self
                .device
                .attestation
                .endorsement_key
                .as_ref()
                .map_or(0, String::len)
            + self.device.attestation.certificate.as_ref().map_or(0, |c| {
                c.subject_name.len()
                    + c.issuer_name.len()
                    + c.subject_alternative_names
                        .iter()
                        .chain(&c.chain)
                        .map(String::len)
                        .sum::<usize>()
                    + c.subject_attributes
                        .iter()
                        .chain(&c.issuer_attributes)
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
                    + 256
            })
            + hubs_size;
        let request = wit::AllocationRequest {
            enrollment: wit::Enrollment {
                kind,
                id: self.enrollment.id.clone(),
                device_id: self.enrollment.device_id.clone(),
                iot_hubs: self.enrollment.iot_hubs.clone(),
                initial_twin: twin,
                iot_edge: self.enrollment.iot_edge,
                reprovision_policy: wit::ReprovisionPolicy {
                    update_hub_assignment: policy.update_hub_assignment,
                    migrate_device_data: policy.migrate_device_data,
                },
            },
            device: wit::DeviceContext {
                registration_id: self.device.registration_id.clone(),
                attestation: wit::Attestation {
                    kind: attestation_kind,
                    certificate: self.device.attestation.certificate.as_ref().map(|c| {
                        wit::CertificateFacts {
                            subject_name: c.subject_name.clone(),
                            issuer_name: c.issuer_name.clone(),
                            common_name: c.common_name.clone(),
                            organization: c.organization.clone(),
                            organizational_unit: c.organizational_unit.clone(),
                            sha1_thumbprint: c.sha1_thumbprint.clone(),
                            sha256_thumbprint: c.sha256_thumbprint.clone(),
                            not_before: c.not_before.clone(),
                            not_after: c.not_after.clone(),
                            subject_alternative_names: c.subject_alternative_names.clone(),
                            serial_number: c.serial_number.clone(),
                            subject_attributes: c.subject_attributes.clone(),
                            issuer_attributes: c.issuer_attributes.clone(),
                            chain: c.chain.clone(),
                        }
                    }),
                    endorsement_key: self.device.attestation.endorsement_key.clone(),
                },
                payload,
                current_hub: self.device.current_hub.clone(),
                current_device_id: self.device.current_device_id.clone(),
                protocol: self.device.protocol.clone(),
                client_address: self.device.client_address.clone(),
            },
            linked_hubs: self
                .linked_hubs
                .iter()
                .map(|hub| wit::LinkedHub {
                    name: hub.name.clone(),
                    allocation_weight: hub.allocation_weight,
                    apply_allocation_policy: hub.apply_allocation_policy,
                    location: hub.location.clone(),
                })
                .collect(),
        };
        Ok((request, size))
    }
}
