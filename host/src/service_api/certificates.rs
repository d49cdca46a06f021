//! CA certificates (right `ServiceConfig`), mirroring Azure DPS's certificate operations: upload
//! by name (PEM or Base64 DER), optionally marked verified; generate a verification code;
//! verify by proof of possession (a certificate whose subject CN is the code, signed by the
//! CA's key); list, show, delete; `ETags`. The seed's limit of 25 becomes a configurable quota.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Call, Reply, ServiceState};
use crate::attestation::x509::{is_ca, parse_certificate, verify_proof_of_possession};
use crate::error::{NotFoundKind, ServiceError};
use crate::model::enrollment::check_policy_name;
use crate::store::{etag_matches, CaCertificateRow};

/// How long a verification code is accepted.
const CODE_LIFETIME_SECONDS: i64 = 3600;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadInput {
    certificate: String,
    #[serde(default)]
    is_verified: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyInput {
    certificate: String,
}

fn to_json(row: &CaCertificateRow, with_code: bool) -> Value {
    let mut properties = json!({
        "subject": row.info.subject_name,
        "expiry": row.info.not_after_utc,
        "thumbprint": row.info.sha1_thumbprint,
        "isVerified": row.is_verified,
        "created": row.created,
        "updated": row.updated,
        "certificate": row.pem,
    });
    if with_code {
        properties["verificationCode"] = json!(row.verification_code);
    }
    json!({
        "name": row.name,
        "etag": row.etag,
        "type": "Microsoft.Devices/provisioningServices/Certificates",
        "properties": properties,
        "info": row.info,
    })
}

async fn load(state: &ServiceState, name: &str) -> Result<CaCertificateRow, ServiceError> {
    state
        .store
        .ca_certificate(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(NotFoundKind::CaCertificate, name))
}

fn check_if_match(call: &Call, row: &CaCertificateRow) -> Result<(), ServiceError> {
    match call.if_match() {
        Some(wanted) if !etag_matches(wanted, &row.etag) => {
            Err(ServiceError::PreconditionFailed(row.name.clone()))
        }
        _ => Ok(()),
    }
}

pub(super) async fn list(state: &ServiceState) -> Result<Reply, ServiceError> {
    let rows = state.store.ca_certificates().await?;
    Ok(Reply::ok(
        json!({"value": rows.iter().map(|r| to_json(r, false)).collect::<Vec<_>>()}),
    ))
}

pub(super) async fn get(state: &ServiceState, name: &str) -> Result<Reply, ServiceError> {
    Ok(Reply::ok(to_json(&load(state, name).await?, false)))
}

pub(super) async fn put(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    check_policy_name(name).map_err(ServiceError::invalid)?;
    let input: UploadInput = call.json()?;
    let parsed = parse_certificate(&input.certificate)
        .map_err(|why| ServiceError::invalid(format!("certificate: {why}")))?;
    if !is_ca(&parsed.der) {
        return Err(ServiceError::invalid(
            "certificate: it is not a CA certificate (its basic constraints do not allow signing certificates)",
        ));
    }
    let existing = state.store.ca_certificate(name).await?;
    if let Some(wanted) = call.if_match() {
        if !existing
            .as_ref()
            .is_some_and(|row| etag_matches(wanted, &row.etag))
        {
            return Err(ServiceError::PreconditionFailed(name.to_owned()));
        }
    }
    let row = state
        .store
        .put_ca_certificate(
            name,
            &parsed.pem,
            &parsed.info,
            input.is_verified,
            existing.as_ref().map(|row| row.etag.as_str()),
            state.max_ca_certificates,
        )
        .await?
        .ok_or_else(|| {
            ServiceError::Conflict(format!(
                "certificate '{name}' was changed concurrently; try again"
            ))
        })?;
    Ok(Reply::ok(to_json(&row, false)))
}

pub(super) async fn generate_code(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let row = load(state, name).await?;
    check_if_match(call, &row)?;
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    let code = hex::encode_upper(bytes);
    let row = state
        .store
        .set_verification_code(
            name,
            &code,
            crate::clock::unix_now() + CODE_LIFETIME_SECONDS,
            &row.etag,
        )
        .await?
        .ok_or_else(|| {
            ServiceError::Conflict(format!(
                "certificate '{name}' was changed concurrently; try again"
            ))
        })?;
    Ok(Reply::ok(to_json(&row, true)))
}

pub(super) async fn verify(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    let row = load(state, name).await?;
    check_if_match(call, &row)?;
    let input: VerifyInput = call.json()?;
    let (Some(code), Some(expiry)) = (&row.verification_code, row.code_expiry) else {
        return Err(ServiceError::invalid(
            "no verification code is pending: generate one first",
        ));
    };
    if expiry < crate::clock::unix_now() {
        return Err(ServiceError::invalid(
            "the verification code expired: generate a new one",
        ));
    }
    let leaf = parse_certificate(&input.certificate)
        .map_err(|why| ServiceError::invalid(format!("certificate: {why}")))?;
    let ca = parse_certificate(&row.pem)
        .map_err(|why| ServiceError::Internal(format!("the stored CA is damaged: {why}")))?;
    verify_proof_of_possession(&ca.der, &leaf.der, code).map_err(ServiceError::invalid)?;
    let row = state
        .store
        .mark_ca_verified(name, &row.etag)
        .await?
        .ok_or_else(|| {
            ServiceError::Conflict(format!(
                "certificate '{name}' was changed concurrently; try again"
            ))
        })?;
    Ok(Reply::ok(to_json(&row, false)))
}

pub(super) async fn delete(
    state: &ServiceState,
    name: &str,
    call: &Call,
) -> Result<Reply, ServiceError> {
    state
        .store
        .delete_ca_certificate(name, call.if_match())
        .await?;
    Ok(Reply::no_content())
}
