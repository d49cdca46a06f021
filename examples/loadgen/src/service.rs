//! Berth's service API, for the setup of a run and for --verify: linked hubs, enrollment
//! groups, CA certificates, registration records (docs/openapi.yaml).

use std::collections::BTreeMap;

use hyper::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use serde_json::{json, Value};

use crate::http::{self, Endpoint, Pool, Reply};
use crate::outcome::{snippet, Failure};
use crate::sas::ConnectionString;

pub const SERVICE_API_VERSION: &str = "2021-10-01";
/// The hub linked when none is: a `record` hub inside Berth (no connection string).
pub const LOADGEN_HUB: &str = "berth-loadgen-hub.example.net";
/// Records per query page (the most Berth gives).
const PAGE_SIZE: usize = 1000;
/// Query pages read at most: ten million records.
const MAX_PAGES: usize = 10_000;
/// Examples of each kind of mismatch kept for the report.
const MAX_EXAMPLES: usize = 20;

const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{what}: {failure}")]
    Transport { what: String, failure: Failure },
    #[error("{what}: the service API answered {status}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
}

/// A client of the service API over one kept-alive connection.
pub struct Service {
    pool: Pool,
    endpoint: Endpoint,
    connection: ConnectionString,
}

impl Service {
    pub fn new(endpoint: Endpoint, connection: ConnectionString) -> Self {
        Self {
            pool: Pool::new(endpoint.clone()),
            endpoint,
            connection,
        }
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: &[(&'static str, String)],
    ) -> Result<Reply, ServiceError> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{separator}api-version={SERVICE_API_VERSION}");
        let body = body.map(|b| b.to_string().into_bytes());
        let reply = self
            .pool
            .send(|| {
                http::request(
                    method.clone(),
                    &self.endpoint.target,
                    &path,
                    Some(&self.connection.token()),
                    body.clone(),
                    extra,
                )
            })
            .await
            .map_err(|failure| ServiceError::Transport {
                what: what.to_owned(),
                failure,
            })?;
        if (200..300).contains(&reply.status) {
            Ok(reply)
        } else {
            Err(ServiceError::Refused {
                what: what.to_owned(),
                status: reply.status,
                body: snippet(&reply.body),
            })
        }
    }

    fn json(what: &str, reply: &Reply) -> Result<Value, ServiceError> {
        serde_json::from_slice(&reply.body).map_err(|e| ServiceError::Unexpected {
            what: what.to_owned(),
            detail: format!("not JSON ({e}): {}", snippet(&reply.body)),
        })
    }

    /// Links [`LOADGEN_HUB`] when no hub is linked; its name when it did.
    pub async fn ensure_linked_hub(&self) -> Result<Option<String>, ServiceError> {
        let what = "listing the linked hubs";
        let reply = self
            .call(what, Method::GET, "/linkedHubs", None, &[])
            .await?;
        let hubs = Self::json(what, &reply)?;
        if hubs.as_array().is_some_and(|a| !a.is_empty()) {
            return Ok(None);
        }
        self.call(
            "linking a hub",
            Method::PUT,
            &format!("/linkedHubs/{LOADGEN_HUB}"),
            Some(&json!({})),
            &[],
        )
        .await?;
        Ok(Some(LOADGEN_HUB.to_owned()))
    }

    /// Creates or replaces a symmetric-key enrollment group.
    pub async fn put_symmetric_group(
        &self,
        group: &str,
        primary_key: &str,
        secondary_key: &str,
    ) -> Result<(), ServiceError> {
        let body = json!({
            "enrollmentGroupId": group,
            "attestation": {"type": "symmetricKey", "symmetricKey": {
                "primaryKey": primary_key, "secondaryKey": secondary_key}},
        });
        self.call(
            &format!("creating enrollment group '{group}'"),
            Method::PUT,
            &format!("/enrollmentGroups/{}", utf8_percent_encode(group, SEGMENT)),
            Some(&body),
            &[],
        )
        .await
        .map(drop)
    }

    /// Uploads a CA certificate as verified (creates or replaces).
    pub async fn put_verified_ca(&self, name: &str, pem: &str) -> Result<(), ServiceError> {
        self.call(
            &format!("uploading CA certificate '{name}'"),
            Method::PUT,
            &format!("/certificates/{}", utf8_percent_encode(name, SEGMENT)),
            Some(&json!({"certificate": pem, "isVerified": true})),
            &[],
        )
        .await
        .map(drop)
    }

    /// Creates or replaces an X.509 enrollment group that references a CA certificate.
    pub async fn put_x509_group(&self, group: &str, ca_name: &str) -> Result<(), ServiceError> {
        let body = json!({
            "enrollmentGroupId": group,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}},
        });
        self.call(
            &format!("creating enrollment group '{group}'"),
            Method::PUT,
            &format!("/enrollmentGroups/{}", utf8_percent_encode(group, SEGMENT)),
            Some(&body),
            &[],
        )
        .await
        .map(drop)
    }

    /// The registration records of `group` whose ID is `prefix` followed by a device number
    /// below `devices` (this run's devices; `prefix` ends with '-'): lower-cased ID to status,
    /// from every page of the query.
    pub async fn group_records(
        &self,
        group: &str,
        prefix: &str,
        devices: u64,
    ) -> Result<BTreeMap<String, String>, ServiceError> {
        let what = format!("querying the registration records of group '{group}'");
        let path = format!(
            "/registrations/{}/query",
            utf8_percent_encode(group, SEGMENT)
        );
        let prefix = prefix.to_ascii_lowercase();
        let mut records = BTreeMap::new();
        let mut continuation: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut extra = vec![("x-ms-max-item-count", PAGE_SIZE.to_string())];
            if let Some(token) = &continuation {
                extra.push(("x-ms-continuation", token.clone()));
            }
            let reply = self
                .call(
                    &what,
                    Method::POST,
                    &path,
                    Some(&json!({"query": "*"})),
                    &extra,
                )
                .await?;
            let page = Self::json(&what, &reply)?;
            let items = page.as_array().ok_or_else(|| ServiceError::Unexpected {
                what: what.clone(),
                detail: "the page is not a JSON array".to_owned(),
            })?;
            for item in items {
                let id = item
                    .get("registrationId")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let ours = id.strip_prefix(&prefix).is_some_and(|n| {
                    n.len() >= 7
                        && n.bytes().all(|b| b.is_ascii_digit())
                        && n.parse::<u64>().is_ok_and(|n| n < devices)
                });
                if ours {
                    let status = item
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("(none)")
                        .to_owned();
                    records.insert(id, status);
                }
            }
            continuation = reply
                .header("x-ms-continuation")
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if continuation.is_none() {
                return Ok(records);
            }
        }
        Err(ServiceError::Unexpected {
            what,
            detail: format!("more than {MAX_PAGES} pages"),
        })
    }
}

/// What --verify found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub enrollment_group: String,
    /// Devices the run counted as assigned.
    pub assigned_counted: u64,
    /// Records of the group for this run's devices (`{prefix}-{n}`, n below --devices).
    pub records_for_run: u64,
    /// Of those, the records with status `assigned`.
    pub assigned_records: u64,
    /// Counted assigned, but no record.
    pub missing: u64,
    /// Counted assigned, but the record's status is not `assigned`.
    pub not_assigned: u64,
    /// A record of this run that the run did not count as assigned.
    pub uncounted: u64,
    /// Up to 20 examples of each mismatch.
    pub examples: Vec<String>,
    /// No mismatch, and the record count equals the assigned count.
    pub ok: bool,
}

/// Compares the devices counted as assigned with the group's records.
pub fn compare(
    enrollment_group: &str,
    counted: &[String],
    records: &BTreeMap<String, String>,
) -> Verification {
    let mut examples = Vec::new();
    let note = |examples: &mut Vec<String>, text: String| examples.push(text);
    let (mut missing, mut not_assigned) = (0, 0);
    let counted_set: std::collections::BTreeSet<String> =
        counted.iter().map(|id| id.to_ascii_lowercase()).collect();
    for id in &counted_set {
        match records.get(id).map(String::as_str) {
            None => {
                missing += 1;
                if missing <= MAX_EXAMPLES as u64 {
                    note(&mut examples, format!("{id}: counted assigned, no record"));
                }
            }
            Some("assigned") => {}
            Some(status) => {
                not_assigned += 1;
                if not_assigned <= MAX_EXAMPLES as u64 {
                    note(
                        &mut examples,
                        format!("{id}: counted assigned, record says {status}"),
                    );
                }
            }
        }
    }
    let mut uncounted = 0;
    for (id, status) in records {
        if !counted_set.contains(id) {
            uncounted += 1;
            if uncounted <= MAX_EXAMPLES as u64 {
                note(
                    &mut examples,
                    format!("{id}: record says {status}, not counted assigned"),
                );
            }
        }
    }
    let records_for_run = records.len() as u64;
    let assigned_counted = counted_set.len() as u64;
    Verification {
        enrollment_group: enrollment_group.to_owned(),
        assigned_counted,
        records_for_run,
        assigned_records: records.values().filter(|s| *s == "assigned").count() as u64,
        missing,
        not_assigned,
        uncounted,
        examples,
        ok: missing == 0
            && not_assigned == 0
            && uncounted == 0
            && records_for_run == assigned_counted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mismatch_is_counted() {
        let records: BTreeMap<String, String> = [
            ("lg-0000000", "assigned"),
            ("lg-0000001", "failed"),
            ("lg-0000003", "assigned"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        let counted = vec![
            "lg-0000000".to_owned(),
            "lg-0000001".to_owned(),
            "lg-0000002".to_owned(),
        ];
        let found = compare("g", &counted, &records);
        assert_eq!(
            (found.missing, found.not_assigned, found.uncounted),
            (1, 1, 1)
        );
        assert!(!found.ok);
        let all = compare("g", &["lg-0000000".to_owned()], &{
            let mut one = BTreeMap::new();
            one.insert("lg-0000000".to_owned(), "assigned".to_owned());
            one
        });
        assert!(all.ok);
    }
}
