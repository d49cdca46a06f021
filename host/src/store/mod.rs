//! Persistence through sqlx's `Any` driver, so one set of portable SQL serves SQLite (the
//! embedded default, WAL, `synchronous=FULL`) and PostgreSQL (several stateless nodes on one
//! database). Everything a node knows lives here: no state is kept only in process memory.
//!
//! Writes use optimistic concurrency on the `etag` column, which is correct across nodes;
//! on SQLite an in-process gate also serializes write transactions, because a deferred
//! SQLite transaction that reads and then writes fails outright under contention.

mod batch;
mod certificates;
mod policies;
mod sealing;

use std::fmt::Write as _;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor as _, Row as _};
use tokio::sync::Mutex;

pub use certificates::CaCertificateRow;
pub use policies::{PolicyVersion, TableVersion};
pub use sealing::{OpenError, Sealer};

use crate::clock::now_utc;
use crate::error::NotFoundKind;
use crate::hubs::LinkedHub;
use crate::model::access::{AccessPolicy, Rights};
use crate::model::enrollment::{Enrollment, EnrollmentKind, SymmetricKeys, ValidEnrollment};
use crate::model::registration::{RegistrationRecord, RegistrationState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Conflict(String),
    #[error("etag mismatch on '{0}'")]
    PreconditionFailed(String),
    #[error("{0} '{1}' not found")]
    NotFound(NotFoundKind, String),
    #[error(transparent)]
    Sealed(#[from] OpenError),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database, shared by every request of a node.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    sealer: Sealer,
    write_gate: Option<Arc<Mutex<()>>>,
    /// Group commit for the writes of device registrations.
    batcher: batch::Batcher,
}

/// An enrollment as stored, with its server-managed fields.
#[derive(Debug, Clone)]
pub struct EnrollmentRow {
    pub record: ValidEnrollment,
    pub etag: String,
    pub created: String,
    pub updated: String,
}

impl EnrollmentRow {
    /// The document with the server-managed fields filled in (secrets still inside).
    pub fn document(&self) -> Enrollment {
        let mut doc = self.record.doc.clone();
        doc.etag = Some(self.etag.clone());
        doc.created_date_time_utc = Some(self.created.clone());
        doc.last_updated_date_time_utc = Some(self.updated.clone());
        doc.reprovision_policy
            .get_or_insert(crate::model::enrollment::ReprovisionPolicy {
                update_hub_assignment: true,
                migrate_device_data: true,
            });
        doc
    }
}

/// A linked hub as stored.
#[derive(Debug, Clone)]
pub struct LinkedHubRow {
    pub hub: LinkedHub,
    pub etag: String,
    pub created: String,
    pub updated: String,
}

/// A shared access policy as stored.
#[derive(Debug, Clone)]
pub struct AccessPolicyRow {
    pub policy: AccessPolicy,
    pub etag: String,
    pub created: String,
    pub updated: String,
}

/// A filter of the query language, on an indexed column (see `service_api::query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentColumn {
    Id,
    ProvisioningStatus,
    AttestationType,
    DeviceId,
    IotHubHostName,
    AllocationPolicy,
}

impl EnrollmentColumn {
    fn sql(self) -> &'static str {
        match self {
            Self::Id => "id_key",
            Self::ProvisioningStatus => "provisioning_status",
            Self::AttestationType => "attestation_type",
            Self::DeviceId => "device_id",
            Self::IotHubHostName => "iot_hub_host_name",
            Self::AllocationPolicy => "allocation_policy",
        }
    }
}

/// One page of a query and the key to continue after it.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub continuation: Option<String>,
}

/// What one item of a bulk operation does.
#[derive(Debug, Clone)]
pub enum BulkWrite {
    /// Create; fails when the ID exists.
    Create(String, Enrollment),
    /// Create or replace.
    Update(String, Enrollment),
    /// Replace only when the stored etag matches.
    UpdateIfMatch(String, Enrollment, String),
    /// Delete, conditionally when an etag is given.
    Delete(String, Option<String>),
}

fn table(kind: EnrollmentKind) -> &'static str {
    match kind {
        EnrollmentKind::Individual => "enrollments",
        EnrollmentKind::Group => "enrollment_groups",
    }
}

fn not_found_kind(kind: EnrollmentKind) -> NotFoundKind {
    match kind {
        EnrollmentKind::Individual => NotFoundKind::Enrollment,
        EnrollmentKind::Group => NotFoundKind::EnrollmentGroup,
    }
}

/// A fresh etag: an opaque quoted string, as DPS writes them (wire-protocol.md §8.3).
pub fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// Compares an `If-Match` value with a stored etag; quotes and a weak prefix are ignored
/// because the SDKs differ in whether they quote (§8.3). `*` matches any existing value.
pub fn etag_matches(if_match: &str, etag: &str) -> bool {
    let bare = |s: &str| {
        s.trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_owned()
    };
    let wanted = bare(if_match);
    wanted == "*" || wanted == bare(etag)
}

impl Store {
    /// Opens (creating when needed) the database at `url` and applies the migrations.
    pub async fn open(url: &str, sealer: Sealer) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL for concurrent readers; FULL so an acknowledged write
                            // survives a crash; a busy timeout instead of instant failure.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            // 8 MiB of page cache per connection (SQLite's default is 2):
                            // lookups stay in memory as the registration tables grow.
                            conn.execute("PRAGMA cache_size = -8192").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await?
            }
        };
        MIGRATOR.run(&pool).await?;
        let write_gate = (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(())));
        let batcher = batch::Batcher::start(pool.clone(), write_gate.clone());
        Ok(Self {
            pool,
            backend,
            sealer,
            write_gate,
            batcher,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Cheap liveness check for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn gate(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }

    // ---- instance settings -------------------------------------------------------------

    /// Returns the stored value of `name`, storing `default()` first if there is none. Safe
    /// when several nodes start at once: the first insert wins and all read it back.
    pub async fn setting_or_init(
        &self,
        name: &str,
        default: impl FnOnce() -> String,
    ) -> Result<String> {
        let _gate = self.gate().await;
        sqlx::query("INSERT INTO instance_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(default())
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM instance_settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<String, _>(0)?)
    }

    /// Sets `name` to `value`, replacing what was there.
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        let _gate = self.gate().await;
        sqlx::query(
            "INSERT INTO instance_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Proves that this node's secret key is the one the database was sealed with, so that a
    /// node with the wrong key fails at start rather than on the first secret it reads.
    pub async fn check_sealing_key(&self) -> Result<()> {
        const PROBE: &str = "berth-sealing-key-check";
        let sealed = self
            .setting_or_init("sealing_key_check", || self.sealer.seal(PROBE))
            .await?;
        match self.sealer.open(&sealed) {
            Ok(text) if text == PROBE => Ok(()),
            _ => Err(StoreError::Sealed(OpenError)),
        }
    }

    // ---- access policies ---------------------------------------------------------------

    fn policy_from_row(&self, row: &sqlx::any::AnyRow) -> Result<AccessPolicyRow> {
        let rights: String = row.try_get("rights")?;
        Ok(AccessPolicyRow {
            policy: AccessPolicy {
                name: row.try_get("name")?,
                rights: Rights::parse(&rights).map_err(StoreError::Corrupt)?,
                primary_key: self
                    .sealer
                    .open(&row.try_get::<String, _>("primary_key")?)?,
                secondary_key: self
                    .sealer
                    .open(&row.try_get::<String, _>("secondary_key")?)?,
            },
            etag: row.try_get("etag")?,
            created: row.try_get("created")?,
            updated: row.try_get("updated")?,
        })
    }

    pub async fn access_policy(&self, name: &str) -> Result<Option<AccessPolicyRow>> {
        let row = sqlx::query("SELECT * FROM access_policies WHERE name_key = $1")
            .bind(name.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.policy_from_row(&r)).transpose()
    }

    pub async fn access_policies(&self) -> Result<Vec<AccessPolicyRow>> {
        let rows = sqlx::query("SELECT * FROM access_policies ORDER BY name_key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.policy_from_row(r)).collect()
    }

    /// Creates the policy unless one of that name exists; returns whether it was created.
    pub async fn insert_access_policy(&self, policy: &AccessPolicy) -> Result<bool> {
        let _gate = self.gate().await;
        let now = now_utc();
        let done = sqlx::query(
            "INSERT INTO access_policies (name_key, name, rights, primary_key, secondary_key, etag, created, updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name_key) DO NOTHING",
        )
        .bind(policy.name.to_ascii_lowercase())
        .bind(&policy.name)
        .bind(policy.rights.to_string())
        .bind(self.sealer.seal(&policy.primary_key))
        .bind(self.sealer.seal(&policy.secondary_key))
        .bind(new_etag())
        .bind(&now)
        .bind(&now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces rights and keys of an existing policy when its etag is still `etag`.
    pub async fn update_access_policy(&self, policy: &AccessPolicy, etag: &str) -> Result<bool> {
        let _gate = self.gate().await;
        let done = sqlx::query(
            "UPDATE access_policies SET rights = $1, primary_key = $2, secondary_key = $3, etag = $4, updated = $5 \
             WHERE name_key = $6 AND etag = $7",
        )
        .bind(policy.rights.to_string())
        .bind(self.sealer.seal(&policy.primary_key))
        .bind(self.sealer.seal(&policy.secondary_key))
        .bind(new_etag())
        .bind(now_utc())
        .bind(policy.name.to_ascii_lowercase())
        .bind(etag)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a policy unless it is the last one holding `ServiceConfig` (which would lock
    /// every operator out).
    pub async fn delete_access_policy(&self, name: &str) -> Result<()> {
        let _gate = self.gate().await;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT name_key, rights FROM access_policies")
            .fetch_all(&mut *tx)
            .await?;
        let key = name.to_ascii_lowercase();
        let mut found = false;
        let mut other_admins = 0;
        for row in &rows {
            let row_key: String = row.try_get(0)?;
            let rights =
                Rights::parse(&row.try_get::<String, _>(1)?).map_err(StoreError::Corrupt)?;
            if row_key == key {
                found = true;
            } else if rights.contains(crate::model::access::Right::ServiceConfig) {
                other_admins += 1;
            }
        }
        if !found {
            return Err(StoreError::NotFound(
                NotFoundKind::AccessPolicy,
                name.to_owned(),
            ));
        }
        if other_admins == 0 {
            return Err(StoreError::Conflict(format!(
                "'{name}' is the last policy with ServiceConfig; create another before deleting it"
            )));
        }
        sqlx::query("DELETE FROM access_policies WHERE name_key = $1")
            .bind(&key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- enrollments and groups --------------------------------------------------------

    fn enrollment_from_row(&self, row: &sqlx::any::AnyRow) -> Result<EnrollmentRow> {
        let doc: String = row.try_get("doc")?;
        let doc: Enrollment =
            serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let keys = match row.try_get::<Option<String>, _>("sealed_keys")? {
            Some(sealed) => {
                let json = self.sealer.open(&sealed)?;
                Some(
                    serde_json::from_str::<SymmetricKeys>(&json)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                )
            }
            None => None,
        };
        Ok(EnrollmentRow {
            record: ValidEnrollment {
                id: row.try_get("id")?,
                doc,
                keys,
            },
            etag: row.try_get("etag")?,
            created: row.try_get("created")?,
            updated: row.try_get("updated")?,
        })
    }

    pub async fn enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Option<EnrollmentRow>> {
        let mut conn = self.pool.acquire().await?;
        self.enrollment_on(&mut conn, kind, id).await
    }

    async fn enrollment_on(
        &self,
        conn: &mut AnyConnection,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Option<EnrollmentRow>> {
        let sql = format!("SELECT * FROM {} WHERE id_key = $1", table(kind));
        let row = sqlx::query(&sql)
            .bind(id.to_ascii_lowercase())
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|r| self.enrollment_from_row(&r)).transpose()
    }

    fn sealed_keys(&self, record: &ValidEnrollment) -> Result<Option<String>> {
        record
            .keys
            .as_ref()
            .map(|k| serde_json::to_string(k).map(|json| self.sealer.seal(&json)))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn doc_json(record: &ValidEnrollment) -> Result<String> {
        serde_json::to_string(&record.doc).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Inserts a new record; `Ok(None)` when one with that ID already exists.
    async fn insert_enrollment_on(
        &self,
        conn: &mut AnyConnection,
        kind: EnrollmentKind,
        record: &ValidEnrollment,
    ) -> Result<Option<EnrollmentRow>> {
        let now = now_utc();
        let etag = new_etag();
        let sql = format!(
            "INSERT INTO {} (id_key, id, doc, sealed_keys, etag, created, updated, provisioning_status, \
             attestation_type, device_id, iot_hub_host_name, allocation_policy) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id_key) DO NOTHING",
            table(kind)
        );
        let done = sqlx::query(&sql)
            .bind(record.id.to_ascii_lowercase())
            .bind(&record.id)
            .bind(Self::doc_json(record)?)
            .bind(self.sealed_keys(record)?)
            .bind(&etag)
            .bind(&now)
            .bind(&now)
            .bind(status_column(record))
            .bind(record.attestation_type().as_str())
            .bind(record.doc.device_id.clone())
            .bind(hub_column(record))
            .bind(record.doc.allocation_policy.map(|p| p.as_str().to_owned()))
            .execute(&mut *conn)
            .await?;
        Ok((done.rows_affected() == 1).then(|| EnrollmentRow {
            record: record.clone(),
            etag,
            created: now.clone(),
            updated: now,
        }))
    }

    /// Replaces a record whose etag is still `old_etag`; `Ok(None)` when it changed or vanished.
    async fn update_enrollment_on(
        &self,
        conn: &mut AnyConnection,
        kind: EnrollmentKind,
        record: &ValidEnrollment,
        old: &EnrollmentRow,
    ) -> Result<Option<EnrollmentRow>> {
        let now = now_utc();
        let etag = new_etag();
        let sql = format!(
            "UPDATE {} SET id = $1, doc = $2, sealed_keys = $3, etag = $4, updated = $5, provisioning_status = $6, \
             attestation_type = $7, device_id = $8, iot_hub_host_name = $9, allocation_policy = $10 \
             WHERE id_key = $11 AND etag = $12",
            table(kind)
        );
        let done = sqlx::query(&sql)
            .bind(&record.id)
            .bind(Self::doc_json(record)?)
            .bind(self.sealed_keys(record)?)
            .bind(&etag)
            .bind(&now)
            .bind(status_column(record))
            .bind(record.attestation_type().as_str())
            .bind(record.doc.device_id.clone())
            .bind(hub_column(record))
            .bind(record.doc.allocation_policy.map(|p| p.as_str().to_owned()))
            .bind(record.id.to_ascii_lowercase())
            .bind(&old.etag)
            .execute(&mut *conn)
            .await?;
        Ok((done.rows_affected() == 1).then(|| EnrollmentRow {
            record: record.clone(),
            etag,
            created: old.created.clone(),
            updated: now,
        }))
    }

    /// Creates or replaces one record. `prepare` turns the current record (if any) into the
    /// record to write, so that validation sees the stored secrets; it runs again when
    /// another writer got in between. `if_match` makes the write conditional (412).
    pub async fn put_enrollment<F>(
        &self,
        kind: EnrollmentKind,
        id: &str,
        if_match: Option<&str>,
        prepare: F,
    ) -> std::result::Result<(EnrollmentRow, bool), crate::error::ServiceError>
    where
        F: Fn(
            Option<&ValidEnrollment>,
        ) -> std::result::Result<ValidEnrollment, crate::error::ServiceError>,
    {
        let _gate = self.gate().await;
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        for _ in 0..5 {
            let existing = self.enrollment_on(&mut conn, kind, id).await?;
            if let Some(wanted) = if_match {
                match &existing {
                    Some(row) if etag_matches(wanted, &row.etag) => {}
                    _ => return Err(StoreError::PreconditionFailed(id.to_owned()).into()),
                }
            }
            let record = prepare(existing.as_ref().map(|row| &row.record))?;
            let written = match &existing {
                Some(old) => {
                    self.update_enrollment_on(&mut conn, kind, &record, old)
                        .await?
                }
                None => self.insert_enrollment_on(&mut conn, kind, &record).await?,
            };
            if let Some(row) = written {
                return Ok((row, existing.is_none()));
            }
        }
        Err(StoreError::Conflict(format!("'{id}' is being changed concurrently; try again")).into())
    }

    /// Deletes a record (and, for an individual enrollment, its own registration record).
    pub async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let _gate = self.gate().await;
        let mut tx = self.pool.begin().await?;
        self.delete_enrollment_on(&mut tx, kind, id, if_match)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_enrollment_on(
        &self,
        conn: &mut AnyConnection,
        kind: EnrollmentKind,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let existing = self
            .enrollment_on(conn, kind, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(not_found_kind(kind), id.to_owned()))?;
        if let Some(wanted) = if_match {
            if !etag_matches(wanted, &existing.etag) {
                return Err(StoreError::PreconditionFailed(id.to_owned()));
            }
        }
        let sql = format!(
            "DELETE FROM {} WHERE id_key = $1 AND etag = $2",
            table(kind)
        );
        let done = sqlx::query(&sql)
            .bind(id.to_ascii_lowercase())
            .bind(&existing.etag)
            .execute(&mut *conn)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "'{id}' changed while it was being deleted; try again"
            )));
        }
        // The individual enrollment's own record goes with it; group members keep theirs
        // (REC-05; wire-protocol.md §8.2).
        if kind == EnrollmentKind::Individual {
            sqlx::query("DELETE FROM registrations WHERE id_key = $1 AND group_key IS NULL")
                .bind(id.to_ascii_lowercase())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Applies every write of a bulk operation in one transaction, or none of them. `prepare`
    /// validates an item against the record it replaces. Returns the per-item errors
    /// (index, error); when there are any, nothing was written.
    pub async fn bulk_enrollments<F>(
        &self,
        kind: EnrollmentKind,
        items: Vec<BulkWrite>,
        prepare: F,
    ) -> Result<Vec<(usize, crate::error::ServiceError)>>
    where
        F: Fn(
            &Enrollment,
            Option<&ValidEnrollment>,
        ) -> std::result::Result<ValidEnrollment, crate::error::ServiceError>,
    {
        use crate::error::ServiceError;
        let _gate = self.gate().await;
        let mut tx = self.pool.begin().await?;
        let mut errors = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let outcome: std::result::Result<(), ServiceError> = async {
                match item {
                    BulkWrite::Delete(id, if_match) => {
                        self.delete_enrollment_on(&mut tx, kind, &id, if_match.as_deref())
                            .await?;
                    }
                    BulkWrite::Create(id, input) => {
                        if self.enrollment_on(&mut tx, kind, &id).await?.is_some() {
                            return Err(ServiceError::Conflict(format!("'{id}' already exists")));
                        }
                        let record = prepare(&input, None)?;
                        if self
                            .insert_enrollment_on(&mut tx, kind, &record)
                            .await?
                            .is_none()
                        {
                            return Err(ServiceError::Conflict(format!("'{id}' already exists")));
                        }
                    }
                    BulkWrite::Update(id, input) => {
                        self.bulk_upsert(&mut tx, kind, &id, &input, None, &prepare)
                            .await?;
                    }
                    BulkWrite::UpdateIfMatch(id, input, etag) => {
                        self.bulk_upsert(&mut tx, kind, &id, &input, Some(&etag), &prepare)
                            .await?;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(error) = outcome {
                errors.push((index, error));
            }
        }
        if errors.is_empty() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(errors)
    }

    async fn bulk_upsert<F>(
        &self,
        conn: &mut AnyConnection,
        kind: EnrollmentKind,
        id: &str,
        input: &Enrollment,
        if_match: Option<&str>,
        prepare: &F,
    ) -> std::result::Result<(), crate::error::ServiceError>
    where
        F: Fn(
            &Enrollment,
            Option<&ValidEnrollment>,
        ) -> std::result::Result<ValidEnrollment, crate::error::ServiceError>,
    {
        let existing = self.enrollment_on(conn, kind, id).await?;
        if let Some(wanted) = if_match {
            match &existing {
                Some(row) if etag_matches(wanted, &row.etag) => {}
                _ => return Err(StoreError::PreconditionFailed(id.to_owned()).into()),
            }
        }
        let prepared = prepare(input, existing.as_ref().map(|row| &row.record))?;
        let written = match &existing {
            Some(old) => {
                self.update_enrollment_on(conn, kind, &prepared, old)
                    .await?
            }
            None => self.insert_enrollment_on(conn, kind, &prepared).await?,
        };
        written
            .map(|_| ())
            .ok_or_else(|| StoreError::Conflict(format!("'{id}' changed concurrently")).into())
    }

    /// A page of records matching every `(column, value)` filter, ordered by ID.
    pub async fn query_enrollments(
        &self,
        kind: EnrollmentKind,
        filters: &[(EnrollmentColumn, String)],
        page_size: usize,
        after: Option<&str>,
    ) -> Result<Page<EnrollmentRow>> {
        let mut sql = format!("SELECT * FROM {} WHERE 1 = 1", table(kind));
        let mut values: Vec<String> = Vec::new();
        for (column, value) in filters {
            values.push(if *column == EnrollmentColumn::Id {
                value.to_ascii_lowercase()
            } else {
                value.clone()
            });
            let _ = write!(sql, " AND {} = ${}", column.sql(), values.len());
        }
        if let Some(after) = after {
            values.push(after.to_owned());
            let _ = write!(sql, " AND id_key > ${}", values.len());
        }
        let _ = write!(sql, " ORDER BY id_key LIMIT {}", page_size + 1);
        let mut query = sqlx::query(&sql);
        for value in &values {
            query = query.bind(value.clone());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut items = rows
            .iter()
            .map(|r| self.enrollment_from_row(r))
            .collect::<Result<Vec<_>>>()?;
        let continuation = if items.len() > page_size {
            items.truncate(page_size);
            items.last().map(|row| row.record.id.to_ascii_lowercase())
        } else {
            None
        };
        Ok(Page {
            items,
            continuation,
        })
    }

    // ---- registration records ----------------------------------------------------------

    fn registration_from_row(row: &sqlx::any::AnyRow) -> Result<RegistrationRecord> {
        let doc: String = row.try_get("doc")?;
        let mut state: RegistrationState =
            serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        state.etag = Some(row.try_get("etag")?);
        Ok(RegistrationRecord {
            state,
            enrollment_group_id: row.try_get("group_key")?,
        })
    }

    pub async fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>> {
        let row = sqlx::query("SELECT * FROM registrations WHERE id_key = $1")
            .bind(id.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Self::registration_from_row(&r)).transpose()
    }

    /// Writes (creates or replaces) a device's registration record; device registration
    /// is its writer (REC-09: one record per registration ID).
    pub async fn put_registration(&self, record: &RegistrationRecord) -> Result<String> {
        let _gate = self.gate().await;
        let mut conn = self.pool.acquire().await?;
        Self::put_registration_on(&mut conn, record).await
    }

    /// Creates or replaces a record; `createdDateTimeUtc` of an existing record is kept.
    async fn put_registration_on(
        conn: &mut AnyConnection,
        record: &RegistrationRecord,
    ) -> Result<String> {
        let etag = new_etag();
        let mut state = record.state.clone();
        state.etag = None;
        let now = now_utc();
        let created = state
            .created_date_time_utc
            .clone()
            .unwrap_or_else(|| now.clone());
        let doc = serde_json::to_string(&state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO registrations (id_key, id, group_key, doc, etag, created, updated, status, assigned_hub, device_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (id_key) DO UPDATE SET id = excluded.id, group_key = excluded.group_key, doc = excluded.doc, \
             etag = excluded.etag, updated = excluded.updated, status = excluded.status, \
             assigned_hub = excluded.assigned_hub, device_id = excluded.device_id",
        )
        .bind(state.registration_id.to_ascii_lowercase())
        .bind(&state.registration_id)
        .bind(record.enrollment_group_id.as_ref().map(|g| g.to_ascii_lowercase()))
        .bind(doc)
        .bind(&etag)
        .bind(&created)
        .bind(&now)
        .bind(&state.status)
        .bind(state.assigned_hub.clone())
        .bind(state.device_id.clone())
        .execute(&mut *conn)
        .await?;
        Ok(etag)
    }

    pub async fn delete_registration(&self, id: &str, if_match: Option<&str>) -> Result<()> {
        let _gate = self.gate().await;
        let existing = self
            .registration(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(NotFoundKind::Registration, id.to_owned()))?;
        let etag = existing.state.etag.unwrap_or_default();
        if let Some(wanted) = if_match {
            if !etag_matches(wanted, &etag) {
                return Err(StoreError::PreconditionFailed(id.to_owned()));
            }
        }
        let done = sqlx::query("DELETE FROM registrations WHERE id_key = $1 AND etag = $2")
            .bind(id.to_ascii_lowercase())
            .bind(&etag)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "'{id}' changed while it was being deleted; try again"
            )));
        }
        Ok(())
    }

    /// A page of the records of devices that registered through `group_id`.
    pub async fn query_registrations(
        &self,
        group_id: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<Page<RegistrationRecord>> {
        let sql = format!(
            "SELECT * FROM registrations WHERE group_key = $1 AND id_key > $2 ORDER BY id_key LIMIT {}",
            page_size + 1
        );
        let rows = sqlx::query(&sql)
            .bind(group_id.to_ascii_lowercase())
            .bind(after.unwrap_or(""))
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows
            .iter()
            .map(Self::registration_from_row)
            .collect::<Result<Vec<_>>>()?;
        let continuation = if items.len() > page_size {
            items.truncate(page_size);
            items
                .last()
                .map(|r| r.state.registration_id.to_ascii_lowercase())
        } else {
            None
        };
        Ok(Page {
            items,
            continuation,
        })
    }

    // ---- linked hubs -------------------------------------------------------------------

    fn hub_from_row(&self, row: &sqlx::any::AnyRow) -> Result<LinkedHubRow> {
        let connection_string = row
            .try_get::<Option<String>, _>("sealed_connection_string")?
            .map(|sealed| self.sealer.open(&sealed))
            .transpose()?;
        Ok(LinkedHubRow {
            hub: LinkedHub {
                name: row.try_get("name")?,
                connection_string,
                allocation_weight: row.try_get("allocation_weight")?,
                apply_allocation_policy: row.try_get::<i64, _>("apply_allocation_policy")? != 0,
                location: row.try_get("location")?,
            },
            etag: row.try_get("etag")?,
            created: row.try_get("created")?,
            updated: row.try_get("updated")?,
        })
    }

    pub async fn linked_hubs(&self) -> Result<Vec<LinkedHubRow>> {
        let rows = sqlx::query("SELECT * FROM linked_hubs ORDER BY name_key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| self.hub_from_row(r)).collect()
    }

    pub async fn linked_hub(&self, name: &str) -> Result<Option<LinkedHubRow>> {
        let row = sqlx::query("SELECT * FROM linked_hubs WHERE name_key = $1")
            .bind(name.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.hub_from_row(&r)).transpose()
    }

    /// Links or updates a hub. With `expected_etag` the write only happens if the stored
    /// etag is unchanged; `None` means the hub must not exist yet. Returns `None` on a race.
    pub async fn put_linked_hub(
        &self,
        hub: &LinkedHub,
        expected_etag: Option<&str>,
        max_hubs: usize,
    ) -> Result<Option<LinkedHubRow>> {
        let _gate = self.gate().await;
        let now = now_utc();
        let etag = new_etag();
        let sealed = hub
            .connection_string
            .as_ref()
            .map(|cs| self.sealer.seal(cs));
        let done = if let Some(old) = expected_etag {
            sqlx::query(
                "UPDATE linked_hubs SET name = $1, sealed_connection_string = $2, allocation_weight = $3, \
                 apply_allocation_policy = $4, location = $5, etag = $6, updated = $7 WHERE name_key = $8 AND etag = $9",
            )
            .bind(&hub.name)
            .bind(sealed)
            .bind(hub.allocation_weight)
            .bind(i64::from(hub.apply_allocation_policy))
            .bind(hub.location.clone())
            .bind(&etag)
            .bind(&now)
            .bind(hub.name.to_ascii_lowercase())
            .bind(old)
            .execute(&self.pool)
            .await?
        } else {
            let count: i64 = sqlx::query("SELECT COUNT(*) FROM linked_hubs")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= max_hubs {
                return Err(StoreError::Conflict(format!(
                    "an instance links at most {max_hubs} hubs"
                )));
            }
            sqlx::query(
                "INSERT INTO linked_hubs (name_key, name, sealed_connection_string, allocation_weight, \
                 apply_allocation_policy, location, etag, created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (name_key) DO NOTHING",
            )
            .bind(hub.name.to_ascii_lowercase())
            .bind(&hub.name)
            .bind(sealed)
            .bind(hub.allocation_weight)
            .bind(i64::from(hub.apply_allocation_policy))
            .bind(hub.location.clone())
            .bind(&etag)
            .bind(&now)
            .bind(&now)
            .execute(&self.pool)
            .await?
        };
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        self.linked_hub(&hub.name).await
    }

    pub async fn delete_linked_hub(&self, name: &str, if_match: Option<&str>) -> Result<()> {
        let _gate = self.gate().await;
        let existing = self
            .linked_hub(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(NotFoundKind::LinkedHub, name.to_owned()))?;
        if let Some(wanted) = if_match {
            if !etag_matches(wanted, &existing.etag) {
                return Err(StoreError::PreconditionFailed(name.to_owned()));
            }
        }
        let done = sqlx::query("DELETE FROM linked_hubs WHERE name_key = $1 AND etag = $2")
            .bind(name.to_ascii_lowercase())
            .bind(&existing.etag)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "hub '{name}' changed while it was being unlinked; try again"
            )));
        }
        Ok(())
    }
}

/// A registration operation: what a device's poll reads, on any node.
#[derive(Debug, Clone)]
pub struct OperationRow {
    pub operation_id: String,
    pub registration_key: String,
    pub status: String,
    /// The request as the provisioning core needs to (re)run it.
    pub request: String,
    /// The final `registrationState`, once the operation finished.
    pub result: Option<String>,
    pub lease_until: i64,
}

/// A device in the `record` hub driver's registry.
#[derive(Debug, Clone)]
pub struct HubDeviceRow {
    pub identity: crate::hubs::driver::DeviceIdentity,
    pub twin: serde_json::Value,
    pub etag: String,
    pub created: String,
    pub updated: String,
}

impl Store {
    // ---- registration operations -------------------------------------------------------

    pub async fn insert_operation(&self, row: &OperationRow) -> Result<()> {
        let row = row.clone();
        let now = now_utc();
        let created_unix = crate::clock::unix_now();
        self.batcher
            .run(Arc::new(move |conn| {
                let (row, now) = (row.clone(), now.clone());
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO operations (operation_id, registration_key, status, request, result, lease_until, created_unix, created, updated) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(row.operation_id)
                    .bind(row.registration_key)
                    .bind(row.status)
                    .bind(row.request)
                    .bind(row.result)
                    .bind(row.lease_until)
                    .bind(created_unix)
                    .bind(now.clone())
                    .bind(now)
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            }))
            .await
    }

    pub async fn operation(&self, operation_id: &str) -> Result<Option<OperationRow>> {
        let row = sqlx::query(
            "SELECT operation_id, registration_key, status, request, result, lease_until FROM operations WHERE operation_id = $1",
        )
        .bind(operation_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(OperationRow {
                operation_id: r.try_get(0)?,
                registration_key: r.try_get(1)?,
                status: r.try_get(2)?,
                request: r.try_get(3)?,
                result: r.try_get(4)?,
                lease_until: r.try_get(5)?,
            })
        })
        .transpose()
    }

    /// Takes over an unfinished operation whose lease ran out (its node died), so that it
    /// is finished by whoever polls it. Returns whether this caller now holds the lease.
    pub async fn claim_operation(
        &self,
        operation_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<bool> {
        let _gate = self.gate().await;
        let done = sqlx::query(
            "UPDATE operations SET lease_until = $1 WHERE operation_id = $2 AND status = 'assigning' AND lease_until < $3",
        )
        .bind(lease_until)
        .bind(operation_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the outcome of an operation and, in the same transaction, the device's
    /// registration record (when there is one to write), so that "assigned" is never
    /// reported without the record. The record's new etag goes into the stored result.
    pub async fn finish_operation(
        &self,
        operation_id: &str,
        state: &RegistrationState,
        record: Option<&RegistrationRecord>,
    ) -> Result<()> {
        let operation_id = operation_id.to_owned();
        let state = state.clone();
        let record = record.cloned();
        self.batcher
            .run(Arc::new(move |conn| {
                let (operation_id, mut state, record) =
                    (operation_id.clone(), state.clone(), record.clone());
                Box::pin(async move {
                    if let Some(record) = &record {
                        state.etag = Some(Self::put_registration_on(conn, record).await?);
                    }
                    let result = serde_json::to_string(&state)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    sqlx::query(
                        "UPDATE operations SET status = $1, result = $2, updated = $3 WHERE operation_id = $4",
                    )
                    .bind(state.status)
                    .bind(result)
                    .bind(now_utc())
                    .bind(operation_id)
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            }))
            .await
    }

    /// Deletes operations older than `max_age_seconds`.
    pub async fn expire_operations(&self, max_age_seconds: i64) -> Result<u64> {
        let _gate = self.gate().await;
        let done = sqlx::query("DELETE FROM operations WHERE created_unix < $1")
            .bind(crate::clock::unix_now() - max_age_seconds)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Enrollment groups with symmetric-key attestation, for finding a device's group.
    pub async fn symmetric_key_groups(&self) -> Result<Vec<EnrollmentRow>> {
        self.groups_attested_by("symmetricKey").await
    }

    /// Enrollment groups with X.509 attestation, for walking a device's chain.
    pub async fn x509_groups(&self) -> Result<Vec<EnrollmentRow>> {
        self.groups_attested_by("x509").await
    }

    async fn groups_attested_by(&self, kind: &str) -> Result<Vec<EnrollmentRow>> {
        let rows = sqlx::query(
            "SELECT * FROM enrollment_groups WHERE attestation_type = $1 ORDER BY id_key",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.enrollment_from_row(r)).collect()
    }

    // ---- TPM keys ------------------------------------------------------------------------

    /// Remembers the key K (Base64) and the blob that delivered it to a TPM device,
    /// replacing the previous ones: every challenge rolls the key.
    pub async fn put_tpm_key(&self, registration_id: &str, key: &str, blob: &str) -> Result<()> {
        let _gate = self.gate().await;
        sqlx::query(
            "INSERT INTO tpm_keys (registration_key, sealed_key, blob, created) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (registration_key) DO UPDATE SET sealed_key = excluded.sealed_key, \
             blob = excluded.blob, created = excluded.created",
        )
        .bind(registration_id.to_ascii_lowercase())
        .bind(self.sealer.seal(key))
        .bind(blob)
        .bind(crate::clock::unix_now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The key K (Base64) and blob last issued to a TPM device.
    pub async fn tpm_key(&self, registration_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT sealed_key, blob FROM tpm_keys WHERE registration_key = $1")
            .bind(registration_id.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let key = self.sealer.open(&r.try_get::<String, _>("sealed_key")?)?;
            Ok((key, r.try_get::<String, _>("blob")?))
        })
        .transpose()
    }

    // ---- the record hub driver's registry ----------------------------------------------

    pub async fn hub_device(&self, hub: &str, device_id: &str) -> Result<Option<HubDeviceRow>> {
        let row = sqlx::query("SELECT * FROM hub_devices WHERE hub_key = $1 AND device_key = $2")
            .bind(hub.to_ascii_lowercase())
            .bind(device_id.to_ascii_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let identity = self
                .sealer
                .open(&r.try_get::<String, _>("sealed_identity")?)?;
            let twin: String = r.try_get("twin")?;
            Ok(HubDeviceRow {
                identity: serde_json::from_str(&identity)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                twin: serde_json::from_str(&twin)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                etag: r.try_get("etag")?,
                created: r.try_get("created")?,
                updated: r.try_get("updated")?,
            })
        })
        .transpose()
    }

    pub async fn hub_upsert_device(
        &self,
        hub: &str,
        identity: &crate::hubs::driver::DeviceIdentity,
    ) -> Result<()> {
        let sealed = self.sealer.seal(
            &serde_json::to_string(identity).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        let hub_key = hub.to_ascii_lowercase();
        let device_id = identity.device_id.clone();
        self.batcher
            .run(Arc::new(move |conn| {
                let (hub_key, device_id, sealed) =
                    (hub_key.clone(), device_id.clone(), sealed.clone());
                Box::pin(async move {
                    let now = now_utc();
                    sqlx::query(
                        "INSERT INTO hub_devices (hub_key, device_key, device_id, sealed_identity, twin, etag, created, updated) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT (hub_key, device_key) DO UPDATE SET device_id = excluded.device_id, \
                         sealed_identity = excluded.sealed_identity, etag = excluded.etag, updated = excluded.updated",
                    )
                    .bind(hub_key)
                    .bind(device_id.to_ascii_lowercase())
                    .bind(device_id)
                    .bind(sealed)
                    .bind(crate::hubs::driver::managed_twin(None).to_string())
                    .bind(new_etag())
                    .bind(now.clone())
                    .bind(now)
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            }))
            .await
    }

    pub async fn hub_twin(&self, hub: &str, device_id: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.hub_device(hub, device_id).await?.map(|row| row.twin))
    }

    pub async fn hub_replace_twin(
        &self,
        hub: &str,
        device_id: &str,
        twin: &serde_json::Value,
    ) -> Result<()> {
        let twin = crate::hubs::driver::managed_twin(Some(twin)).to_string();
        let hub_key = hub.to_ascii_lowercase();
        let device_id = device_id.to_owned();
        self.batcher
            .run(Arc::new(move |conn| {
                let (twin, hub_key, device_id) = (twin.clone(), hub_key.clone(), device_id.clone());
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE hub_devices SET twin = $1, etag = $2, updated = $3 WHERE hub_key = $4 AND device_key = $5",
                    )
                    .bind(twin)
                    .bind(new_etag())
                    .bind(now_utc())
                    .bind(hub_key)
                    .bind(device_id.to_ascii_lowercase())
                    .execute(conn)
                    .await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound(NotFoundKind::Registration, device_id));
                    }
                    Ok(())
                })
            }))
            .await
    }

    pub async fn hub_delete_device(&self, hub: &str, device_id: &str) -> Result<()> {
        let _gate = self.gate().await;
        sqlx::query("DELETE FROM hub_devices WHERE hub_key = $1 AND device_key = $2")
            .bind(hub.to_ascii_lowercase())
            .bind(device_id.to_ascii_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn status_column(record: &ValidEnrollment) -> &'static str {
    record
        .doc
        .provisioning_status
        .map_or("enabled", |s| s.as_str())
}

fn hub_column(record: &ValidEnrollment) -> Option<String> {
    record.doc.iot_hub_host_name.clone()
}
