//! Router tests: the whole service API in process (`app()` + `oneshot`), on SQLite and, when
//! `BERTH_TEST_POSTGRES_URL` is set, on PostgreSQL too.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::{app, Audience, ServiceState};
use crate::attestation::sas::build_token;
use crate::model::access::{generate_policy_key, AccessPolicy, Rights, OWNER_POLICY};
use crate::model::registration::{RegistrationRecord, RegistrationState};
use crate::store::{Sealer, Store};
use crate::telemetry::metrics::Metrics;

const HOST: &str = "localhost:8443";
pub(crate) const ID_SCOPE: &str = "0ne0000ABCD";

pub(super) struct Harness {
    pub(super) state: Arc<ServiceState>,
    pub(super) owner_key: Vec<u8>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh, empty store on every configured backend.
pub(super) async fn backends() -> Vec<Harness> {
    let mut stores = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    stores.push((
        Store::open(&url, Sealer::new(&[1u8; 32])).await.unwrap(),
        Some(dir),
    ));
    if let Ok(base) = std::env::var("BERTH_TEST_POSTGRES_URL") {
        stores.push((
            Store::open(&fresh_postgres(&base).await, Sealer::new(&[1u8; 32]))
                .await
                .unwrap(),
            None,
        ));
    }
    let mut out = Vec::new();
    for (store, dir) in stores {
        let key = generate_policy_key();
        store
            .insert_access_policy(&AccessPolicy {
                name: OWNER_POLICY.to_owned(),
                rights: Rights::owner(),
                primary_key: key.clone(),
                secondary_key: generate_policy_key(),
            })
            .await
            .unwrap();
        let owner_key = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let drivers = crate::hubs::driver::HubDrivers::new(
            store.clone(),
            crate::hubs::azure::AzureDriver::new(None).unwrap(),
        );
        let custom = Arc::new(crate::provisioning::custom::Custom::new(
            store.clone(),
            shared_policy_engine(),
            crate::allocation::webhook::WebhookClient::new(
                crate::allocation::webhook::WebhookSettings {
                    attempts: 2,
                    initial_interval: std::time::Duration::from_millis(10),
                    interval_step: std::time::Duration::from_millis(10),
                    timeout: std::time::Duration::from_secs(5),
                },
                None,
            )
            .unwrap(),
            metrics.clone(),
        ));
        let provisioning = Arc::new(crate::provisioning::Provisioning::new(
            store.clone(),
            drivers,
            ID_SCOPE.to_owned(),
            crate::provisioning::ProvisioningSettings::default(),
            metrics.clone(),
            custom,
        ));
        let state = Arc::new(ServiceState {
            store,
            audience: Audience::new("localhost", 8443),
            metrics,
            provisioning,
            max_ca_certificates: 3,
        });
        out.push(Harness {
            state,
            owner_key,
            _dir: dir,
        });
    }
    out
}

/// One policy engine for every test of the process (an engine reserves its pool up front).
pub(crate) fn shared_policy_engine() -> Arc<crate::policy::PolicyEngine> {
    static ENGINE: std::sync::OnceLock<Arc<crate::policy::PolicyEngine>> =
        std::sync::OnceLock::new();
    ENGINE
        .get_or_init(|| crate::policy::PolicyEngine::new(None).unwrap())
        .clone()
}

/// Creates a new database next to the one `base` names and returns its URL.
pub(crate) async fn fresh_postgres(base: &str) -> String {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let name = format!("berth_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::AnyConnection::connect(base).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

impl Harness {
    fn token(&self) -> String {
        build_token(
            HOST,
            &self.owner_key,
            Some(OWNER_POLICY),
            crate::clock::unix_now() + 3600,
        )
    }

    pub(super) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let token = self.token();
        let mut all: Vec<(&str, &str)> = vec![("authorization", token.as_str())];
        all.extend_from_slice(headers);
        self.raw(method, path, body.map(|b| b.to_string()), &all, true)
            .await
    }

    pub(super) async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
        json_content_type: bool,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{path}?api-version=2021-10-01"));
        if body.is_some() && json_content_type {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap();
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (status, value, headers)
    }
}

/// Asserts a DPS error body with the given status and code.
pub(super) fn assert_error(
    status: StatusCode,
    body: &Value,
    expected_status: u16,
    expected_code: i64,
) {
    assert_eq!(status.as_u16(), expected_status, "body: {body}");
    assert_eq!(
        body["errorCode"].as_i64(),
        Some(expected_code),
        "body: {body}"
    );
    assert!(
        body["trackingId"].as_str().is_some_and(|t| !t.is_empty()),
        "body: {body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
    assert!(
        body["timestampUtc"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "body: {body}"
    );
}

fn symmetric(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey"}})
}

#[tokio::test]
async fn creating_an_enrollment_generates_keys_and_defaults() {
    for h in backends().await {
        let (status, body, _) = h
            .send("PUT", "/enrollments/dev-1", Some(symmetric("dev-1")), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["registrationId"], "dev-1");
        assert_eq!(body["provisioningStatus"], "enabled");
        assert_eq!(body["capabilities"], json!({"iotEdge": false}));
        assert_eq!(
            body["reprovisionPolicy"],
            json!({"updateHubAssignment": true, "migrateDeviceData": true})
        );
        assert!(body["etag"].as_str().is_some_and(|e| e.starts_with('"')));
        assert!(
            body["createdDateTimeUtc"].is_string() && body["lastUpdatedDateTimeUtc"].is_string()
        );
        let key = body["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap()
                .len(),
            64
        );
    }
}

#[tokio::test]
async fn reads_hide_keys_that_attestation_mechanism_returns() {
    for h in backends().await {
        let (_, created, _) = h
            .send("PUT", "/enrollments/dev-1", Some(symmetric("dev-1")), &[])
            .await;
        let (status, body, _) = h.send("GET", "/enrollments/dev-1", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["attestation"]["symmetricKey"], json!({}));
        let (status, mechanism, _) = h
            .send("POST", "/enrollments/dev-1/attestationmechanism", None, &[])
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(mechanism["type"], "symmetricKey");
        assert_eq!(
            mechanism["symmetricKey"],
            created["attestation"]["symmetricKey"]
        );
    }
}

#[tokio::test]
async fn etags_make_updates_and_deletes_conditional() {
    for h in backends().await {
        let (_, created, _) = h
            .send("PUT", "/enrollments/dev-1", Some(symmetric("dev-1")), &[])
            .await;
        let etag = created["etag"].as_str().unwrap().to_owned();
        let mut update = symmetric("dev-1");
        update["provisioningStatus"] = json!("disabled");
        let (status, updated, _) = h
            .send(
                "PUT",
                "/enrollments/dev-1",
                Some(update.clone()),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        assert_ne!(updated["etag"], created["etag"]);
        assert_eq!(updated["createdDateTimeUtc"], created["createdDateTimeUtc"]);
        // Keys survive an update that omits them.
        assert_eq!(
            updated["attestation"]["symmetricKey"],
            created["attestation"]["symmetricKey"]
        );
        let (status, body, _) = h
            .send(
                "PUT",
                "/enrollments/dev-1",
                Some(update.clone()),
                &[("if-match", &etag)],
            )
            .await;
        assert_error(status, &body, 412, 412_001);
        // Unquoted etags (as some SDKs send) match too.
        let bare = updated["etag"]
            .as_str()
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let (status, _, _) = h
            .send(
                "PUT",
                "/enrollments/dev-1",
                Some(update),
                &[("if-match", &bare)],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, body, _) = h
            .send("DELETE", "/enrollments/dev-1", None, &[("if-match", &etag)])
            .await;
        assert_error(status, &body, 412, 412_001);
        let (status, _, _) = h.send("DELETE", "/enrollments/dev-1", None, &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h.send("GET", "/enrollments/dev-1", None, &[]).await;
        assert_error(status, &body, 404, 404_201);
    }
}

#[tokio::test]
async fn bad_inputs_get_the_dps_error_body() {
    for h in backends().await {
        let token = h.token();
        let auth = [("authorization", token.as_str())];
        let (status, body, headers) = h
            .raw(
                "PUT",
                "/enrollments/dev-1",
                Some("{not json".into()),
                &auth,
                true,
            )
            .await;
        assert_error(status, &body, 400, 400_001);
        assert_eq!(headers.get("x-ms-error-code").unwrap(), "400001");
        let (status, body, _) = h
            .raw(
                "PUT",
                "/enrollments/dev-1",
                Some(symmetric("dev-1").to_string()),
                &[auth[0], ("content-type", "text/plain")],
                false,
            )
            .await;
        assert_error(status, &body, 415, 415_001);
        let big = json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}, "optionalDeviceInformation": {"x": "a".repeat(100_000)}});
        let (status, body, _) = h.send("PUT", "/enrollments/dev-1", Some(big), &[]).await;
        assert_error(status, &body, 400, 400_005);
        let (status, body, _) = h
            .send(
                "PUT",
                "/enrollments/bad%20id",
                Some(json!({"attestation": {"type": "symmetricKey"}})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let short = json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}});
        let (status, body, _) = h.send("PUT", "/enrollments/dev-1", Some(short), &[]).await;
        assert_error(status, &body, 400, 400_004);
        let not_base64 =
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "***"}}});
        let (status, body, _) = h
            .send("PUT", "/enrollments/dev-1", Some(not_base64), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
        let certificate = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"}}}}});
        let (status, body, _) = h
            .send("PUT", "/enrollments/dev-1", Some(certificate), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
        let unlinked = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": ["nothere.azure-devices.net"]});
        let (status, body, _) = h
            .send("PUT", "/enrollmentGroups/g1", Some(unlinked), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
        assert!(body["message"].as_str().unwrap().contains("not linked"));
        let wrong_type =
            json!({"attestation": {"type": "symmetricKey"}, "capabilities": {"iotEdge": "yes"}});
        let (status, body, _) = h
            .send("PUT", "/enrollments/dev-1", Some(wrong_type), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body, _) = h.send("GET", "/nothing/here", None, &[]).await;
        assert_error(status, &body, 404, 404_000);
        let (status, body, _) = h.send("PATCH", "/enrollments/dev-1", None, &[]).await;
        assert_error(status, &body, 405, 405_000);
        // Nothing of the refused writes was stored.
        let (status, _, _) = h.send("GET", "/enrollments/dev-1", None, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn sas_tokens_are_checked() {
    for h in backends().await {
        let path = "/enrollments/dev-1";
        let expired = build_token(
            HOST,
            &h.owner_key,
            Some(OWNER_POLICY),
            crate::clock::unix_now() - 10,
        );
        let (status, body, _) = h
            .raw("GET", path, None, &[("authorization", &expired)], false)
            .await;
        assert_error(status, &body, 401, 401_002);
        assert!(body["message"].as_str().unwrap().contains("expired"));
        let wrong_key = build_token(
            HOST,
            b"not the key",
            Some(OWNER_POLICY),
            crate::clock::unix_now() + 60,
        );
        let (status, body, _) = h
            .raw("GET", path, None, &[("authorization", &wrong_key)], false)
            .await;
        assert_error(status, &body, 401, 401_002);
        let wrong_host = build_token(
            "elsewhere.example",
            &h.owner_key,
            Some(OWNER_POLICY),
            crate::clock::unix_now() + 60,
        );
        let (status, body, _) = h
            .raw("GET", path, None, &[("authorization", &wrong_host)], false)
            .await;
        assert_error(status, &body, 401, 401_002);
        let (status, body, _) = h.raw("GET", path, None, &[], false).await;
        assert_error(status, &body, 401, 401_002);
        // A token scoped to a path covers that subtree only.
        let scoped = build_token(
            &format!("{HOST}/enrollments"),
            &h.owner_key,
            Some(OWNER_POLICY),
            crate::clock::unix_now() + 60,
        );
        let (status, _, _) = h
            .raw("GET", path, None, &[("authorization", &scoped)], false)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = h
            .raw(
                "GET",
                "/enrollmentGroups/g",
                None,
                &[("authorization", &scoped)],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn a_policy_lacking_the_right_is_forbidden() {
    for h in backends().await {
        let (status, policy, _) = h
            .send(
                "PUT",
                "/accessPolicies/reader",
                Some(json!({"rights": "EnrollmentRead"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{policy}");
        let key = base64::engine::general_purpose::STANDARD
            .decode(policy["primaryKey"].as_str().unwrap())
            .unwrap();
        let token = build_token(HOST, &key, Some("reader"), crate::clock::unix_now() + 60);
        let auth = [("authorization", token.as_str())];
        let (status, _, _) = h.raw("GET", "/enrollments/x", None, &auth, false).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body, _) = h
            .raw(
                "PUT",
                "/enrollments/x",
                Some(symmetric("x").to_string()),
                &auth,
                true,
            )
            .await;
        assert_error(status, &body, 403, 403_001);
        let (status, body, _) = h.raw("GET", "/linkedHubs", None, &auth, false).await;
        assert_error(status, &body, 403, 403_001);
        let (status, body, _) = h
            .raw("DELETE", "/registrations/x", None, &auth, false)
            .await;
        assert_error(status, &body, 403, 403_001);
    }
}

#[tokio::test]
async fn routes_are_case_insensitive_and_tolerate_a_trailing_slash() {
    for h in backends().await {
        h.send(
            "PUT",
            "/enrollmentGroups/Group-A",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
        for path in [
            "/enrollmentgroups/group-a/attestationmechanism",
            "/ENROLLMENTGROUPS/GROUP-A/AttestationMechanism/",
        ] {
            let (status, body, _) = h.send("POST", path, None, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
        let (status, body, _) = h.send("GET", "/enrollmentGroups/group-a/", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["enrollmentGroupId"], "Group-A",
            "the display ID keeps its case"
        );
        // Case-insensitive uniqueness: a second PUT with other case replaces, not duplicates.
        let (status, _, _) = h
            .send(
                "PUT",
                "/enrollmentGroups/GROUP-A",
                Some(json!({"attestation": {"type": "symmetricKey"}})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (_, all, _) = h
            .send(
                "POST",
                "/enrollmentGroups/query",
                Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
                &[],
            )
            .await;
        assert_eq!(all.as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn queries_page_with_continuation_tokens() {
    for h in backends().await {
        for i in 0..7 {
            let mut e = symmetric(&format!("dev-{i}"));
            if i % 2 == 0 {
                e["provisioningStatus"] = json!("disabled");
            }
            h.send("PUT", &format!("/enrollments/dev-{i}"), Some(e), &[])
                .await;
        }
        let query = json!({"query": "SELECT * FROM enrollments"});
        let mut seen = Vec::new();
        let mut continuation: Option<String> = None;
        for _ in 0..10 {
            let mut headers = vec![("x-ms-max-item-count", "3".to_owned())];
            if let Some(token) = &continuation {
                headers.push(("x-ms-continuation", token.clone()));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, page, response) = h
                .send("POST", "/enrollments/query", Some(query.clone()), &headers)
                .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(response.get("x-ms-item-type").unwrap(), "enrollment");
            let page = page.as_array().unwrap();
            assert!(page.len() <= 3);
            seen.extend(
                page.iter()
                    .map(|e| e["registrationId"].as_str().unwrap().to_owned()),
            );
            continuation = response
                .get("x-ms-continuation")
                .map(|v| v.to_str().unwrap().to_owned());
            if continuation.is_none() {
                break;
            }
        }
        assert_eq!(seen, (0..7).map(|i| format!("dev-{i}")).collect::<Vec<_>>());
        let filtered =
            json!({"query": "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'"});
        let (_, page, response) = h
            .send("POST", "/enrollments/query", Some(filtered), &[])
            .await;
        assert_eq!(page.as_array().unwrap().len(), 4);
        assert!(response.get("x-ms-continuation").is_none());
        let (status, body, _) = h
            .send(
                "POST",
                "/enrollments/query",
                Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body, _) = h
            .send(
                "POST",
                "/enrollments/query",
                Some(query.clone()),
                &[("x-ms-continuation", "%%%")],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, empty, response) = h
            .send(
                "POST",
                "/enrollmentGroups/query",
                Some(json!({"query": "select * from enrollmentGroups"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(empty, json!([]));
        assert_eq!(response.get("x-ms-item-type").unwrap(), "enrollmentGroup");
    }
}

#[tokio::test]
async fn a_failing_bulk_operation_writes_nothing() {
    for h in backends().await {
        h.send("PUT", "/enrollments/dev-2", Some(symmetric("dev-2")), &[])
            .await;
        let batch = json!({"mode": "create", "enrollments": [symmetric("dev-1"), symmetric("dev-2"), symmetric("dev-3")]});
        let (status, result, _) = h.send("POST", "/enrollments", Some(batch), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(result["isSuccessful"], false);
        let errors = result["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["registrationId"], "dev-2");
        assert_eq!(errors[0]["errorCode"], 409_201);
        for id in ["dev-1", "dev-3"] {
            let (status, _, _) = h
                .send("GET", &format!("/enrollments/{id}"), None, &[])
                .await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{id} must not have been written"
            );
        }
        let batch =
            json!({"mode": "create", "enrollments": [symmetric("dev-1"), symmetric("dev-3")]});
        let (_, result, _) = h.send("POST", "/enrollments", Some(batch), &[]).await;
        assert_eq!(result, json!({"isSuccessful": true, "errors": []}));
        let batch = json!({"mode": "delete", "enrollments": [{"registrationId": "dev-1"}, {"registrationId": "dev-3"}]});
        let (_, result, _) = h.send("POST", "/enrollments", Some(batch), &[]).await;
        assert_eq!(result["isSuccessful"], true, "{result}");
        let (status, _, _) = h.send("GET", "/enrollments/dev-3", None, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let groups = json!({"mode": "update", "enrollmentGroups": [{"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey"}}, {"enrollmentGroupId": "g2", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}]});
        let (_, result, _) = h.send("POST", "/enrollmentGroups", Some(groups), &[]).await;
        assert_eq!(result["isSuccessful"], false);
        assert_eq!(result["errors"][0]["enrollmentGroupId"], "g2");
        let (status, _, _) = h.send("GET", "/enrollmentGroups/g1", None, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let too_many = json!({"mode": "create", "enrollments": (0..11).map(|i| symmetric(&format!("d{i}"))).collect::<Vec<_>>()});
        let (status, body, _) = h.send("POST", "/enrollments", Some(too_many), &[]).await;
        assert_error(status, &body, 400, 400_004);
    }
}

#[tokio::test]
async fn registration_records_are_read_queried_and_deleted() {
    for h in backends().await {
        let record = |id: &str, group: Option<&str>| RegistrationRecord {
            state: RegistrationState {
                registration_id: id.to_owned(),
                status: "assigned".to_owned(),
                assigned_hub: Some("hub1.azure-devices.net".to_owned()),
                device_id: Some(id.to_owned()),
                substatus: Some("initialAssignment".to_owned()),
                ..RegistrationState::default()
            },
            enrollment_group_id: group.map(str::to_owned),
        };
        for i in 0..3 {
            h.state
                .store
                .put_registration(&record(&format!("member-{i}"), Some("G1")))
                .await
                .unwrap();
        }
        h.state
            .store
            .put_registration(&record("solo", None))
            .await
            .unwrap();
        let (status, body, _) = h.send("GET", "/registrations/member-1", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["assignedHub"], "hub1.azure-devices.net");
        assert!(body["etag"].is_string());
        let (status, page, headers) = h
            .send(
                "POST",
                "/registrations/g1/query",
                None,
                &[("x-ms-max-item-count", "2")],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page.as_array().unwrap().len(), 2);
        assert_eq!(headers.get("x-ms-item-type").unwrap(), "deviceRegistration");
        assert!(headers.get("x-ms-continuation").is_some());
        let (status, _, _) = h.send("DELETE", "/registrations/member-1", None, &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h.send("GET", "/registrations/member-1", None, &[]).await;
        assert_error(status, &body, 404, 404_203);
        let (status, body, _) = h.send("DELETE", "/registrations/member-1", None, &[]).await;
        assert_error(status, &body, 404, 404_203);
        // An individual enrollment shows its record, and deleting it deletes the record.
        h.send("PUT", "/enrollments/solo", Some(symmetric("solo")), &[])
            .await;
        let (_, body, _) = h.send("GET", "/enrollments/solo", None, &[]).await;
        assert_eq!(body["registrationState"]["status"], "assigned");
        h.send("DELETE", "/enrollments/solo", None, &[]).await;
        assert!(h.state.store.registration("solo").await.unwrap().is_none());
        // Deleting a group keeps its members' records (REC-05).
        h.send(
            "PUT",
            "/enrollmentGroups/G1",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
        h.send("DELETE", "/enrollmentGroups/G1", None, &[]).await;
        assert!(h
            .state
            .store
            .registration("member-0")
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn linked_hubs_mask_keys_and_seal_them_at_rest() {
    for h in backends().await {
        let cs = "HostName=hub1.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0LWtleS12YWx1ZQ==";
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub1.azure-devices.net",
                Some(json!({"connectionString": cs, "location": "west"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["driver"], "azure");
        assert_eq!(body["allocationWeight"], 1);
        assert_eq!(body["applyAllocationPolicy"], true);
        assert!(body["connectionString"]
            .as_str()
            .unwrap()
            .ends_with("SharedAccessKey=*****"));
        let stored = h.state.store.linked_hubs().await.unwrap();
        assert_eq!(stored[0].hub.connection_string.as_deref(), Some(cs));
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub1.azure-devices.net",
                Some(json!({"allocationWeight": 5})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["allocationWeight"], 5);
        assert_eq!(
            body["driver"], "azure",
            "the stored connection string is kept"
        );
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub2.azure-devices.net",
                Some(json!({"connectionString": cs})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub2.azure-devices.net",
                Some(json!({"allocationWeight": 0})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub3.example",
                Some(json!({"weight": 1})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body, _) = h.send("PUT", "/linkedHubs/hub3.example", None, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["driver"], "record");
        let static_group = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": ["HUB3.example"]});
        let (status, body, _) = h
            .send("PUT", "/enrollmentGroups/g", Some(static_group), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (_, list, _) = h.send("GET", "/linkedHubs", None, &[]).await;
        assert_eq!(list.as_array().unwrap().len(), 2);
        let (status, _, _) = h
            .send("DELETE", "/linkedHubs/hub3.example", None, &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h.send("GET", "/linkedHubs/hub3.example", None, &[]).await;
        assert_error(status, &body, 404, 404_204);
    }
}

#[tokio::test]
async fn access_policies_can_be_created_regenerated_and_not_all_removed() {
    for h in backends().await {
        let (status, body, _) = h
            .send(
                "PUT",
                "/accessPolicies/ops",
                Some(json!({"rights": "ServiceConfig, EnrollmentRead"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rights"], "ServiceConfig, EnrollmentRead");
        let (status, regenerated, _) = h
            .send(
                "POST",
                "/accessPolicies/ops/regenerateKey",
                Some(json!({"keyType": "primary"})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(regenerated["primaryKey"], body["primaryKey"]);
        assert_eq!(regenerated["secondaryKey"], body["secondaryKey"]);
        let (status, body, _) = h
            .send(
                "PUT",
                "/accessPolicies/bad",
                Some(json!({"rights": "Everything"})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, _, _) = h.send("DELETE", "/accessPolicies/ops", None, &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h
            .send(
                "DELETE",
                &format!("/accessPolicies/{OWNER_POLICY}"),
                None,
                &[],
            )
            .await;
        assert_error(status, &body, 409, 409_201);
        let (_, list, _) = h.send("GET", "/accessPolicies", None, &[]).await;
        assert_eq!(list.as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn x509_enrollments_return_certificate_info() {
    let mut params = rcgen::CertificateParams::new(vec!["dev-x".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dev-x");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    for h in backends().await {
        let body = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.pem()}}}}});
        let (status, created, _) = h.send("PUT", "/enrollments/dev-x", Some(body), &[]).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        let info = &created["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
        assert_eq!(info["subjectName"], "CN=dev-x");
        assert_eq!(info["version"], 3);
        assert!(
            created["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"]
                .is_null()
        );
        // Sending the read back unchanged keeps the stored certificate.
        let (status, updated, _) = h
            .send("PUT", "/enrollments/dev-x", Some(created.clone()), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        let (_, mechanism, _) = h
            .send("POST", "/enrollments/dev-x/attestationmechanism", None, &[])
            .await;
        assert!(
            mechanism["x509"]["clientCertificates"]["primary"]["certificate"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::open(&url, Sealer::new(&[9u8; 32])).await.unwrap();
    store
        .insert_access_policy(&AccessPolicy {
            name: "p".into(),
            rights: Rights::owner(),
            primary_key: "cHJpbWFyeS1wb2xpY3kta2V5LXZhbHVl".into(),
            secondary_key: generate_policy_key(),
        })
        .await
        .unwrap();
    store.close().await;
    let raw = std::fs::read(dir.path().join("t.db")).unwrap();
    let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
    let needle = b"cHJpbWFyeS1wb2xpY3kta2V5LXZhbHVl";
    assert!(!raw.windows(needle.len()).any(|w| w == needle));
    assert!(!wal.windows(needle.len()).any(|w| w == needle));
    // A different key cannot open the store's secrets.
    let other = Store::open(&url, Sealer::new(&[8u8; 32])).await.unwrap();
    assert!(other.access_policy("p").await.is_err());
}

#[tokio::test]
async fn health_and_metrics_answer_without_auth() {
    for h in backends().await {
        h.send("GET", "/enrollments/none", None, &[]).await;
        let (status, _, _) = h.raw("GET", "/healthz", None, &[], false).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = h.raw("GET", "/readyz", None, &[], false).await;
        assert_eq!(status, StatusCode::OK);
        let response = app(h.state.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let text = String::from_utf8(
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(text.contains("berth_service_operations_total{operation=\"Get\",resource_type=\"IndividualEnrollment\",result_type=\"ClientError\",status=\"404\"} 1"), "{text}");
    }
}

#[tokio::test]
async fn review_fixes_hold() {
    for h in backends().await {
        // Health endpoints answer other methods with the DPS 405 body.
        let (status, body, _) = h.raw("POST", "/healthz", None, &[], false).await;
        assert_error(status, &body, 405, 405_000);
        // A policy read can be sent back; regenerate and delete honour If-Match.
        let (_, policy, _) = h
            .send(
                "PUT",
                "/accessPolicies/ops",
                Some(json!({"rights": "EnrollmentRead"})),
                &[],
            )
            .await;
        let (status, again, _) = h
            .send("PUT", "/accessPolicies/ops", Some(policy.clone()), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        let stale = policy["etag"].as_str().unwrap();
        let (status, body, _) = h
            .send(
                "POST",
                "/accessPolicies/ops/regenerateKey",
                Some(json!({"keyType": "secondary"})),
                &[("if-match", stale)],
            )
            .await;
        assert_error(status, &body, 412, 412_001);
        let (status, body, _) = h
            .send(
                "DELETE",
                "/accessPolicies/ops",
                None,
                &[("if-match", stale)],
            )
            .await;
        assert_error(status, &body, 412, 412_001);
        // A masked connection string keeps the stored key only for the same key name.
        let cs = "HostName=hub1.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0";
        let (_, hub, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub1.azure-devices.net",
                Some(json!({"connectionString": cs})),
                &[],
            )
            .await;
        let (status, _, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub1.azure-devices.net",
                Some(hub.clone()),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let other = "HostName=hub1.azure-devices.net;SharedAccessKeyName=registryRead;SharedAccessKey=*****";
        let (status, body, _) = h
            .send(
                "PUT",
                "/linkedHubs/hub1.azure-devices.net",
                Some(json!({"connectionString": other})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        assert_eq!(
            h.state
                .store
                .linked_hub("hub1.azure-devices.net")
                .await
                .unwrap()
                .unwrap()
                .hub
                .connection_string
                .as_deref(),
            Some(cs)
        );
        // Attestation types are accepted in the .NET spelling too.
        let (status, body, _) = h
            .send(
                "PUT",
                "/enrollments/dev-9",
                Some(json!({"attestation": {"type": "SymmetricKey"}})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["attestation"]["type"], "symmetricKey");
        // A token scoped to an ID covers that ID however the path encodes it.
        h.send(
            "PUT",
            "/enrollments/a:b",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
        let scoped = build_token(
            &format!("{HOST}/enrollments/a:b"),
            &h.owner_key,
            Some(OWNER_POLICY),
            crate::clock::unix_now() + 60,
        );
        let (status, _, _) = h
            .raw(
                "GET",
                "/enrollments/a%3Ab",
                None,
                &[("authorization", &scoped)],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}
