//! Policy modules and lookup tables: immutable versions per name.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sqlx::Row as _;

use super::{Result, Store, StoreError};
use crate::clock::now_utc;

/// One stored policy version (without its bytes).
#[derive(Debug, Clone)]
pub struct PolicyVersion {
    pub name: String,
    pub version: i64,
    pub world: String,
    pub sha256: String,
    pub size: i64,
    pub limits: String,
    pub created: String,
}

/// One stored lookup table version (without its content).
#[derive(Debug, Clone)]
pub struct TableVersion {
    pub name: String,
    pub version: i64,
    pub size: i64,
    pub created: String,
}

fn policy_from_row(row: &sqlx::any::AnyRow) -> Result<PolicyVersion> {
    Ok(PolicyVersion {
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        world: row.try_get("world")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get("size")?,
        limits: row.try_get("limits")?,
        created: row.try_get("created")?,
    })
}

impl Store {
    /// Stores a new version of a policy; returns it. Versions count up from 1 per name.
    pub async fn insert_policy_version(
        &self,
        name: &str,
        world: &str,
        sha256: &str,
        wasm: &[u8],
        limits: &str,
    ) -> Result<PolicyVersion> {
        let _gate = self.gate().await;
        for _ in 0..5 {
            let next: i64 = sqlx::query(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE name_key = $1",
            )
            .bind(name.to_ascii_lowercase())
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
            let now = now_utc();
            let done = sqlx::query(
                "INSERT INTO policies (name_key, name, version, world, sha256, size, wasm, limits, created) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (name_key, version) DO NOTHING",
            )
            .bind(name.to_ascii_lowercase())
            .bind(name)
            .bind(next)
            .bind(world)
            .bind(sha256)
            .bind(i64::try_from(wasm.len()).unwrap_or(i64::MAX))
            .bind(BASE64.encode(wasm))
            .bind(limits)
            .bind(&now)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(PolicyVersion {
                    name: name.to_owned(),
                    version: next,
                    world: world.to_owned(),
                    sha256: sha256.to_owned(),
                    size: i64::try_from(wasm.len()).unwrap_or(i64::MAX),
                    limits: limits.to_owned(),
                    created: now,
                });
            }
        }
        Err(StoreError::Conflict(format!(
            "policy '{name}' is being uploaded concurrently; try again"
        )))
    }

    /// All versions of a policy, oldest first.
    pub async fn policy_versions(&self, name: &str) -> Result<Vec<PolicyVersion>> {
        let rows = sqlx::query(
            "SELECT name, version, world, sha256, size, limits, created FROM policies WHERE name_key = $1 ORDER BY version",
        )
        .bind(name.to_ascii_lowercase())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(policy_from_row).collect()
    }

    /// The latest version of every policy.
    pub async fn policies(&self) -> Result<Vec<PolicyVersion>> {
        let rows = sqlx::query(
            "SELECT p.name, p.version, p.world, p.sha256, p.size, p.limits, p.created FROM policies p \
             WHERE p.version = (SELECT MAX(q.version) FROM policies q WHERE q.name_key = p.name_key) ORDER BY p.name_key",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(policy_from_row).collect()
    }

    /// A version (the latest when `version` is `None`) with its bytes.
    /// A policy version without its module: what a registration needs when the compiled
    /// module is already in memory (reading and decoding the module costs more than the call).
    pub async fn policy_version(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<PolicyVersion>> {
        const COLUMNS: &str = "name, version, world, sha256, size, limits, created";
        let row = match version {
            Some(version) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM policies WHERE name_key = $1 AND version = $2"
                ))
                .bind(name.to_ascii_lowercase())
                .bind(version)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                "SELECT {COLUMNS} FROM policies WHERE name_key = $1 ORDER BY version DESC LIMIT 1"
            ))
                .bind(name.to_ascii_lowercase())
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.as_ref().map(policy_from_row).transpose()
    }

    pub async fn policy_module(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<(PolicyVersion, Vec<u8>)>> {
        let row = match version {
            Some(version) => {
                sqlx::query("SELECT * FROM policies WHERE name_key = $1 AND version = $2")
                    .bind(name.to_ascii_lowercase())
                    .bind(version)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(
                    "SELECT * FROM policies WHERE name_key = $1 ORDER BY version DESC LIMIT 1",
                )
                .bind(name.to_ascii_lowercase())
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|row| {
            let meta = policy_from_row(&row)?;
            let wasm: String = row.try_get("wasm")?;
            let bytes = BASE64
                .decode(wasm)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((meta, bytes))
        })
        .transpose()
    }

    pub async fn delete_policy(&self, name: &str) -> Result<u64> {
        let _gate = self.gate().await;
        let done = sqlx::query("DELETE FROM policies WHERE name_key = $1")
            .bind(name.to_ascii_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Stores a new version of a lookup table (a JSON object of key → value).
    pub async fn insert_table_version(&self, name: &str, doc: &str) -> Result<TableVersion> {
        let _gate = self.gate().await;
        for _ in 0..5 {
            let next: i64 = sqlx::query(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM lookup_tables WHERE name_key = $1",
            )
            .bind(name.to_ascii_lowercase())
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
            let now = now_utc();
            let size = i64::try_from(doc.len()).unwrap_or(i64::MAX);
            let done = sqlx::query(
                "INSERT INTO lookup_tables (name_key, name, version, doc, size, created) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (name_key, version) DO NOTHING",
            )
            .bind(name.to_ascii_lowercase())
            .bind(name)
            .bind(next)
            .bind(doc)
            .bind(size)
            .bind(&now)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(TableVersion {
                    name: name.to_owned(),
                    version: next,
                    size,
                    created: now,
                });
            }
        }
        Err(StoreError::Conflict(format!(
            "lookup table '{name}' is being uploaded concurrently; try again"
        )))
    }

    /// The latest version of every table.
    pub async fn tables(&self) -> Result<Vec<TableVersion>> {
        let rows = sqlx::query(
            "SELECT t.name, t.version, t.size, t.created FROM lookup_tables t \
             WHERE t.version = (SELECT MAX(u.version) FROM lookup_tables u WHERE u.name_key = t.name_key) ORDER BY t.name_key",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TableVersion {
                    name: row.try_get("name")?,
                    version: row.try_get("version")?,
                    size: row.try_get("size")?,
                    created: row.try_get("created")?,
                })
            })
            .collect()
    }

    /// The latest version of a table, with its content.
    pub async fn table(&self, name: &str) -> Result<Option<(TableVersion, String)>> {
        let row = sqlx::query(
            "SELECT * FROM lookup_tables WHERE name_key = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(name.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok((
                TableVersion {
                    name: row.try_get("name")?,
                    version: row.try_get("version")?,
                    size: row.try_get("size")?,
                    created: row.try_get("created")?,
                },
                row.try_get("doc")?,
            ))
        })
        .transpose()
    }

    pub async fn delete_table(&self, name: &str) -> Result<u64> {
        let _gate = self.gate().await;
        let done = sqlx::query("DELETE FROM lookup_tables WHERE name_key = $1")
            .bind(name.to_ascii_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The enrollments and groups whose documents mention `needle` (to refuse deleting a
    /// policy or table in use; the caller checks the exact binding).
    pub async fn enrollments_mentioning(&self, needle: &str) -> Result<Vec<super::EnrollmentRow>> {
        // Names are validated (no `%`); a `_` in them is a LIKE wildcard that also matches
        // itself, so the pattern finds every document that mentions the name.
        let pattern = format!("%{needle}%");
        let mut out = Vec::new();
        for table in ["enrollments", "enrollment_groups"] {
            let sql = format!("SELECT * FROM {table} WHERE LOWER(doc) LIKE $1");
            let rows = sqlx::query(&sql)
                .bind(pattern.to_ascii_lowercase())
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                out.push(self.enrollment_from_row(row)?);
            }
        }
        Ok(out)
    }
}
