//! Symmetric-key attestation of a device (wire-protocol.md §2.1–2.2, seed SYM, DIS).
//!
//! The token must name `{idScope}/registrations/{registrationId}` (compared decoded and
//! case-insensitively), carry `skn=registration` when it carries a key name, be unexpired,
//! and be signed, over `sr` exactly as sent, with a key of the device's enrollment:
//! - an individual enrollment for the registration ID takes precedence over every group;
//!   when it is enabled, only its own keys are accepted;
//! - a disabled individual enrollment blocks the device even when a group would accept it
//!   (DIS-08/09): a device proving either key gets status `disabled`;
//! - otherwise the groups: the one the device registered through before first (its record
//!   names it), then every symmetric-key group, with keys derived from the group's primary
//!   and secondary keys.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::attestation::sas::{derive_device_key, SasToken};
use crate::error::ServiceError;
use crate::model::enrollment::{
    AttestationType, EnrollmentKind, ProvisioningStatus, SymmetricKeys,
};
use crate::store::{EnrollmentRow, Store};

/// A device that proved its identity.
#[derive(Debug, Clone)]
pub struct Attested {
    pub kind: EnrollmentKind,
    pub enrollment: EnrollmentRow,
    /// The keys the device's hub identity gets: the enrollment's, or derived from the group's.
    pub device_keys: SymmetricKeys,
    /// The device is blocked: its enrollment, or its individual entry, is disabled.
    pub disabled: bool,
}

fn unauthorized(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthorized(why.into())
}

/// Checks what can be checked without the database: shape, resource, key name, expiry.
/// MQTT uses it at CONNECT; the key is checked on every request.
pub fn check_token(
    id_scope: &str,
    registration_id: &str,
    authorization: Option<&str>,
) -> Result<SasToken, ServiceError> {
    let header = authorization.ok_or_else(|| unauthorized("the request carries no SAS token"))?;
    let token = SasToken::parse(header).map_err(|e| unauthorized(e.to_string()))?;
    if let Some(name) = &token.key_name {
        if !name.eq_ignore_ascii_case("registration") {
            return Err(unauthorized(format!(
                "the device SAS token names key '{name}'; devices use skn=registration"
            )));
        }
    }
    let expected = format!("{id_scope}/registrations/{registration_id}");
    if !token.resource.eq_ignore_ascii_case(&expected) {
        return Err(unauthorized(format!(
            "the SAS token is for '{}', not for '{expected}'",
            token.resource
        )));
    }
    token
        .check_expiry(crate::clock::unix_now())
        .map_err(|e| unauthorized(e.to_string()))?;
    Ok(token)
}

fn signed_by(token: &SasToken, key: Option<&str>) -> bool {
    key.and_then(|k| BASE64.decode(k).ok())
        .is_some_and(|bytes| token.signed_with(&bytes))
}

fn signed_by_any(token: &SasToken, keys: Option<&SymmetricKeys>) -> bool {
    keys.is_some_and(|k| {
        signed_by(token, k.primary_key.as_deref()) || signed_by(token, k.secondary_key.as_deref())
    })
}

fn derived(keys: &SymmetricKeys, registration_id: &str) -> SymmetricKeys {
    let derive = |key: &Option<String>| {
        key.as_deref()
            .and_then(|k| derive_device_key(k, registration_id).ok())
    };
    SymmetricKeys {
        primary_key: derive(&keys.primary_key),
        secondary_key: derive(&keys.secondary_key),
    }
}

fn disabled(row: &EnrollmentRow) -> bool {
    row.record.doc.provisioning_status == Some(ProvisioningStatus::Disabled)
}

/// Attests a device presenting a SAS token.
pub async fn attest(
    store: &Store,
    id_scope: &str,
    registration_id: &str,
    authorization: Option<&str>,
) -> Result<Attested, ServiceError> {
    let token = check_token(id_scope, registration_id, authorization)?;
    let individual = store
        .enrollment(EnrollmentKind::Individual, registration_id)
        .await?;
    if let Some(row) = &individual {
        let symmetric = row.record.attestation_type() == AttestationType::SymmetricKey;
        if symmetric && signed_by_any(&token, row.record.keys.as_ref()) {
            return Ok(Attested {
                kind: EnrollmentKind::Individual,
                device_keys: row.record.keys.clone().unwrap_or_default(),
                disabled: disabled(row),
                enrollment: row.clone(),
            });
        }
        if !disabled(row) {
            return Err(unauthorized(if symmetric {
                "the SAS token is not signed with a key of the device's enrollment"
            } else {
                "the device's enrollment does not use symmetric-key attestation"
            }));
        }
    }
    // A known device is checked against the group it registered through alone; only when
    // that fails (new device, or a moved one) are all symmetric-key groups loaded.
    let hint = store
        .registration(registration_id)
        .await?
        .and_then(|r| r.enrollment_group_id);
    let hinted = match &hint {
        Some(group_id) => store
            .enrollment(EnrollmentKind::Group, group_id)
            .await?
            .filter(|g| g.record.attestation_type() == AttestationType::SymmetricKey),
        None => None,
    };
    let blocked = individual.as_ref().is_some_and(disabled);
    if let Some(group) = hinted {
        if let Some(attested) = try_group(&token, registration_id, group, blocked) {
            return Ok(attested);
        }
    }
    for group in store.symmetric_key_groups().await? {
        if hint
            .as_deref()
            .is_some_and(|h| group.record.id.eq_ignore_ascii_case(h))
        {
            continue;
        }
        if let Some(attested) = try_group(&token, registration_id, group, blocked) {
            return Ok(attested);
        }
    }
    Err(unauthorized(if individual.is_some() {
        "the SAS token is not signed with a key of the device's enrollment"
    } else {
        "no enrollment accepts this device"
    }))
}

/// The group attests the device when the token is signed with a key derived from one of the
/// group's keys. `blocked`: a disabled individual entry for this registration ID exists.
fn try_group(
    token: &SasToken,
    registration_id: &str,
    group: EnrollmentRow,
    blocked: bool,
) -> Option<Attested> {
    let device_keys = derived(group.record.keys.as_ref()?, registration_id);
    signed_by_any(token, Some(&device_keys)).then(|| Attested {
        kind: EnrollmentKind::Group,
        disabled: blocked || disabled(&group),
        enrollment: group,
        device_keys,
    })
}
