//! Individual enrollments and enrollment groups: the wire model (wire-protocol.md §8.6,
//! seed-inventory ENR-11..25) and its validation. One struct serves both kinds; `validate`
//! enforces which fields each kind may carry.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attestation::x509::{parse_certificate, CertificateInfo};
use crate::error::ServiceError;
use crate::model::names::{check_device_id, check_host_name, check_registration_id};

/// Which of the two enrollment collections a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentKind {
    Individual,
    Group,
}

impl EnrollmentKind {
    /// The JSON field that names the record.
    pub fn id_field(self) -> &'static str {
        match self {
            Self::Individual => "registrationId",
            Self::Group => "enrollmentGroupId",
        }
    }

    /// The `type` of the seed's `ServiceOperations` log properties (MON-08).
    pub fn log_type(self) -> &'static str {
        match self {
            Self::Individual => "IndividualEnrollment",
            Self::Group => "EnrollmentGroup",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Read-only; filled in on reads of individual enrollments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationMechanism>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Berth's own: the WebAssembly policies bound to this enrollment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_binding: Option<PolicyBinding>,
}

/// The WebAssembly policies an enrollment uses, with their configuration and the lookup
/// tables they may read. Policy references are `NAME` (the latest version) or `NAME@VERSION`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyBinding {
    /// The allocation policy (same as `customAllocationDefinition.webhookUrl: "wasm:NAME"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// The reprovisioning rule consulted when a registered device registers again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprovisioning: Option<String>,
    /// JSON handed to the policies through the `config` import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// Lookup tables the policies may read through the `lookup` import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_tables: Option<Vec<String>>,
}

/// A parsed policy reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRef {
    pub name: String,
    pub version: Option<i64>,
}

impl PolicyRef {
    /// Parses `NAME` or `NAME@VERSION`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, version) = match text.split_once('@') {
            Some((name, version)) => (
                name,
                Some(
                    version
                        .parse::<i64>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| {
                            format!("policy version in '{text}' is not a positive number")
                        })?,
                ),
            ),
            None => (text, None),
        };
        check_policy_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            version,
        })
    }

    /// From `customAllocationDefinition.webhookUrl` with the `wasm:` scheme.
    pub fn from_webhook_url(url: &str) -> Option<Result<Self, String>> {
        let rest = url
            .get(..5)
            .filter(|scheme| scheme.eq_ignore_ascii_case("wasm:"))
            .and_then(|_| url.get(5..))?;
        Some(Self::parse(rest.trim_start_matches("//")))
    }
}

/// Policy and lookup table names: 1 to 64 alphanumerics, `-`, `_` or `.`.
pub fn check_policy_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "'{name}' is not a valid name: use 1 to 64 alphanumerics, '-', '_' or '.'"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    #[serde(alias = "Enabled")]
    Enabled,
    #[serde(alias = "Disabled")]
    Disabled,
}

impl ProvisioningStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    #[serde(alias = "Hashed")]
    Hashed,
    #[serde(alias = "GeoLatency", alias = "geolatency")]
    GeoLatency,
    #[serde(alias = "Static")]
    Static,
    #[serde(alias = "Custom")]
    Custom,
}

impl AllocationPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hashed => "hashed",
            Self::GeoLatency => "geoLatency",
            Self::Static => "static",
            Self::Custom => "custom",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    pub iot_edge: bool,
}

/// Both flags are required when the object is present (service.json `ReprovisionPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    pub update_hub_assignment: bool,
    pub migrate_device_data: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    #[serde(alias = "None")]
    None,
    #[serde(alias = "TPM", alias = "Tpm")]
    Tpm,
    #[serde(alias = "X509")]
    X509,
    #[serde(alias = "SymmetricKey", alias = "symmetrickey")]
    SymmetricKey,
}

impl AttestationType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tpm => "tpm",
            Self::X509 => "x509",
            Self::SymmetricKey => "symmetricKey",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeys>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    pub endorsement_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<CertificateInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// A validated enrollment, ready to store: the document without secrets, and the
/// symmetric keys apart so that the store can seal them.
#[derive(Debug, Clone)]
pub struct ValidEnrollment {
    pub id: String,
    pub doc: Enrollment,
    pub keys: Option<SymmetricKeys>,
}

impl ValidEnrollment {
    pub fn attestation_type(&self) -> AttestationType {
        self.doc
            .attestation
            .as_ref()
            .map_or(AttestationType::None, |a| a.kind)
    }
}

/// The earliest custom allocation API version (wire-protocol.md §1.7).
const MIN_CUSTOM_ALLOCATION_API_VERSION: &str = "2018-09-01";

/// Checks `input` and fills in defaults. `path_id` is the ID from the URL (`None` inside bulk
/// operations); `existing` is the stored record being replaced, whose secrets are kept when
/// the input omits them (a GET response sent back unchanged must not rotate keys);
/// `is_linked` answers whether a hub host name is linked.
pub fn validate(
    kind: EnrollmentKind,
    path_id: Option<&str>,
    mut input: Enrollment,
    existing: Option<&ValidEnrollment>,
    is_linked: &dyn Fn(&str) -> bool,
) -> Result<ValidEnrollment, ServiceError> {
    let body_id = match kind {
        EnrollmentKind::Individual => input.registration_id.clone(),
        EnrollmentKind::Group => input.enrollment_group_id.clone(),
    };
    let id = match (path_id, body_id) {
        (Some(path), Some(body)) if !path.eq_ignore_ascii_case(&body) => {
            return Err(invalid(format!(
                "{} '{body}' in the body does not match '{path}' in the path",
                kind.id_field()
            )))
        }
        (_, Some(body)) => body,
        (Some(path), None) => path.to_owned(),
        (None, None) => return Err(invalid(format!("{} is required", kind.id_field()))),
    };
    check_registration_id(kind.id_field(), &id).map_err(invalid)?;
    match kind {
        EnrollmentKind::Individual => {
            input.registration_id = Some(id.clone());
            if input.enrollment_group_id.is_some() {
                return Err(invalid("an individual enrollment has no enrollmentGroupId"));
            }
            if let Some(device_id) = &input.device_id {
                check_device_id(device_id).map_err(invalid)?;
            }
            if let Some(info) = &input.optional_device_information {
                if !info.is_object() && !info.is_null() {
                    return Err(invalid("optionalDeviceInformation must be a JSON object"));
                }
            }
        }
        EnrollmentKind::Group => {
            input.enrollment_group_id = Some(id.clone());
            if input.registration_id.is_some() {
                return Err(invalid("an enrollment group has no registrationId"));
            }
            if input.device_id.is_some() {
                return Err(invalid(
                    "an enrollment group cannot set deviceId: its devices use their registration IDs",
                ));
            }
            if input.optional_device_information.is_some() {
                return Err(invalid(
                    "optionalDeviceInformation belongs to individual enrollments",
                ));
            }
        }
    }
    // Read-only fields are the server's.
    input.registration_state = None;
    input.etag = None;
    input.created_date_time_utc = None;
    input.last_updated_date_time_utc = None;

    let attestation = input
        .attestation
        .take()
        .ok_or_else(|| invalid("attestation is required"))?;
    let (attestation, keys) = validate_attestation(kind, attestation, existing)?;
    input.attestation = Some(attestation);

    input
        .capabilities
        .get_or_insert(DeviceCapabilities { iot_edge: false });
    input
        .provisioning_status
        .get_or_insert(ProvisioningStatus::Enabled);
    // `reprovisionPolicy` stays absent when not given: reads show the default, and the
    // legacy sticky rule (REPROV-09) applies only to enrollments without one.
    if let Some(twin) = &input.initial_twin {
        validate_initial_twin(twin)?;
    }
    validate_hubs(&mut input, is_linked)?;
    if let Some(binding) = &input.policy_binding {
        validate_binding(binding)?;
    }
    let bound_policy = input
        .policy_binding
        .as_ref()
        .is_some_and(|b| b.allocation.is_some());
    match (&input.allocation_policy, &input.custom_allocation_definition) {
        (Some(AllocationPolicy::Custom), None) if !bound_policy => {
            return Err(invalid(
                "A CustomAllocationDefinition is required for an enrollment with a custom allocation policy",
            ))
        }
        (_, Some(definition)) => validate_custom_allocation(definition)?,
        _ => {}
    }
    Ok(ValidEnrollment {
        id,
        doc: input,
        keys,
    })
}

fn validate_hubs(
    input: &mut Enrollment,
    is_linked: &dyn Fn(&str) -> bool,
) -> Result<(), ServiceError> {
    let mut named: Vec<&str> = Vec::new();
    if let Some(hub) = &input.iot_hub_host_name {
        named.push(hub);
    }
    if let Some(hubs) = &input.iot_hubs {
        if hubs.len() > 50 {
            return Err(invalid(
                "iotHubs names more than the 50 hubs an instance can link",
            ));
        }
        named.extend(hubs.iter().map(String::as_str));
    }
    for hub in &named {
        check_host_name("iotHubs entry", hub).map_err(invalid)?;
        if !is_linked(hub) {
            return Err(invalid(format!(
                "the IoT hub '{hub}' is not linked to this provisioning service; link it first"
            )));
        }
    }
    if input.allocation_policy == Some(AllocationPolicy::Static) {
        let hubs = input.iot_hubs.as_deref().unwrap_or_default();
        let count = hubs.len() + usize::from(input.iot_hub_host_name.is_some() && hubs.is_empty());
        if count != 1 {
            return Err(invalid(
                "static allocation needs exactly one hub in iotHubs",
            ));
        }
    }
    Ok(())
}

fn validate_initial_twin(twin: &Value) -> Result<(), ServiceError> {
    let Some(object) = twin.as_object() else {
        return Err(invalid("initialTwin must be a JSON object"));
    };
    for (key, value) in object {
        match key.as_str() {
            "tags" if value.is_object() || value.is_null() => {}
            "properties" => {
                let Some(properties) = value.as_object() else {
                    return Err(invalid("initialTwin.properties must be a JSON object"));
                };
                for (name, collection) in properties {
                    if name != "desired" {
                        return Err(invalid(format!(
                            "initialTwin.properties.{name} is not allowed: only desired properties can be set"
                        )));
                    }
                    if !collection.is_object() && !collection.is_null() {
                        return Err(invalid(
                            "initialTwin.properties.desired must be a JSON object",
                        ));
                    }
                }
            }
            "tags" => return Err(invalid("initialTwin.tags must be a JSON object")),
            other => return Err(invalid(format!("initialTwin.{other} is not a twin field"))),
        }
    }
    Ok(())
}

fn validate_binding(binding: &PolicyBinding) -> Result<(), ServiceError> {
    for reference in [&binding.allocation, &binding.reprovisioning]
        .into_iter()
        .flatten()
    {
        PolicyRef::parse(reference).map_err(|why| invalid(format!("policyBinding: {why}")))?;
    }
    if let Some(tables) = &binding.lookup_tables {
        if tables.len() > 16 {
            return Err(invalid(
                "policyBinding.lookupTables grants at most 16 tables",
            ));
        }
        for table in tables {
            check_policy_name(table)
                .map_err(|why| invalid(format!("policyBinding.lookupTables: {why}")))?;
        }
    }
    if let Some(config) = &binding.config {
        if config.to_string().len() > 16 * 1024 {
            return Err(invalid("policyBinding.config is larger than 16 KB"));
        }
    }
    Ok(())
}

fn validate_custom_allocation(definition: &CustomAllocationDefinition) -> Result<(), ServiceError> {
    if let Some(reference) = PolicyRef::from_webhook_url(&definition.webhook_url) {
        reference
            .map_err(|why| invalid(format!("customAllocationDefinition.webhookUrl: {why}")))?;
    }
    let url = definition.webhook_url.as_str();
    let scheme_ok = ["https://", "http://", "wasm:"].iter().any(|scheme| {
        url.len() > scheme.len()
            && url
                .get(..scheme.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    });
    if !scheme_ok || url.len() > 2048 || url.chars().any(char::is_whitespace) {
        return Err(invalid(
            "customAllocationDefinition.webhookUrl must be an http, https or wasm: URL of at most 2048 characters",
        ));
    }
    let version = definition.api_version.as_str();
    let date = version.get(..10).unwrap_or("");
    let well_formed = date.len() == 10
        && date.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !well_formed || date < MIN_CUSTOM_ALLOCATION_API_VERSION {
        return Err(invalid(format!(
            "customAllocationDefinition.apiVersion '{version}' must be {MIN_CUSTOM_ALLOCATION_API_VERSION}-preview or later"
        )));
    }
    Ok(())
}

fn validate_attestation(
    kind: EnrollmentKind,
    mut attestation: AttestationMechanism,
    existing: Option<&ValidEnrollment>,
) -> Result<(AttestationMechanism, Option<SymmetricKeys>), ServiceError> {
    let previous = existing
        .and_then(|e| e.doc.attestation.as_ref())
        .filter(|a| a.kind == attestation.kind);
    let present = |tpm: bool, x509: bool, symmetric: bool| {
        (attestation.tpm.is_some() && !tpm)
            || (attestation.x509.is_some() && !x509)
            || (attestation.symmetric_key.is_some() && !symmetric)
    };
    match attestation.kind {
        AttestationType::None => Err(invalid(
            "attestation type 'none' cannot authenticate devices; use symmetricKey, x509 or tpm",
        )),
        AttestationType::Tpm => {
            if kind == EnrollmentKind::Group {
                return Err(invalid(
                    "enrollment groups support x509 and symmetricKey attestation only, not tpm",
                ));
            }
            if present(true, false, false) {
                return Err(invalid("a tpm attestation carries only the tpm object"));
            }
            let tpm = attestation
                .tpm
                .as_ref()
                .ok_or_else(|| invalid("attestation.tpm is required"))?;
            let endorsement_key = check_base64(
                "attestation.tpm.endorsementKey",
                &tpm.endorsement_key,
                1,
                4096,
            )?;
            let storage_root_key = tpm
                .storage_root_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .map(|k| check_base64("attestation.tpm.storageRootKey", k, 1, 4096))
                .transpose()?;
            attestation.tpm = Some(TpmAttestation {
                endorsement_key,
                storage_root_key,
            });
            Ok((attestation, None))
        }
        AttestationType::SymmetricKey => {
            if present(false, false, true) {
                return Err(invalid(
                    "a symmetricKey attestation carries only the symmetricKey object",
                ));
            }
            let supplied = attestation.symmetric_key.take().unwrap_or_default();
            let kept = existing
                .and_then(|e| e.keys.clone())
                .filter(|_| previous.is_some())
                .unwrap_or_default();
            let pick = |field: &str,
                        given: Option<String>,
                        kept: Option<String>|
             -> Result<String, ServiceError> {
                match given.filter(|k| !k.is_empty()) {
                    Some(key) => check_base64(field, &key, 16, 64),
                    None => Ok(kept.unwrap_or_else(generate_key)),
                }
            };
            let keys = SymmetricKeys {
                primary_key: Some(pick(
                    "attestation.symmetricKey.primaryKey",
                    supplied.primary_key,
                    kept.primary_key,
                )?),
                secondary_key: Some(pick(
                    "attestation.symmetricKey.secondaryKey",
                    supplied.secondary_key,
                    kept.secondary_key,
                )?),
            };
            attestation.symmetric_key = Some(SymmetricKeys::default());
            Ok((attestation, Some(keys)))
        }
        AttestationType::X509 => {
            if present(false, true, false) {
                return Err(invalid("an x509 attestation carries only the x509 object"));
            }
            let x509 = attestation
                .x509
                .take()
                .ok_or_else(|| invalid("attestation.x509 is required"))?;
            let kept = previous.and_then(|a| a.x509.as_ref());
            let slots = [
                x509.client_certificates.is_some(),
                x509.signing_certificates.is_some(),
                x509.ca_references.is_some(),
            ];
            if slots.iter().filter(|s| **s).count() != 1 {
                return Err(invalid(
                    "attestation.x509 needs exactly one of clientCertificates, signingCertificates or caReferences",
                ));
            }
            let mut out = X509Attestation::default();
            if let Some(certificates) = x509.client_certificates {
                if kind == EnrollmentKind::Group {
                    return Err(invalid(
                        "an enrollment group uses signingCertificates or caReferences, not clientCertificates",
                    ));
                }
                let kept = kept.and_then(|k| k.client_certificates.as_ref());
                out.client_certificates = Some(validate_certificates(
                    "clientCertificates",
                    certificates,
                    kept,
                )?);
            }
            if let Some(certificates) = x509.signing_certificates {
                if kind == EnrollmentKind::Individual {
                    return Err(invalid(
                        "an individual enrollment uses clientCertificates or caReferences, not signingCertificates",
                    ));
                }
                let kept = kept.and_then(|k| k.signing_certificates.as_ref());
                out.signing_certificates = Some(validate_certificates(
                    "signingCertificates",
                    certificates,
                    kept,
                )?);
            }
            if let Some(references) = x509.ca_references {
                let primary = references
                    .primary
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| invalid("attestation.x509.caReferences.primary is required"))?;
                for name in std::iter::once(&primary).chain(references.secondary.iter()) {
                    check_certificate_name(name)?;
                }
                out.ca_references = Some(X509CaReferences {
                    primary: Some(primary),
                    secondary: references.secondary.filter(|s| !s.is_empty()),
                });
            }
            attestation.x509 = Some(out);
            Ok((attestation, None))
        }
    }
}

/// A CA certificate name (caReferences): alphanumerics and `- . _`, up to 256 characters.
fn check_certificate_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty()
        || name.len() > 256
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        return Err(ServiceError::invalid(format!(
            "caReferences name '{name}' must be 1 to 256 alphanumerics, '-', '.' or '_'"
        )));
    }
    Ok(())
}

fn validate_certificates(
    field: &str,
    certificates: X509Certificates,
    kept: Option<&X509Certificates>,
) -> Result<X509Certificates, ServiceError> {
    let slot = |name: &str,
                given: Option<X509CertificateWithInfo>,
                kept: Option<&X509CertificateWithInfo>|
     -> Result<Option<X509CertificateWithInfo>, ServiceError> {
        match given {
            Some(X509CertificateWithInfo {
                certificate: Some(text),
                ..
            }) if !text.trim().is_empty() => {
                let parsed = parse_certificate(&text).map_err(|error| {
                    ServiceError::invalid(format!(
                        "attestation.x509.{field}.{name}.certificate: {error}"
                    ))
                })?;
                Ok(Some(X509CertificateWithInfo {
                    certificate: Some(parsed.pem),
                    info: Some(parsed.info),
                }))
            }
            // A read sent back unchanged carries only `info`: keep the stored certificate
            // when the thumbprints agree.
            Some(X509CertificateWithInfo {
                info: Some(info), ..
            }) => match kept {
                Some(stored)
                    if stored
                        .info
                        .as_ref()
                        .is_some_and(|s| s.sha256_thumbprint == info.sha256_thumbprint) =>
                {
                    Ok(Some(stored.clone()))
                }
                _ => Err(ServiceError::invalid(format!(
                    "attestation.x509.{field}.{name}.certificate is required"
                ))),
            },
            Some(_) | None => Ok(None),
        }
    };
    let primary = slot(
        "primary",
        certificates.primary,
        kept.and_then(|k| k.primary.as_ref()),
    )?
    .ok_or_else(|| {
        ServiceError::invalid(format!(
            "attestation.x509.{field}.primary.certificate is required"
        ))
    })?;
    let secondary = slot(
        "secondary",
        certificates.secondary,
        kept.and_then(|k| k.secondary.as_ref()),
    )?;
    Ok(X509Certificates {
        primary: Some(primary),
        secondary,
    })
}

fn check_base64(field: &str, value: &str, min: usize, max: usize) -> Result<String, ServiceError> {
    let bytes = BASE64
        .decode(value.trim())
        .map_err(|_| ServiceError::invalid(format!("{field} is not valid Base64")))?;
    if bytes.len() < min || bytes.len() > max {
        return Err(ServiceError::invalid(format!(
            "{field} must decode to {min} to {max} bytes, found {}",
            bytes.len()
        )));
    }
    Ok(value.trim().to_owned())
}

/// A new symmetric key: 64 random bytes, Base64 (as DPS generates them).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 64];
    rand::thread_rng().fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

/// The enrollment as reads return it: no symmetric keys and no certificate bodies, only
/// their `info` (wire-protocol.md §8.2, "Secrets in reads").
pub fn redacted(doc: &Enrollment) -> Enrollment {
    let mut doc = doc.clone();
    if let Some(attestation) = doc.attestation.as_mut() {
        if attestation.symmetric_key.is_some() {
            attestation.symmetric_key = Some(SymmetricKeys::default());
        }
        if let Some(x509) = attestation.x509.as_mut() {
            for certificates in [
                x509.client_certificates.as_mut(),
                x509.signing_certificates.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                for slot in [
                    certificates.primary.as_mut(),
                    certificates.secondary.as_mut(),
                ]
                .into_iter()
                .flatten()
                {
                    slot.certificate = None;
                }
            }
        }
    }
    doc
}

/// The attestation mechanism with its secrets, for `…/attestationmechanism`.
pub fn attestation_with_secrets(record: &ValidEnrollment) -> Option<AttestationMechanism> {
    let mut attestation = record.doc.attestation.clone()?;
    if attestation.kind == AttestationType::SymmetricKey {
        attestation.symmetric_key.clone_from(&record.keys);
    }
    Some(attestation)
}

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linked(_: &str) -> bool {
        true
    }

    fn parse(json: &str) -> Enrollment {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn symmetric_keys_are_generated_when_absent() {
        let e = parse(r#"{"registrationId":"dev-1","attestation":{"type":"symmetricKey"}}"#);
        let valid = validate(EnrollmentKind::Individual, Some("dev-1"), e, None, &linked).unwrap();
        let keys = valid.keys.unwrap();
        assert_eq!(BASE64.decode(keys.primary_key.unwrap()).unwrap().len(), 64);
        assert_eq!(
            BASE64.decode(keys.secondary_key.unwrap()).unwrap().len(),
            64
        );
        assert_eq!(
            valid.doc.provisioning_status,
            Some(ProvisioningStatus::Enabled)
        );
        assert_eq!(
            valid.doc.reprovision_policy, None,
            "stored as given; reads add the default"
        );
    }

    #[test]
    fn too_short_symmetric_key_is_refused() {
        let e = parse(
            r#"{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"c2hvcnQ="}}}"#,
        );
        let error =
            validate(EnrollmentKind::Individual, Some("dev-1"), e, None, &linked).unwrap_err();
        assert_eq!(error.error_code(), 400_004);
        assert!(error.to_string().contains("16 to 64 bytes"), "{error}");
    }

    #[test]
    fn keys_survive_an_update_that_omits_them() {
        let e = parse(r#"{"attestation":{"type":"symmetricKey"}}"#);
        let first = validate(EnrollmentKind::Group, Some("g"), e.clone(), None, &linked).unwrap();
        let second = validate(EnrollmentKind::Group, Some("g"), e, Some(&first), &linked).unwrap();
        assert_eq!(first.keys, second.keys);
    }

    #[test]
    fn path_and_body_ids_must_agree() {
        let e = parse(r#"{"registrationId":"other","attestation":{"type":"symmetricKey"}}"#);
        assert!(validate(EnrollmentKind::Individual, Some("dev-1"), e, None, &linked).is_err());
        let e = parse(r#"{"registrationId":"DEV-1","attestation":{"type":"symmetricKey"}}"#);
        assert!(validate(EnrollmentKind::Individual, Some("dev-1"), e, None, &linked).is_ok());
    }

    #[test]
    fn static_allocation_needs_a_linked_hub() {
        let e = parse(
            r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"static","iotHubs":["nothere.example.net"]}"#,
        );
        let error = validate(EnrollmentKind::Group, Some("g"), e, None, &|_| false).unwrap_err();
        assert!(error.to_string().contains("not linked"), "{error}");
    }

    #[test]
    fn custom_allocation_needs_a_definition() {
        let e = parse(r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"custom"}"#);
        let error = validate(EnrollmentKind::Group, Some("g"), e, None, &linked).unwrap_err();
        assert!(error.to_string().contains("CustomAllocationDefinition"));
        let e = parse(
            r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"custom",
                "customAllocationDefinition":{"webhookUrl":"https://f.example/api","apiVersion":"2017-11-15"}}"#,
        );
        assert!(validate(EnrollmentKind::Group, Some("g"), e, None, &linked).is_err());
    }

    #[test]
    fn groups_refuse_tpm_and_device_ids() {
        let e = parse(r#"{"attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}}"#);
        assert!(validate(EnrollmentKind::Group, Some("g"), e, None, &linked).is_err());
        let e = parse(r#"{"deviceId":"d","attestation":{"type":"symmetricKey"}}"#);
        assert!(validate(EnrollmentKind::Group, Some("g"), e, None, &linked).is_err());
    }

    #[test]
    fn unparseable_certificate_is_refused() {
        let e = parse(
            r#"{"attestation":{"type":"x509","x509":{"clientCertificates":{"primary":{"certificate":"bm90IGEgY2VydA=="}}}}}"#,
        );
        let error = validate(EnrollmentKind::Individual, Some("d"), e, None, &linked).unwrap_err();
        assert!(
            error.to_string().contains("clientCertificates.primary"),
            "{error}"
        );
    }

    #[test]
    fn redaction_drops_keys_and_certificate_bodies() {
        let e = parse(r#"{"attestation":{"type":"symmetricKey"}}"#);
        let valid = validate(EnrollmentKind::Individual, Some("d"), e, None, &linked).unwrap();
        let json = serde_json::to_value(redacted(&valid.doc)).unwrap();
        assert_eq!(json["attestation"]["symmetricKey"], serde_json::json!({}));
        let full = attestation_with_secrets(&valid).unwrap();
        assert!(full.symmetric_key.unwrap().primary_key.is_some());
    }
}
