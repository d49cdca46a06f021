//! TPM attestation (wire-protocol.md §7, seed TPM): the challenge that issues a device its key
//! K inside an `authenticationKey` blob only its TPM can open, and the check of the SAS tokens
//! it then signs with K. The crypto is `attestation::tpm`; this module decides who gets a
//! challenge and remembers K (sealed, in the database, so any node verifies the next request).
//!
//! Every challenge issues a fresh K, so keys roll on each registration, and the hub identity
//! gets the K of the registration that assigned it (§7.6, seed: keys are rolled on
//! reprovisioning).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;

use crate::attestation::tpm::{build_activation, parse_public, parse_public_tpm2b, TpmPublic};
use crate::error::ServiceError;
use crate::model::enrollment::{AttestationType, EnrollmentKind};
use crate::store::{EnrollmentRow, Store};

/// The opaque "URI data" every blob carries (§7.2 #6): short and non-empty.
const URI_DATA: &[u8] = b"berth:tpm";

/// The `tpm` object of a register request body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmKeys {
    pub endorsement_key: Option<String>,
    pub storage_root_key: Option<String>,
}

/// What the device presented: its EK and SRK, parsed.
#[derive(Debug)]
pub struct Presented {
    pub endorsement_key: TpmPublic,
    pub storage_root_key: TpmPublic,
}

impl Presented {
    /// From the register body's `tpm` object (Base64 `TPM2B_PUBLIC`s).
    pub fn from_body(tpm: &serde_json::Value) -> Result<Self, ServiceError> {
        let keys: TpmKeys = serde_json::from_value(tpm.clone())
            .map_err(|e| ServiceError::MalformedBody(format!("tpm: {e}")))?;
        let endorsement_key = keys
            .endorsement_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ServiceError::invalid("tpm.endorsementKey is required"))?;
        let storage_root_key = keys
            .storage_root_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ServiceError::invalid("tpm.storageRootKey is required"))?;
        Ok(Self {
            endorsement_key: parse_public(endorsement_key)
                .map_err(|e| ServiceError::invalid(format!("tpm.endorsementKey: {e}")))?,
            storage_root_key: parse_public(storage_root_key)
                .map_err(|e| ServiceError::invalid(format!("tpm.storageRootKey: {e}")))?,
        })
    }

    /// From the raw `TPM2B_PUBLIC`s of the AMQP SASL exchange (§6.3).
    pub fn from_raw(endorsement_key: &[u8], storage_root_key: &[u8]) -> Result<Self, ServiceError> {
        Ok(Self {
            endorsement_key: parse_public_tpm2b(endorsement_key)
                .map_err(|e| ServiceError::invalid(format!("endorsement key: {e}")))?,
            storage_root_key: parse_public_tpm2b(storage_root_key)
                .map_err(|e| ServiceError::invalid(format!("storage root key: {e}")))?,
        })
    }
}

fn unauthorized(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthorized(why.into())
}

/// The TPM enrollment of a registration ID whose endorsement key is the one presented.
async fn enrollment(
    store: &Store,
    registration_id: &str,
    endorsement_key: &TpmPublic,
) -> Result<EnrollmentRow, ServiceError> {
    let row = store
        .enrollment(EnrollmentKind::Individual, registration_id)
        .await?
        .ok_or_else(|| {
            unauthorized(format!(
                "no individual enrollment exists for the TPM device '{registration_id}'"
            ))
        })?;
    if row.record.attestation_type() != AttestationType::Tpm {
        return Err(unauthorized(
            "the device's enrollment does not use TPM attestation",
        ));
    }
    let enrolled = row
        .record
        .doc
        .attestation
        .as_ref()
        .and_then(|a| a.tpm.as_ref())
        .map(|t| t.endorsement_key.as_str())
        .ok_or_else(|| ServiceError::Internal("a TPM enrollment without its key".to_owned()))?;
    let enrolled = parse_public(enrolled).map_err(|e| {
        unauthorized(format!(
            "the enrollment's endorsement key cannot be used: {e}"
        ))
    })?;
    if enrolled.public_area() != endorsement_key.public_area() {
        return Err(unauthorized(format!(
            "the endorsement key the device presented is not the one enrolled for '{registration_id}'"
        )));
    }
    Ok(row)
}

/// Issues a challenge: checks the device's EK against its enrollment, builds a blob for its
/// EK and SRK with a fresh K, remembers K. Returns the blob as `authenticationKey` (Base64).
pub async fn challenge(
    store: &Store,
    registration_id: &str,
    presented: &Presented,
) -> Result<String, ServiceError> {
    enrollment(store, registration_id, &presented.endorsement_key).await?;
    let activation = build_activation(
        &presented.endorsement_key,
        &presented.storage_root_key,
        URI_DATA,
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| ServiceError::invalid(format!("the TPM keys cannot be used: {e}")))?;
    let blob = activation.blob_base64();
    store
        .put_tpm_key(registration_id, &BASE64.encode(activation.key), &blob)
        .await?;
    Ok(blob)
}

/// A blob for the presented keys whose K is thrown away: over AMQP a refused TPM device is
/// still taken through the whole exchange and refused at its end, because the official Node
/// client never returns when the SASL outcome comes before the blob. It learns nothing from
/// it: without an enrollment no K is remembered, so its SAS token cannot verify.
pub fn decoy(presented: &Presented) -> Result<String, ServiceError> {
    build_activation(
        &presented.endorsement_key,
        &presented.storage_root_key,
        URI_DATA,
        &mut rand::rngs::OsRng,
    )
    .map(|activation| activation.blob_base64())
    .map_err(|e| ServiceError::invalid(format!("the TPM keys cannot be used: {e}")))
}

/// The key K last issued to a TPM device (Base64) and its blob; 401 when none was issued.
pub async fn issued_key(
    store: &Store,
    registration_id: &str,
) -> Result<(String, String), ServiceError> {
    store.tpm_key(registration_id).await?.ok_or_else(|| {
        unauthorized(
            "no TPM challenge was issued to this device: send the register request with the \
             tpm keys and no Authorization first",
        )
    })
}
