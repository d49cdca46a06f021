//! TPM attestation over HTTPS through the router, server side: the challenge, the SAS token
//! signed with the issued key (read back from the store, standing in for the TPM that would
//! activate the blob; `host/tests/tpm_blob.rs` and the Node conformance tests do that part
//! with a software TPM), the assignment with the key in the hub, and the refusals.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::tests::{assert_error, backends, Harness, ID_SCOPE};
use crate::attestation::sas::build_token;

/// The EK of wire-protocol.md §7.1 (RSA-2048, the SDKs' EK template) and its registration ID.
const EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAopqgkUBwtpr1sCgVJcEZxsJtpmtOAt9K7SjGFe4hsp6DJ/dd2E5UFzBC+Jp8Fzqf5ukRBkqrAgIuAvHRsruIedk1uarJSLhbDpFLHxFd7iDNcYfrvdgVNT2T9zrvkh2y04WuRQg2D5qf0tZF82jeTjR/YJK7uWhaRwWOwZ3b1XD9l6wFOrwK/Ic0PEsjneFXQzL0n9uKyuHmHNz+wHppmOiMAabvnXXEin9ou7/iowY/+YhFm3j7atsVvxMI5HEM3Mq+W4imUuzPxVX7fZH+oWPKP5ofpWBTf+MdttGby1AjGnv8JE69JriOYoZG2/4qbsfv9M7a7NFrBlaW7Rt36w==";
const ID: &str = "6rek5qncnygnkzflohxz4u6zlfly6ktm4klsc7xrbgvesqyllnfa";
const HUB: &str = "hub-tpm.example.net";

/// Another valid RSA-2048 key: the same public area with one modulus byte changed.
fn other_ek() -> String {
    use base64::Engine as _;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(EK)
        .unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x10;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn token(key: &str) -> String {
    use base64::Engine as _;
    build_token(
        &format!("{ID_SCOPE}/registrations/{ID}"),
        &base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap(),
        Some("registration"),
        crate::clock::unix_now() + 600,
    )
}

impl Harness {
    async fn tpm_register(&self, body: &Value, authorization: Option<&str>) -> (StatusCode, Value) {
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let (status, reply, _) = self
            .raw(
                "PUT",
                &format!("/{ID_SCOPE}/registrations/{ID}/register"),
                Some(body.to_string()),
                &headers,
                true,
            )
            .await;
        (status, reply)
    }

    /// Challenge, then register with the issued key and poll to the end.
    async fn tpm_round(&self) -> (Value, String, String) {
        let body =
            json!({"registrationId": ID, "tpm": {"endorsementKey": EK, "storageRootKey": EK}});
        let (status, challenge) = self.tpm_register(&body, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
        assert_eq!(challenge["keyName"], "registration");
        assert!(challenge.get("status").is_none(), "{challenge}");
        let blob = challenge["authenticationKey"].as_str().unwrap().to_owned();
        let (key, stored_blob) = self.state.store.tpm_key(ID).await.unwrap().unwrap();
        assert_eq!(stored_blob, blob);
        let sas = token(&key);
        let (status, accepted) = self.tpm_register(&body, Some(&sas)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let operation = accepted["operationId"].as_str().unwrap().to_owned();
        for _ in 0..40 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let (status, polled, _) = self
                .raw(
                    "GET",
                    &format!("/{ID_SCOPE}/registrations/{ID}/operations/{operation}"),
                    None,
                    &[("authorization", &sas)],
                    false,
                )
                .await;
            if status == StatusCode::OK {
                return (polled, key, blob);
            }
            assert_eq!(status, StatusCode::ACCEPTED, "{polled}");
        }
        panic!("the TPM registration did not finish");
    }
}

async fn enroll(h: &Harness, status: &str) {
    let (code, reply, _) = h
        .send("PUT", &format!("/linkedHubs/{HUB}"), Some(json!({})), &[])
        .await;
    assert!(code.is_success(), "{reply}");
    let (code, reply, _) = h
        .send(
            "PUT",
            &format!("/enrollments/{ID}"),
            Some(json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}, "provisioningStatus": status})),
            &[],
        )
        .await;
    assert!(code.is_success(), "{reply}");
}

#[tokio::test]
async fn a_tpm_device_is_challenged_then_assigned_with_the_issued_key_which_rolls() {
    for h in backends().await {
        enroll(&h, "enabled").await;
        let (done, key, blob) = h.tpm_round().await;
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(
            done["registrationState"]["tpm"]["authenticationKey"],
            blob.as_str()
        );
        let (_, device, _) = h
            .send("GET", &format!("/linkedHubs/{HUB}/devices/{ID}"), None, &[])
            .await;
        assert_eq!(device["authentication"]["type"], "sas", "{device}");
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            key.as_str()
        );

        // Registering again issues a new key, and the hub follows it.
        let (done, second_key, _) = h.tpm_round().await;
        assert_eq!(done["status"], "assigned");
        assert_ne!(second_key, key, "every challenge rolls the key");
        let (_, device, _) = h
            .send("GET", &format!("/linkedHubs/{HUB}/devices/{ID}"), None, &[])
            .await;
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            second_key.as_str()
        );
        // The first key is no longer accepted.
        let body = json!({"registrationId": ID});
        let (status, refused) = h.tpm_register(&body, Some(&token(&key))).await;
        assert_error(status, &refused, 401, 401_002);
    }
}

#[tokio::test]
async fn tpm_refusals_each_say_why() {
    let h = backends().await.into_iter().next().unwrap();
    enroll(&h, "enabled").await;
    // An endorsement key that is not the enrolled one.
    let (status, body) = h
        .tpm_register(
            &json!({"registrationId": ID, "tpm": {"endorsementKey": other_ek(), "storageRootKey": EK}}),
            None,
        )
        .await;
    assert_error(status, &body, 401, 401_002);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not the one enrolled"),
        "{body}"
    );
    // A malformed endorsement key.
    let (status, body) = h
        .tpm_register(
            &json!({"registrationId": ID, "tpm": {"endorsementKey": "AAEC", "storageRootKey": EK}}),
            None,
        )
        .await;
    assert_error(status, &body, 400, 400_004);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("tpm.endorsementKey"),
        "{body}"
    );
    // No storage root key.
    let (status, body) = h
        .tpm_register(
            &json!({"registrationId": ID, "tpm": {"endorsementKey": EK}}),
            None,
        )
        .await;
    assert_error(status, &body, 400, 400_004);
    // An unknown device.
    let (status, body, _) = h
        .raw(
            "PUT",
            &format!("/{ID_SCOPE}/registrations/nobody/register"),
            Some(json!({"registrationId": "nobody", "tpm": {"endorsementKey": EK, "storageRootKey": EK}}).to_string()),
            &[],
            true,
        )
        .await;
    assert_error(status, &body, 401, 401_002);
    // A SAS token before any challenge, then one signed with a key the server did not issue.
    let forged = token("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let (status, body) = h
        .tpm_register(&json!({"registrationId": ID}), Some(&forged))
        .await;
    assert_error(status, &body, 401, 401_002);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no TPM challenge"),
        "{body}"
    );
    let (status, _) = h
        .tpm_register(
            &json!({"registrationId": ID, "tpm": {"endorsementKey": EK, "storageRootKey": EK}}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = h
        .tpm_register(&json!({"registrationId": ID}), Some(&forged))
        .await;
    assert_error(status, &body, 401, 401_002);
    assert!(
        body["message"].as_str().unwrap().contains("key issued"),
        "{body}"
    );
}

#[tokio::test]
async fn a_disabled_tpm_enrollment_yields_disabled_and_mqtt_refuses_tpm() {
    let h = backends().await.into_iter().next().unwrap();
    enroll(&h, "disabled").await;
    let (done, _, _) = h.tpm_round().await;
    assert_eq!(done["status"], "disabled", "{done}");

    let call = crate::provisioning::DeviceCall {
        id_scope: ID_SCOPE,
        registration_id: ID,
        authorization: None,
        protocol: crate::provisioning::Protocol::Mqtt,
        client: None,
        api_version: None,
        certificates: None,
    };
    let body: crate::provisioning::DeviceRegistration =
        serde_json::from_value(json!({"registrationId": ID, "tpm": {"endorsementKey": EK}}))
            .unwrap();
    let error = h.state.provisioning.register(call, body).await.unwrap_err();
    assert_eq!(error.status(), 400);
    assert!(
        error.to_string().contains("not available over MQTT"),
        "{error}"
    );
}
