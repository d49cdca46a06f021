//! X.509 device attestation through the router: the chain a TLS handshake would have put into
//! the request extensions, individual and group enrollments, verified CA certificates, the
//! seed's five-device example and the refusals of bad chains.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::tests::{assert_error, backends, Harness, ID_SCOPE};
use super::{app, ClientCertificates};

const HUB: &str = "hub-x.example.net";

struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Issued {
    fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn sha256(&self) -> String {
        use sha2::Digest as _;
        hex::encode_upper(sha2::Sha256::digest(self.cert.der()))
    }
}

fn params(cn: &str, ca: bool, days: (i64, i64)) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(days.0);
    params.not_after = now + time::Duration::days(days.1);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    }
    params
}

fn root(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = params(cn, true, (-1, 365)).self_signed(&key).unwrap();
    Issued { cert, key }
}

fn issue_with(cn: &str, ca: bool, days: (i64, i64), issuer: &Issued) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = params(cn, ca, days)
        .signed_by(&key, &issuer.cert, &issuer.key)
        .unwrap();
    Issued { cert, key }
}

fn issue(cn: &str, ca: bool, issuer: &Issued) -> Issued {
    issue_with(cn, ca, (-1, 365), issuer)
}

fn self_signed_leaf(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = params(cn, false, (-1, 365)).self_signed(&key).unwrap();
    Issued { cert, key }
}

impl Harness {
    async fn put(&self, path: &str, body: Value) -> Value {
        let (status, reply, _) = self.send("PUT", path, Some(body), &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {reply}");
        reply
    }

    /// A device request as the HTTPS listener hands it on: the chain in the extensions and
    /// no Authorization header.
    async fn x509(
        &self,
        method: &str,
        path: &str,
        chain: &[Vec<u8>],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{path}?api-version=2021-06-01"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        request
            .extensions_mut()
            .insert(ClientCertificates(Arc::new(chain.to_vec())));
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

    /// Registers with a certificate chain; the final status body, or the refusal.
    async fn register_x509(&self, id: &str, chain: &[Vec<u8>]) -> (StatusCode, Value) {
        let path = format!("/{ID_SCOPE}/registrations/{id}/register");
        let (status, accepted) = self
            .x509("PUT", &path, chain, Some(json!({"registrationId": id})))
            .await;
        if status != StatusCode::ACCEPTED {
            return (status, accepted);
        }
        let operation = accepted["operationId"].as_str().unwrap().to_owned();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (status, polled) = self
                .x509(
                    "GET",
                    &format!("/{ID_SCOPE}/registrations/{id}/operations/{operation}"),
                    chain,
                    None,
                )
                .await;
            if status != StatusCode::ACCEPTED {
                return (status, polled);
            }
        }
        panic!("the registration of {id} did not finish");
    }

    async fn outcome(&self, id: &str, chain: &[Vec<u8>]) -> String {
        let (status, body) = self.register_x509(id, chain).await;
        if status == StatusCode::OK {
            body["status"].as_str().unwrap().to_owned()
        } else {
            format!("{}", status.as_u16())
        }
    }

    async fn outcomes(&self, devices: &[(String, Vec<Vec<u8>>)]) -> Vec<String> {
        let mut seen = Vec::new();
        for (id, chain) in devices {
            seen.push(self.outcome(id, chain).await);
        }
        seen
    }

    async fn verified_ca(&self, name: &str, ca: &Issued) {
        self.put(
            &format!("/certificates/{name}"),
            json!({"certificate": ca.pem(), "isVerified": true}),
        )
        .await;
    }
}

fn refused_with(status: StatusCode, body: &Value, words: &str) {
    assert_error(status, body, 401, 401_002);
    let message = body["message"].as_str().unwrap_or_default().to_lowercase();
    assert!(message.contains(words), "'{words}' not in {body}");
}

#[tokio::test]
async fn a_self_signed_individual_device_goes_to_the_hub_with_its_thumbprint() {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let leaf = self_signed_leaf("x509-dev-1");
        h.put(
            "/enrollments/x509-dev-1",
            json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem()}}}},
                   "iotHubs": [HUB]}),
        )
        .await;
        let (status, done) = h.register_x509("x509-dev-1", &[leaf.der()]).await;
        assert_eq!(status, StatusCode::OK, "{done}");
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(done["registrationState"]["deviceId"], "x509-dev-1");
        assert!(done["registrationState"]["x509"].is_object(), "{done}");
        let (_, device, _) = h
            .send(
                "GET",
                &format!("/linkedHubs/{HUB}/devices/x509-dev-1"),
                None,
                &[],
            )
            .await;
        assert_eq!(device["authentication"]["type"], "selfSigned", "{device}");
        assert_eq!(
            device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
            leaf.sha256()
        );
        // Another certificate with the same name is not the enrolled one.
        let impostor = self_signed_leaf("x509-dev-1");
        let (status, body) = h.register_x509("x509-dev-1", &[impostor.der()]).await;
        refused_with(status, &body, "neither the primary nor the secondary");
        // A SAS-only request for the same device still needs a token.
        let (status, body, _) = h
            .raw(
                "PUT",
                &format!("/{ID_SCOPE}/registrations/x509-dev-1/register"),
                Some("{}".to_owned()),
                &[],
                true,
            )
            .await;
        assert_error(status, &body, 401, 401_002);
    }
}

#[tokio::test]
async fn primary_and_secondary_certificates_work_side_by_side() {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let old = self_signed_leaf("rolling-1");
        let new = self_signed_leaf("rolling-1");
        let enrollment = |primary: &Issued, secondary: Option<&Issued>| {
            let mut certificates = json!({"primary": {"certificate": primary.pem()}});
            if let Some(secondary) = secondary {
                certificates["secondary"] = json!({"certificate": secondary.pem()});
            }
            json!({"attestation": {"type": "x509", "x509": {"clientCertificates": certificates}}, "iotHubs": [HUB]})
        };
        h.put("/enrollments/rolling-1", enrollment(&old, Some(&new)))
            .await;
        assert_eq!(h.outcome("rolling-1", &[old.der()]).await, "assigned");
        assert_eq!(h.outcome("rolling-1", &[new.der()]).await, "assigned");
        let (_, device, _) = h
            .send(
                "GET",
                &format!("/linkedHubs/{HUB}/devices/rolling-1"),
                None,
                &[],
            )
            .await;
        assert_eq!(
            device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
            new.sha256(),
            "the hub holds the certificate of the latest registration"
        );
        let (_, current, _) = h.send("GET", "/enrollments/rolling-1", None, &[]).await;
        let mut replaced = enrollment(&new, None);
        replaced["etag"] = current["etag"].clone();
        h.put("/enrollments/rolling-1", replaced).await;
        assert_eq!(h.outcome("rolling-1", &[old.der()]).await, "401");
        assert_eq!(h.outcome("rolling-1", &[new.der()]).await, "assigned");
    }
}

/// Seed X509-16: root R (its group enabled), intermediates A and B, devices 1–3 under A and
/// 4–5 under B. Then a disabled group on B, then a disabled individual entry for device 3.
#[tokio::test]
async fn the_seeds_five_device_example() {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let r = root("Root R");
        let a = issue("Intermediate A", true, &r);
        let b = issue("Intermediate B", true, &r);
        let devices: Vec<(String, Vec<Vec<u8>>)> = (1..=5)
            .map(|n| {
                let id = format!("five-device-{n}");
                let issuer = if n <= 3 { &a } else { &b };
                let leaf = issue(&id, false, issuer);
                (id, vec![leaf.der(), issuer.der()])
            })
            .collect();
        h.verified_ca("root-r", &r).await;
        h.put(
            "/enrollmentGroups/root-group",
            json!({"enrollmentGroupId": "root-group", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-r"}}}, "iotHubs": [HUB]}),
        )
        .await;
        let seen = h.outcomes(&devices).await;
        assert_eq!(seen, ["assigned"; 5]);

        h.put(
            "/enrollmentGroups/b-group",
            json!({"enrollmentGroupId": "b-group", "provisioningStatus": "disabled",
                   "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": b.pem()}}}}, "iotHubs": [HUB]}),
        )
        .await;
        let seen = h.outcomes(&devices).await;
        assert_eq!(
            seen,
            ["assigned", "assigned", "assigned", "disabled", "disabled"]
        );

        h.put(
            "/enrollments/five-device-3",
            json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"}, "iotHubs": [HUB]}),
        )
        .await;
        let seen = h.outcomes(&devices).await;
        assert_eq!(
            seen,
            ["assigned", "assigned", "disabled", "disabled", "disabled"]
        );

        let (_, record, _) = h
            .send("GET", "/registrations/five-device-1", None, &[])
            .await;
        assert_eq!(record["status"], "assigned", "{record}");
        let (_, done) = h.register_x509(&devices[0].0, &devices[0].1).await;
        assert_eq!(
            done["registrationState"]["x509"]["enrollmentGroupId"],
            "root-group"
        );
    }
}

#[tokio::test]
async fn a_group_needs_a_verified_ca_and_proof_of_possession_provides_one() {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let r = root("Root P");
        let i = issue("Intermediate P", true, &r);
        let leaf = issue("pop-device", false, &i);
        // The group names the intermediate; the root is uploaded but not verified yet.
        h.put("/certificates/root-p", json!({"certificate": r.pem()}))
            .await;
        h.put(
            "/enrollmentGroups/pop-group",
            json!({"enrollmentGroupId": "pop-group", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": i.pem()}}}}, "iotHubs": [HUB]}),
        )
        .await;
        let chain = [leaf.der(), i.der()];
        let (status, body) = h.register_x509("pop-device", &chain).await;
        refused_with(status, &body, "verified ca certificate");

        let (status, code, _) = h
            .send(
                "POST",
                "/certificates/root-p/generateVerificationCode",
                None,
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{code}");
        let verification_code = code["properties"]["verificationCode"]
            .as_str()
            .unwrap()
            .to_owned();
        let proof = issue(&verification_code, false, &r);
        let (status, verified, _) = h
            .send(
                "POST",
                "/certificates/root-p/verify",
                Some(json!({"certificate": proof.pem()})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{verified}");
        let (status, done) = h.register_x509("pop-device", &chain).await;
        assert_eq!(status, StatusCode::OK, "{done}");
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(done["registrationState"]["deviceId"], "pop-device");
        assert_eq!(
            done["registrationState"]["x509"]["enrollmentGroupId"],
            "pop-group"
        );
        // The device may also send its root.
        let full = [leaf.der(), i.der(), r.der()];
        assert_eq!(h.outcome("pop-device", &full).await, "assigned");
    }
}

#[tokio::test]
async fn bad_chains_are_refused_each_with_its_reason_and_others_still_register() {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let r = root("Root Q");
        let i = issue("Intermediate Q", true, &r);
        h.verified_ca("root-q", &r).await;
        h.put(
            "/enrollmentGroups/q-group",
            json!({"enrollmentGroupId": "q-group", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-q"}}}, "iotHubs": [HUB]}),
        )
        .await;
        let good = issue("good-device", false, &i);
        let good_chain = [good.der(), i.der()];

        let expired = issue_with("expired-device", false, (-30, -1), &i);
        let (status, body) = h
            .register_x509("expired-device", &[expired.der(), i.der()])
            .await;
        refused_with(status, &body, "device certificate");
        refused_with(status, &body, "expired");

        let future = issue_with("future-device", false, (2, 30), &i);
        let (status, body) = h
            .register_x509("future-device", &[future.der(), i.der()])
            .await;
        refused_with(status, &body, "not valid before");

        let old_intermediate = issue_with("Old Intermediate", true, (-30, -1), &r);
        let under_old = issue("orphan-device", false, &old_intermediate);
        let (status, body) = h
            .register_x509("orphan-device", &[under_old.der(), old_intermediate.der()])
            .await;
        refused_with(
            status,
            &body,
            "intermediate certificate 'cn=old intermediate' expired",
        );

        let i2 = issue("Intermediate Q2", true, &i);
        let deep = issue("deep-device", false, &i2);
        let (status, body) = h.register_x509("deep-device", &[deep.der(), i.der()]).await;
        refused_with(status, &body, "intermediate certificate is missing");
        let (status, body) = h
            .register_x509("deep-device", &[deep.der(), i2.der()])
            .await;
        refused_with(status, &body, "missing intermediate");
        assert_eq!(
            h.outcome("deep-device", &[deep.der(), i2.der(), i.der()])
                .await,
            "assigned"
        );

        let stranger = root("Root S");
        h.put(
            "/certificates/root-s",
            json!({"certificate": stranger.pem()}),
        )
        .await;
        h.put(
            "/enrollmentGroups/s-group",
            json!({"enrollmentGroupId": "s-group", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-s"}}}, "iotHubs": [HUB]}),
        )
        .await;
        let unverified = issue("unverified-device", false, &stranger);
        let (status, body) = h
            .register_x509("unverified-device", &[unverified.der()])
            .await;
        refused_with(status, &body, "verified ca certificate");

        let long = "l".repeat(65);
        let long_leaf = issue(&long, false, &i);
        let (status, body) = h
            .register_x509("short-id", &[long_leaf.der(), i.der()])
            .await;
        refused_with(status, &body, "at most 64");

        let (status, body) = h.register_x509("someone-else", &good_chain).await;
        refused_with(status, &body, "is not the registration id");

        let forged = issue("forged-device", false, &root("Root Q"));
        let (status, body) = h
            .register_x509("forged-device", &[forged.der(), r.der()])
            .await;
        refused_with(status, &body, "does not verify");

        let (status, body) = h
            .register_x509("garbage-device", &[b"not a certificate".to_vec()])
            .await;
        refused_with(status, &body, "does not parse");

        assert_eq!(h.outcome("good-device", &good_chain).await, "assigned");
    }
}

#[tokio::test]
async fn a_disabled_individual_entry_of_any_kind_blocks_a_group_device_and_an_enabled_sas_one_refuses_it(
) {
    for h in backends().await {
        h.put(&format!("/linkedHubs/{HUB}"), json!({})).await;
        let r = root("Root D");
        h.verified_ca("root-d", &r).await;
        h.put(
            "/enrollmentGroups/d-group",
            json!({"enrollmentGroupId": "d-group", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root-d"}}}, "iotHubs": [HUB]}),
        )
        .await;
        let leaf = issue("d-device", false, &r);
        h.put(
            "/enrollments/d-device",
            json!({"attestation": {"type": "symmetricKey"}, "iotHubs": [HUB]}),
        )
        .await;
        let (status, body) = h.register_x509("d-device", &[leaf.der(), r.der()]).await;
        refused_with(status, &body, "does not use x.509");
        let (_, current, _) = h.send("GET", "/enrollments/d-device", None, &[]).await;
        let mut disabled = current.clone();
        disabled["provisioningStatus"] = json!("disabled");
        h.put("/enrollments/d-device", disabled).await;
        assert_eq!(
            h.outcome("d-device", &[leaf.der(), r.der()]).await,
            "disabled"
        );
    }
}
