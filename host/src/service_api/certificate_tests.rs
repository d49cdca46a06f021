//! CA certificates: upload, proof of possession, quota, `ETags`.

use axum::http::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
use serde_json::json;

use super::tests::{assert_error, backends};

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap(), key)
}

fn leaf(cn: &str, issuer: &rcgen::Certificate, issuer_key: &KeyPair) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.signed_by(&key, issuer, issuer_key).unwrap().pem()
}

#[tokio::test]
async fn a_ca_is_verified_by_proof_of_possession() {
    let (root, root_key) = ca("Contoso Root");
    let (other, other_key) = ca("Someone Else");
    for h in backends().await {
        let (status, uploaded, _) = h
            .send(
                "PUT",
                "/certificates/contoso-root",
                Some(json!({"certificate": root.pem()})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{uploaded}");
        assert_eq!(uploaded["properties"]["isVerified"], false);
        assert_eq!(uploaded["info"]["subjectName"], "CN=Contoso Root");
        assert!(
            uploaded["info"]["notAfterUtc"].is_string()
                && uploaded["info"]["sha256Thumbprint"].is_string()
        );
        // Verifying before a code exists is refused.
        let (status, body, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf("x", &root, &root_key)})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let (status, coded, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/generateVerificationCode",
                None,
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{coded}");
        let code = coded["properties"]["verificationCode"]
            .as_str()
            .unwrap()
            .to_owned();
        // Wrong CN, wrong signer, stale etag: each refused with its own message.
        let (status, body, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf("not-the-code", &root, &root_key)})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("not the verification code"));
        let (status, body, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf(&code, &other, &other_key)})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("not signed by this CA's key"));
        let stale = uploaded["etag"].as_str().unwrap();
        let (status, body, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf(&code, &root, &root_key)})),
                &[("if-match", stale)],
            )
            .await;
        assert_error(status, &body, 412, 412_001);
        let (status, verified, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf(&code, &root, &root_key)})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{verified}");
        assert_eq!(verified["properties"]["isVerified"], true);
        // The code is spent.
        let (status, _, _) = h
            .send(
                "POST",
                "/certificates/contoso-root/verify",
                Some(json!({"certificate": leaf(&code, &root, &root_key)})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (_, listed, _) = h.send("GET", "/certificates", None, &[]).await;
        assert_eq!(listed["value"].as_array().unwrap().len(), 1);
        let (status, _, _) = h
            .send("DELETE", "/certificates/contoso-root", None, &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body, _) = h.send("GET", "/certificates/contoso-root", None, &[]).await;
        assert_error(status, &body, 404, 404_211);
    }
}

#[tokio::test]
async fn uploads_refuse_leaves_garbage_and_more_than_the_quota() {
    let (root, root_key) = ca("Root");
    for h in backends().await {
        let (status, body, _) = h
            .send(
                "PUT",
                "/certificates/leaf",
                Some(json!({"certificate": leaf("device-1", &root, &root_key)})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("not a CA certificate"));
        let (status, body, _) = h
            .send(
                "PUT",
                "/certificates/junk",
                Some(json!({"certificate": "not a certificate"})),
                &[],
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        // Marked verified on upload, as Azure allows.
        let (_, uploaded, _) = h
            .send(
                "PUT",
                "/certificates/ca-0",
                Some(json!({"certificate": root.pem(), "isVerified": true})),
                &[],
            )
            .await;
        assert_eq!(uploaded["properties"]["isVerified"], true);
        for i in 1..3 {
            let (status, _, _) = h
                .send(
                    "PUT",
                    &format!("/certificates/ca-{i}"),
                    Some(json!({"certificate": ca("x").0.pem()})),
                    &[],
                )
                .await;
            assert_eq!(status, StatusCode::OK);
        }
        // The harness sets a quota of 3.
        let (status, body, _) = h
            .send(
                "PUT",
                "/certificates/ca-3",
                Some(json!({"certificate": ca("y").0.pem()})),
                &[],
            )
            .await;
        assert_error(status, &body, 409, 409_201);
        assert!(body["message"].as_str().unwrap().contains("quota"));
        // Replacing an existing one is not blocked by the quota, and unverifies it.
        let (status, replaced, _) = h
            .send(
                "PUT",
                "/certificates/ca-0",
                Some(json!({"certificate": ca("z").0.pem()})),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{replaced}");
        assert_eq!(replaced["properties"]["isVerified"], false);
    }
}
