//! Policy and lookup-table management through the service API, and dry runs.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::app;
use super::tests::{assert_error, backends, Harness};

fn hostile() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/policies/dist/hostile.wasm");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run tests/policies/build.sh", path.display()))
}

impl Harness {
    async fn upload(
        &self,
        name: &str,
        query: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let token = build(self);
        let request = Request::builder()
            .method("PUT")
            .uri(format!("/policies/{name}?api-version=2021-10-01{query}"))
            .header("authorization", token)
            .header("content-type", content_type)
            .body(Body::from(bytes))
            .unwrap();
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn download(&self, path: &str) -> (StatusCode, Vec<u8>) {
        let request = Request::builder()
            .uri(format!("{path}?api-version=2021-10-01"))
            .header("authorization", build(self))
            .body(Body::empty())
            .unwrap();
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        (
            status,
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
    }
}

fn build(h: &Harness) -> String {
    crate::attestation::sas::build_token(
        "localhost:8443",
        &h.owner_key,
        Some(crate::model::access::OWNER_POLICY),
        crate::clock::unix_now() + 600,
    )
}

#[tokio::test]
async fn policies_are_uploaded_versioned_used_and_protected() {
    let bytes = hostile();
    for h in backends().await {
        let (status, first) = h
            .upload(
                "hostile",
                "&timeoutMs=50",
                bytes.clone(),
                "application/wasm",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{first}");
        assert_eq!(first["version"], 1);
        assert_eq!(first["world"], "allocation-policy");
        assert_eq!(first["limits"]["timeoutMs"], 50);
        assert_eq!(first["sha256"], crate::policy::content_hash(&bytes));
        let (_, second) = h
            .upload("hostile", "", bytes.clone(), "application/octet-stream")
            .await;
        assert_eq!(second["version"], 2, "every upload is a new version");
        // Refused uploads.
        let (status, body) = h
            .upload("core", "", b"\0asm\x01\0\0\0".to_vec(), "application/wasm")
            .await;
        assert_error(status, &body, 400, 400_004);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("core WebAssembly module"));
        let (status, body) = h
            .upload(
                "half",
                "",
                bytes[..bytes.len() / 2].to_vec(),
                "application/wasm",
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body) = h.upload("typed", "", bytes.clone(), "text/plain").await;
        assert_error(status, &body, 415, 415_001);
        let (status, body) = h
            .upload("slow", "&timeoutMs=0", bytes.clone(), "application/wasm")
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, body) = h
            .upload("bad%20name!", "", bytes.clone(), "application/wasm")
            .await;
        assert_error(status, &body, 400, 400_004);
        // Download gives the bytes back.
        let (status, downloaded) = h.download("/policies/hostile/content").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(downloaded, bytes);
        // An enrollment binds it (and must name an existing policy).
        let missing = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                             "customAllocationDefinition": {"webhookUrl": "wasm:nothere", "apiVersion": "2021-10-01"}});
        let (status, body, _) = h
            .send("PUT", "/enrollmentGroups/g1", Some(missing), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
        let bound = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                           "policyBinding": {"allocation": "hostile@1", "config": {"x": 1}}});
        let (status, body, _) = h
            .send("PUT", "/enrollmentGroups/g1", Some(bound), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (_, shown, _) = h.send("GET", "/policies/hostile", None, &[]).await;
        assert_eq!(shown["usedBy"], json!(["enrollmentGroups/g1"]));
        assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
        let (status, body, _) = h.send("DELETE", "/policies/hostile", None, &[]).await;
        assert_error(status, &body, 409, 409_201);
        h.send("DELETE", "/enrollmentGroups/g1", None, &[]).await;
        let (status, _, _) = h.send("DELETE", "/policies/hostile", None, &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h.send("GET", "/policies/hostile", None, &[]).await;
        assert_error(status, &body, 404, 404_209);
    }
}

#[tokio::test]
async fn a_dry_run_reports_the_decision_logs_time_and_memory() {
    let bytes = hostile();
    for h in backends().await {
        h.upload(
            "hostile",
            "&timeoutMs=50",
            bytes.clone(),
            "application/wasm",
        )
        .await;
        let request = |id: &str| {
            json!({"enrollment": {"kind": "group", "id": "g"},
                   "device": {"registrationId": id, "attestation": {"kind": "symmetricKey"}, "protocol": "Mqtt"},
                   "linkedHubs": [{"name": "hub-a.example.net"}]})
        };
        let (status, body, _) = h
            .send(
                "POST",
                "/policies/hostile/dryRun",
                Some(request("good-1")),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["decision"]["status"], "assigned");
        assert_eq!(body["decision"]["iotHubHostName"], "hub-a.example.net");
        assert_eq!(body["decision"]["payload"], json!({"ok": true}));
        assert!(body["wallTimeMicros"].as_u64().unwrap() > 0);
        assert!(body["memoryBytes"].as_u64().unwrap() > 0);
        let (_, body, _) = h
            .send(
                "POST",
                "/policies/hostile/dryRun",
                Some(request("loop-1")),
                &[],
            )
            .await;
        assert_eq!(body["decision"]["status"], "failed");
        assert_eq!(body["decision"]["errorCode"], 400_207);
        assert!(body["decision"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("time limit"));
        let (_, body, _) = h
            .send(
                "POST",
                "/policies/hostile/dryRun",
                Some(request("chatty-1")),
                &[],
            )
            .await;
        assert_eq!(body["logsTruncated"], true);
        assert!(!body["logs"].as_array().unwrap().is_empty());
        let (status, body, _) = h
            .send("POST", "/policies/nothere/dryRun", Some(request("x")), &[])
            .await;
        assert_error(status, &body, 404, 404_209);
        let (status, body, _) = h
            .send(
                "POST",
                "/policies/hostile/dryRun",
                Some(json!({"device": {}})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
    }
}

#[tokio::test]
async fn lookup_tables_are_versioned_and_protected_while_granted() {
    for h in backends().await {
        let (status, table, _) = h
            .send(
                "PUT",
                "/lookupTables/tenants",
                Some(json!({"acme": {"hub": "hub-a.example.net"}})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{table}");
        assert_eq!(table["version"], 1);
        let (status, body, _) = h
            .send(
                "PUT",
                "/lookupTables/tenants",
                Some(json!(["not", "an", "object"])),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (_, shown, _) = h.send("GET", "/lookupTables/tenants", None, &[]).await;
        assert_eq!(shown["entries"]["acme"]["hub"], "hub-a.example.net");
        let grant = json!({"attestation": {"type": "symmetricKey"}, "policyBinding": {"lookupTables": ["tenants"]}});
        h.send("PUT", "/enrollments/dev-1", Some(grant), &[]).await;
        let (status, body, _) = h.send("DELETE", "/lookupTables/tenants", None, &[]).await;
        assert_error(status, &body, 409, 409_201);
        let missing = json!({"attestation": {"type": "symmetricKey"}, "policyBinding": {"lookupTables": ["nothere"]}});
        let (status, body, _) = h
            .send("PUT", "/enrollments/dev-2", Some(missing), &[])
            .await;
        assert_error(status, &body, 400, 400_004);
    }
}
