//! Symmetric-key attestation of a device (wire-protocol.md §2.1–2.2, seed SYM, DIS).
//!
//! The token must name `{idScope}/registrations/{registrationId}` (compared decoded and
//! case-insensitively), carry `skn=registration` when it carries a key name, be unexpired,
//! and be signed, over `sr` exactly as sent, with a key of the device's enrollment:
//! - an individual enrollment for the registration ID takes precedence over every group;
//!   when it is enabled, only its own keys are accepted;
//! - a disabled individual enrollment blocks the device even when a group would accept it
//!   (DIS-08/09): a device proving either key gets status `disabled`;
//! - a TPM device's token must be signed with the key K its last challenge issued (see
//!   `provisioning::tpm`);
//! - otherwise the groups: the one the device registered through before first (its record
//!   names it), then every symmetric-key group, with keys derived from the group's primary
//!   and secondary keys.
//!
//! X.509 attestation ([`attest_x509`]) follows the seed's order instead (X509-15…18): the
//! individual enrollment for the certificate's common name, then the groups of the chain's
//! certificates from the leaf's issuer up to the root, the most specific first. A disabled
//! entry anywhere on that path wins over an enabled one (deny wins, seed-inventory decision 4).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::attestation::chain::{self, DeviceChain, LeafFacts};
use crate::attestation::sas::{derive_device_key, SasToken};
use crate::attestation::x509::{parse_certificate, ParsedCertificate};
use crate::error::ServiceError;
use crate::model::enrollment::{
    AttestationType, Enrollment, EnrollmentKind, ProvisioningStatus, SymmetricKeys,
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
    /// X.509 devices: the certificate that proved the identity.
    pub certificate: Option<LeafFacts>,
}

fn unauthorized(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthorized(why.into())
}

/// Checks what can be checked without the database: shape, resource, key name, expiry.
fn check_token(
    id_scope: &str,
    registration_id: &str,
    authorization: Option<&str>,
) -> Result<SasToken, ServiceError> {
    let header = authorization.ok_or_else(|| {
        unauthorized("the request carries neither a SAS token nor a TLS client certificate")
    })?;
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
        if row.record.attestation_type() == AttestationType::Tpm {
            return attest_tpm(store, registration_id, &token, row).await;
        }
        let symmetric = row.record.attestation_type() == AttestationType::SymmetricKey;
        if symmetric && signed_by_any(&token, row.record.keys.as_ref()) {
            return Ok(Attested {
                kind: EnrollmentKind::Individual,
                device_keys: row.record.keys.clone().unwrap_or_default(),
                disabled: disabled(row),
                enrollment: row.clone(),
                certificate: None,
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

/// A TPM device signs with the key K its last challenge issued (wire-protocol.md §7.3); that
/// key also goes to the hub.
async fn attest_tpm(
    store: &Store,
    registration_id: &str,
    token: &SasToken,
    row: &EnrollmentRow,
) -> Result<Attested, ServiceError> {
    let (key, _) = super::tpm::issued_key(store, registration_id).await?;
    if !signed_by(token, Some(&key)) {
        return Err(unauthorized(
            "the SAS token is not signed with the key issued to this TPM in its last challenge",
        ));
    }
    Ok(Attested {
        kind: EnrollmentKind::Individual,
        device_keys: SymmetricKeys {
            primary_key: Some(key.clone()),
            secondary_key: Some(key),
        },
        disabled: disabled(row),
        enrollment: row.clone(),
        certificate: None,
    })
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
        certificate: None,
    })
}

/// The longest common name an X.509 registration ID may have (seed X509-03).
const MAX_CERTIFICATE_ID: usize = 64;

fn invalid_certificate(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthorized(format!("Invalid certificate: {}", why.into()))
}

/// Attests a device by the certificate chain it presented in the TLS handshake.
pub async fn attest_x509(
    store: &Store,
    registration_id: &str,
    certificates: &[Vec<u8>],
) -> Result<Attested, ServiceError> {
    let authorities = store.ca_certificates().await?;
    let groups = store.x509_groups().await?;
    // Each group's signing certificates, parsed once: they complete chains and are matched.
    let signing: Vec<Vec<ParsedCertificate>> = groups
        .iter()
        .map(|group| signing_certificates(&group.record.doc).collect())
        .collect();
    let mut held: Vec<Vec<u8>> = authorities
        .iter()
        .filter_map(|ca| parse_certificate(&ca.pem).ok().map(|c| c.der))
        .collect();
    held.extend(signing.iter().flatten().map(|c| c.der.clone()));
    let chain = chain::check(certificates, &held, x509_parser::time::ASN1Time::now())
        .map_err(invalid_certificate)?;
    check_common_name(&chain, registration_id)?;
    let verified: Vec<&str> = authorities
        .iter()
        .filter(|ca| ca.is_verified)
        .map(|ca| ca.info.sha256_thumbprint.as_str())
        .collect();
    // The thumbprints of the CA certificates an enrollment's `caReferences` name.
    let ca_references = |doc: &Enrollment| -> Vec<String> {
        let Some(refs) = doc
            .attestation
            .as_ref()
            .and_then(|a| a.x509.as_ref())
            .and_then(|x| x.ca_references.as_ref())
        else {
            return Vec::new();
        };
        [&refs.primary, &refs.secondary]
            .into_iter()
            .flatten()
            .filter_map(|name| {
                authorities
                    .iter()
                    .find(|ca| ca.name.eq_ignore_ascii_case(name))
            })
            .map(|ca| ca.info.sha256_thumbprint.clone())
            .collect()
    };
    let group_references: Vec<Vec<String>> = groups
        .iter()
        .zip(&signing)
        .map(|(group, certificates)| {
            certificates
                .iter()
                .map(|c| c.info.sha256_thumbprint.clone())
                .chain(ca_references(&group.record.doc))
                .collect()
        })
        .collect();
    // The entries that name a certificate of the chain above the leaf, most specific first.
    let mut matches: Vec<(usize, &EnrollmentRow)> = Vec::new();
    for (position, link) in chain.links.iter().enumerate().skip(1) {
        for (group, references) in groups.iter().zip(&group_references) {
            if references.contains(&link.sha256) {
                matches.push((position, group));
            }
        }
    }
    let trusted_from = |position: usize| {
        chain.links[position..]
            .iter()
            .any(|link| verified.contains(&link.sha256.as_str()))
    };
    let individual = store
        .enrollment(EnrollmentKind::Individual, registration_id)
        .await?;
    let blocked = individual.as_ref().is_some_and(disabled)
        || matches.iter().any(|(_, group)| disabled(group));
    let attested = |kind, row: &EnrollmentRow| Attested {
        kind,
        enrollment: row.clone(),
        device_keys: SymmetricKeys::default(),
        disabled: blocked,
        certificate: Some(chain.leaf.clone()),
    };
    if let Some(row) = &individual {
        if row.record.attestation_type() == AttestationType::X509 {
            let admitted =
                individual_admits(&chain, &row.record.doc, &ca_references, &trusted_from);
            match admitted {
                Ok(()) => return Ok(attested(EnrollmentKind::Individual, row)),
                Err(why) if !disabled(row) => return Err(invalid_certificate(why)),
                Err(_) => {}
            }
        } else if !disabled(row) {
            return Err(unauthorized(
                "the device's individual enrollment does not use X.509 attestation",
            ));
        }
    }
    if let Some((_, group)) = matches.iter().find(|(position, _)| trusted_from(*position)) {
        return Ok(attested(EnrollmentKind::Group, group));
    }
    if let Some((position, group)) = matches.first() {
        return Err(invalid_certificate(format!(
            "enrollment group '{}' covers '{}', but neither it nor a certificate above it in \
             the chain is a verified CA certificate; {}",
            group.record.id,
            chain.links[*position].subject,
            chain.end_description()
        )));
    }
    let sent: Vec<&str> = chain.links.iter().map(|l| l.subject.as_str()).collect();
    Err(invalid_certificate(format!(
        "no enrollment accepts this device: no individual X.509 enrollment for '{registration_id}' \
         and no enrollment group for any certificate above the leaf ({}); {}",
        sent.join(" <- "),
        chain.end_description()
    )))
}

/// The registration ID is the leaf's common name: registration-ID rules, at most 64
/// characters, and equal (ignoring case) to the ID the request names.
fn check_common_name(chain: &DeviceChain, registration_id: &str) -> Result<(), ServiceError> {
    let cn = chain.common_name();
    if cn.chars().count() > MAX_CERTIFICATE_ID {
        return Err(invalid_certificate(format!(
            "the device certificate's common name is {} characters long; an X.509 registration \
             ID has at most {MAX_CERTIFICATE_ID}",
            cn.chars().count()
        )));
    }
    crate::model::names::check_registration_id("the device certificate's common name", cn)
        .map_err(invalid_certificate)?;
    if !cn.eq_ignore_ascii_case(registration_id) {
        return Err(invalid_certificate(format!(
            "the device certificate's common name '{cn}' is not the registration ID \
             '{registration_id}' of the request"
        )));
    }
    Ok(())
}

/// An individual X.509 enrollment admits the device whose leaf is one of its certificates,
/// or whose chain reaches one of its verified CA references (individual enrollments carry no
/// signing certificates).
fn individual_admits(
    chain: &DeviceChain,
    doc: &Enrollment,
    references: &dyn Fn(&Enrollment) -> Vec<String>,
    trusted_from: &dyn Fn(usize) -> bool,
) -> Result<(), String> {
    let x509 = doc.attestation.as_ref().and_then(|a| a.x509.as_ref());
    let leaf = &chain.links[0];
    let own: Vec<ParsedCertificate> = x509
        .and_then(|x| x.client_certificates.as_ref())
        .map(|certs| certificates_of(certs).collect())
        .unwrap_or_default();
    if !own.is_empty() {
        if own.iter().any(|c| c.info.sha256_thumbprint == leaf.sha256) {
            return Ok(());
        }
        return Err(format!(
            "the device certificate (SHA-256 {}) is neither the primary nor the secondary \
             certificate of its individual enrollment",
            leaf.sha256
        ));
    }
    let thumbprints = references(doc);
    let reached = chain
        .links
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, link)| thumbprints.contains(&link.sha256));
    match reached {
        Some((position, _)) if trusted_from(position) => Ok(()),
        Some((_, link)) => Err(format!(
            "the individual enrollment's CA certificate '{}' is not verified",
            link.subject
        )),
        None => Err(format!(
            "the chain does not reach the CA certificate of the device's individual \
             enrollment; {}",
            chain.end_description()
        )),
    }
}

fn certificates_of(
    certs: &crate::model::enrollment::X509Certificates,
) -> impl Iterator<Item = ParsedCertificate> + '_ {
    [&certs.primary, &certs.secondary]
        .into_iter()
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| parse_certificate(text).ok())
}

/// The signing certificates an enrollment (group) holds itself.
fn signing_certificates(doc: &Enrollment) -> impl Iterator<Item = ParsedCertificate> + '_ {
    doc.attestation
        .as_ref()
        .and_then(|a| a.x509.as_ref())
        .and_then(|x| x.signing_certificates.as_ref())
        .into_iter()
        .flat_map(certificates_of)
}
