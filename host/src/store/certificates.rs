//! CA certificates (for `caReferences` and, with X.509 attestation, chain validation).

use sqlx::Row as _;

use super::{new_etag, Result, Store, StoreError};
use crate::attestation::x509::CertificateInfo;
use crate::clock::now_utc;
use crate::error::NotFoundKind;

/// A stored CA certificate.
#[derive(Debug, Clone)]
pub struct CaCertificateRow {
    pub name: String,
    pub pem: String,
    pub info: CertificateInfo,
    pub is_verified: bool,
    pub verification_code: Option<String>,
    /// Unix seconds after which the verification code is no longer accepted.
    pub code_expiry: Option<i64>,
    pub etag: String,
    pub created: String,
    pub updated: String,
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<CaCertificateRow> {
    let info: String = row.try_get("info")?;
    Ok(CaCertificateRow {
        name: row.try_get("name")?,
        pem: row.try_get("pem")?,
        info: serde_json::from_str(&info).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        is_verified: row.try_get::<i64, _>("is_verified")? != 0,
        verification_code: row.try_get("verification_code")?,
        code_expiry: row.try_get("code_expiry")?,
        etag: row.try_get("etag")?,
        created: row.try_get("created")?,
        updated: row.try_get("updated")?,
    })
}

impl Store {
    pub async fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificateRow>> {
        let row = sqlx::query("SELECT * FROM ca_certificates WHERE name_key = $1")
            .bind(name.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn ca_certificates(&self) -> Result<Vec<CaCertificateRow>> {
        let rows = sqlx::query("SELECT * FROM ca_certificates ORDER BY name_key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Creates (within `quota`) or replaces a certificate; a replacement is unverified again
    /// unless `verified` says otherwise. `expected_etag` makes the replacement conditional.
    pub async fn put_ca_certificate(
        &self,
        name: &str,
        pem: &str,
        info: &CertificateInfo,
        verified: bool,
        expected_etag: Option<&str>,
        quota: usize,
    ) -> Result<Option<CaCertificateRow>> {
        let _gate = self.gate().await;
        let info_json =
            serde_json::to_string(info).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = now_utc();
        let done = if let Some(old) = expected_etag {
            sqlx::query(
                "UPDATE ca_certificates SET name = $1, pem = $2, info = $3, is_verified = $4, verification_code = NULL, \
                 code_expiry = NULL, etag = $5, updated = $6 WHERE name_key = $7 AND etag = $8",
            )
            .bind(name)
            .bind(pem)
            .bind(&info_json)
            .bind(i64::from(verified))
            .bind(new_etag())
            .bind(&now)
            .bind(name.to_ascii_lowercase())
            .bind(old)
            .execute(&self.pool)
            .await?
        } else {
            let count: i64 = sqlx::query("SELECT COUNT(*) FROM ca_certificates")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= quota {
                return Err(StoreError::Conflict(format!(
                    "the quota of {quota} CA certificates is reached; delete one first"
                )));
            }
            sqlx::query(
                "INSERT INTO ca_certificates (name_key, name, pem, info, is_verified, etag, created, updated) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name_key) DO NOTHING",
            )
            .bind(name.to_ascii_lowercase())
            .bind(name)
            .bind(pem)
            .bind(&info_json)
            .bind(i64::from(verified))
            .bind(new_etag())
            .bind(&now)
            .bind(&now)
            .execute(&self.pool)
            .await?
        };
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.ca_certificate(name).await
    }

    /// Stores a new verification code for the certificate whose etag is still `etag`.
    pub async fn set_verification_code(
        &self,
        name: &str,
        code: &str,
        expiry: i64,
        etag: &str,
    ) -> Result<Option<CaCertificateRow>> {
        let _gate = self.gate().await;
        let done = sqlx::query(
            "UPDATE ca_certificates SET verification_code = $1, code_expiry = $2, etag = $3, updated = $4 \
             WHERE name_key = $5 AND etag = $6",
        )
        .bind(code)
        .bind(expiry)
        .bind(new_etag())
        .bind(now_utc())
        .bind(name.to_ascii_lowercase())
        .bind(etag)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.ca_certificate(name).await
    }

    /// Marks the certificate verified (and spends its code) if its etag is still `etag`.
    pub async fn mark_ca_verified(
        &self,
        name: &str,
        etag: &str,
    ) -> Result<Option<CaCertificateRow>> {
        let _gate = self.gate().await;
        let done = sqlx::query(
            "UPDATE ca_certificates SET is_verified = 1, verification_code = NULL, code_expiry = NULL, etag = $1, updated = $2 \
             WHERE name_key = $3 AND etag = $4",
        )
        .bind(new_etag())
        .bind(now_utc())
        .bind(name.to_ascii_lowercase())
        .bind(etag)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.ca_certificate(name).await
    }

    pub async fn delete_ca_certificate(&self, name: &str, if_match: Option<&str>) -> Result<()> {
        let _gate = self.gate().await;
        let existing = self
            .ca_certificate(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(NotFoundKind::CaCertificate, name.to_owned()))?;
        if let Some(wanted) = if_match {
            if !super::etag_matches(wanted, &existing.etag) {
                return Err(StoreError::PreconditionFailed(name.to_owned()));
            }
        }
        sqlx::query("DELETE FROM ca_certificates WHERE name_key = $1 AND etag = $2")
            .bind(name.to_ascii_lowercase())
            .bind(&existing.etag)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
