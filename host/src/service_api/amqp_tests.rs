//! The AMQP device transport in process: fe2o3-amqp's own client over an in-memory stream
//! against `protocol::amqp::connection`, with SASL PLAIN (symmetric keys) and without SASL
//! (X.509, the chain handed in as the TLS layer would).

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::tests::{backends, Harness, ID_SCOPE};
use crate::attestation::sas::build_token;
use crate::provisioning::Protocol;

fn token(registration_id: &str, key: &str) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    build_token(
        &format!("{ID_SCOPE}/registrations/{registration_id}"),
        &key,
        Some("registration"),
        crate::clock::unix_now() + 600,
    )
}

/// A server-side connection task on one end of an in-memory stream; the other end returned.
fn serve(h: &Harness, certificates: Option<Vec<Vec<u8>>>) -> tokio::io::DuplexStream {
    let (client, server) = tokio::io::duplex(256 * 1024);
    tokio::spawn(crate::protocol::amqp::connection(
        server,
        h.state.provisioning.clone(),
        Protocol::Amqp,
        None,
        certificates.map(Arc::new),
    ));
    client
}

async fn enroll_symmetric(h: &Harness, id: &str) -> String {
    let (status, reply, _) = h
        .send(
            "PUT",
            "/linkedHubs/hub-amqp.example.net",
            Some(json!({})),
            &[],
        )
        .await;
    assert!(status.is_success(), "{reply}");
    let (status, reply, _) = h
        .send(
            "PUT",
            &format!("/enrollments/{id}"),
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
    assert!(status.is_success(), "{reply}");
    reply["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned()
}

struct Device {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
}

impl Device {
    async fn open(
        stream: tokio::io::DuplexStream,
        sasl: Option<(&str, &str)>,
        address: &str,
    ) -> Result<Self, String> {
        let mut builder = Connection::builder()
            .container_id("test-device")
            .hostname("localhost");
        if let Some((username, password)) = sasl {
            builder = builder.sasl_profile(SaslProfile::Plain {
                username: username.to_owned(),
                password: password.to_owned(),
            });
        }
        let mut connection = builder
            .open_with_stream(stream)
            .await
            .map_err(|e| format!("open: {e}"))?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| format!("begin: {e}"))?;
        let receiver = Receiver::attach(&mut session, "responses", address)
            .await
            .map_err(|e| format!("receiver attach: {e}"))?;
        let sender = Sender::attach(&mut session, "requests", address)
            .await
            .map_err(|e| format!("sender attach: {e}"))?;
        Ok(Self {
            connection,
            session,
            sender,
            receiver,
        })
    }

    /// Sends a request; `Ok(response JSON, retry-after)` or `Err(rejection description)`.
    async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        body: &str,
    ) -> Result<(Json, Option<i32>), String> {
        let mut properties =
            ApplicationProperties::builder().insert("iotdps-operation-type", operation);
        if let Some(id) = operation_id {
            properties = properties.insert("iotdps-operation-id", id);
        }
        let correlation = uuid::Uuid::new_v4().to_string();
        let message = Message::builder()
            .properties(Properties {
                correlation_id: Some(correlation.clone().into()),
                ..Properties::default()
            })
            .application_properties(properties.build())
            .data(body.as_bytes().to_vec())
            .build();
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.sender.send(message))
            .await
            .expect("the request was settled");
        match outcome {
            Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => {}
            Ok(fe2o3_amqp::types::messaging::Outcome::Rejected(rejected)) => {
                return Err(rejected
                    .error
                    .and_then(|e| e.description)
                    .unwrap_or_default())
            }
            Ok(other) => return Err(format!("outcome {other:?}")),
            Err(other) => return Err(format!("send: {other}")),
        }
        let delivery =
            tokio::time::timeout(Duration::from_secs(10), self.receiver.recv::<Body<Value>>())
                .await
                .expect("a response")
                .map_err(|e| format!("recv: {e}"))?;
        self.receiver.accept(&delivery).await.unwrap();
        let message = delivery.message();
        assert_eq!(
            message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.clone()),
            Some(correlation.into()),
            "the correlation id is echoed"
        );
        let retry_after =
            message
                .application_properties
                .as_ref()
                .and_then(|a| match a.0.get("retry-after") {
                    Some(SimpleValue::Int(n)) => Some(*n),
                    _ => None,
                });
        let Body::Data(batch) = delivery.body() else {
            panic!("the response is one data section: {:?}", delivery.body());
        };
        let bytes: Vec<u8> = batch.iter().flat_map(|d| d.0.iter().copied()).collect();
        Ok((serde_json::from_slice(&bytes).unwrap(), retry_after))
    }

    async fn register_to_end(&mut self, id: &str) -> Json {
        let (accepted, retry_after) = self
            .request(
                "iotdps-register",
                None,
                &json!({"registrationId": id}).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(accepted["status"], "assigning", "{accepted}");
        assert_eq!(retry_after, Some(3));
        let operation = accepted["operationId"].as_str().unwrap().to_owned();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (polled, _) = self
                .request("iotdps-get-operationstatus", Some(&operation), "")
                .await
                .unwrap();
            if polled["status"] != "assigning" {
                return polled;
            }
        }
        panic!("the registration of {id} did not finish");
    }

    async fn close(mut self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

#[tokio::test]
async fn a_symmetric_key_device_registers_over_sasl_plain() {
    for h in backends().await {
        let key = enroll_symmetric(&h, "amqp-dev-1").await;
        let address = format!("{ID_SCOPE}/registrations/amqp-dev-1");
        let mut device = Device::open(
            serve(&h, None),
            Some((&address, &token("amqp-dev-1", &key))),
            &address,
        )
        .await
        .unwrap();
        let done = device.register_to_end("amqp-dev-1").await;
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(
            done["registrationState"]["assignedHub"],
            "hub-amqp.example.net"
        );

        // A request over the 96 KB limit: the server's receiving link advertises its
        // max-message-size, so a conforming client refuses to send it.
        let oversized = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iotdps-operation-type", "iotdps-register")
                    .build(),
            )
            .data(vec![b' '; 200 * 1024])
            .build();
        let error = device.sender.send(oversized).await.unwrap_err();
        assert!(
            matches!(error, fe2o3_amqp::link::SendError::MessageSizeExceeded(_)),
            "{error:?}"
        );

        // An unknown operation type is rejected with the DPS error; the connection goes on.
        let refused = device.request("iotdps-bogus", None, "").await.unwrap_err();
        let body: Json = serde_json::from_str(&refused).unwrap();
        assert_eq!(body["errorCode"], 400_004, "{body}");
        let done = device.register_to_end("amqp-dev-1").await;
        assert_eq!(done["status"], "assigned");
        device.close().await;

        // The Java spelling of the address works too.
        let mut device = Device::open(
            serve(&h, None),
            Some((&address, &token("amqp-dev-1", &key))),
            &format!("amqps://localhost/{address}"),
        )
        .await
        .unwrap();
        assert_eq!(
            device.register_to_end("amqp-dev-1").await["status"],
            "assigned"
        );
        device.close().await;
    }
}

#[tokio::test]
async fn bad_credentials_and_addresses_end_only_their_connection() {
    let h = backends().await.into_iter().next().unwrap();
    let key = enroll_symmetric(&h, "amqp-dev-2").await;
    let address = format!("{ID_SCOPE}/registrations/amqp-dev-2");
    // A SAS signed with another key: the SASL outcome is `auth`.
    let wrong = token("amqp-dev-2", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let error = Device::open(serve(&h, None), Some((&address, &wrong)), &address)
        .await
        .err()
        .expect("refused");
    assert!(error.starts_with("open:"), "{error}");

    // Authenticated as amqp-dev-2, attaching for another ID scope: the link is closed.
    let other = "0ne0000FFFF/registrations/amqp-dev-2";
    let error = Device::open(
        serve(&h, None),
        Some((&address, &token("amqp-dev-2", &key))),
        other,
    )
    .await
    .err()
    .expect("refused");
    assert!(error.contains("attach"), "{error}");

    // Garbage after the SASL header, and a protocol header that is not AMQP.
    let mut raw = serve(&h, None);
    raw.write_all(b"AMQP\x03\x01\x00\x00\xff\xff\xff\xffgarbage")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut seen)).await;
    assert!(seen.starts_with(b"AMQP\x03\x01\x00\x00"), "{seen:?}");
    let mut raw = serve(&h, None);
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut seen)).await;
    assert_eq!(
        seen, b"AMQP\x03\x01\x00\x00",
        "the server names the protocol it speaks"
    );

    // The AMQP header without a client certificate: SASL is required.
    let mut raw = serve(&h, None);
    raw.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut seen)).await;
    assert_eq!(seen, b"AMQP\x03\x01\x00\x00");

    // Others still register.
    let mut device = Device::open(
        serve(&h, None),
        Some((&address, &token("amqp-dev-2", &key))),
        &address,
    )
    .await
    .unwrap();
    assert_eq!(
        device.register_to_end("amqp-dev-2").await["status"],
        "assigned"
    );
    device.close().await;
}

#[tokio::test]
async fn an_x509_device_registers_without_sasl_and_a_wrong_name_is_rejected_per_request() {
    let h = backends().await.into_iter().next().unwrap();
    let (status, reply, _) = h
        .send(
            "PUT",
            "/linkedHubs/hub-amqp.example.net",
            Some(json!({})),
            &[],
        )
        .await;
    assert!(status.is_success(), "{reply}");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "amqp-x509-1");
    let certificate = params.self_signed(&key).unwrap();
    let (status, reply, _) = h
        .send(
            "PUT",
            "/enrollments/amqp-x509-1",
            Some(json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": certificate.pem()}}}}})),
            &[],
        )
        .await;
    assert!(status.is_success(), "{reply}");
    let chain = vec![certificate.der().to_vec()];

    let address = format!("{ID_SCOPE}/registrations/amqp-x509-1");
    let mut device = Device::open(serve(&h, Some(chain.clone())), None, &address)
        .await
        .unwrap();
    let done = device.register_to_end("amqp-x509-1").await;
    assert_eq!(done["status"], "assigned", "{done}");
    device.close().await;

    // The certificate names amqp-x509-1, the links another device: the request is rejected.
    let mut device = Device::open(
        serve(&h, Some(chain)),
        None,
        &format!("{ID_SCOPE}/registrations/someone-else"),
    )
    .await
    .unwrap();
    let refused = device
        .request("iotdps-register", None, "{}")
        .await
        .unwrap_err();
    let body: Json = serde_json::from_str(&refused).unwrap();
    assert_eq!(body["errorCode"], 401_002, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("is not the registration ID"),
        "{body}"
    );
    device.close().await;
}
