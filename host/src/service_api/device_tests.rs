//! The device API over HTTPS, in process: register, poll, status lookup, errors,
//! throttling, allocation to the `record` hub registry and reprovisioning.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::tests::{assert_error, backends, Harness, ID_SCOPE};
use crate::attestation::sas::{build_token, derive_device_key};

fn device_token(registration_id: &str, key: &str) -> String {
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

impl Harness {
    async fn link(&self, hub: &str, body: Value) {
        let (status, reply, _) = self
            .send("PUT", &format!("/linkedHubs/{hub}"), Some(body), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }

    async fn enroll(&self, path: &str, body: Value) -> Value {
        let (status, reply, _) = self.send("PUT", path, Some(body), &[]).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        reply
    }

    async fn device(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        self.raw(
            method,
            path,
            body.map(|b| b.to_string()),
            &[("authorization", token)],
            true,
        )
        .await
    }

    /// Registers and polls until the operation finishes; returns the final status body.
    async fn register(&self, registration_id: &str, token: &str, body: Value) -> Value {
        let (status, accepted, headers) = self
            .device(
                "PUT",
                &format!("/{ID_SCOPE}/registrations/{registration_id}/register"),
                token,
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        assert_eq!(accepted["status"], "assigning");
        assert_eq!(
            accepted["registrationState"]["registrationId"],
            registration_id
        );
        assert_eq!(headers.get("retry-after").unwrap(), "3");
        let operation = accepted["operationId"].as_str().unwrap().to_owned();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let (status, polled, _) = self
                .device(
                    "GET",
                    &format!("/{ID_SCOPE}/registrations/{registration_id}/operations/{operation}"),
                    token,
                    None,
                )
                .await;
            if status == StatusCode::OK {
                assert_eq!(polled["operationId"], operation.as_str());
                return polled;
            }
            assert_eq!(status, StatusCode::ACCEPTED, "{polled}");
        }
        panic!("the registration of {registration_id} did not finish");
    }
}

#[tokio::test]
async fn an_individual_device_is_assigned_and_its_hub_identity_written() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({})).await;
        let created = h
            .enroll(
                "/enrollments/dev-1",
                json!({"attestation": {"type": "symmetricKey"}, "deviceId": "Device-One", "iotHubs": ["hub-a.example.net"],
                       "capabilities": {"iotEdge": true},
                       "initialTwin": {"tags": {"site": "north"}, "properties": {"desired": {"interval": 30}}}}),
            )
            .await;
        let key = created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
        let done = h
            .register(
                "dev-1",
                &device_token("dev-1", &key),
                json!({"registrationId": "dev-1", "payload": "{\"model\": \"x\"}"}),
            )
            .await;
        let state = &done["registrationState"];
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(state["assignedHub"], "hub-a.example.net");
        assert_eq!(state["deviceId"], "Device-One");
        assert_eq!(state["substatus"], "initialAssignment");
        assert!(state["etag"].is_string() && state["createdDateTimeUtc"].is_string());
        let device = h
            .state
            .store
            .hub_device("hub-a.example.net", "device-one")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(device.identity.primary_key.as_deref(), Some(key.as_str()));
        assert!(device.identity.iot_edge);
        assert_eq!(
            device.twin,
            json!({"tags": {"site": "north"}, "properties": {"desired": {"interval": 30}}})
        );
        // The service API shows the record, and the device can look it up.
        let (_, record, _) = h.send("GET", "/registrations/dev-1", None, &[]).await;
        assert_eq!(record["assignedHub"], "hub-a.example.net");
        let (status, lookup, _) = h
            .device(
                "POST",
                &format!("/{ID_SCOPE}/registrations/dev-1"),
                &device_token("dev-1", &key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(lookup["deviceId"], "Device-One");
    }
}

#[tokio::test]
async fn a_group_device_uses_its_derived_key_and_a_disabled_entry_blocks_it() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({})).await;
        let group = h
            .enroll(
                "/enrollmentGroups/toasters",
                json!({"attestation": {"type": "symmetricKey"}}),
            )
            .await;
        let group_key = group["attestation"]["symmetricKey"]["secondaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
        let device_key = derive_device_key(&group_key, "toaster-1").unwrap();
        let done = h
            .register(
                "toaster-1",
                &device_token("toaster-1", &device_key),
                json!({}),
            )
            .await;
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(done["registrationState"]["deviceId"], "toaster-1");
        let device = h
            .state
            .store
            .hub_device("hub-a.example.net", "toaster-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            device.identity.secondary_key.as_deref(),
            Some(device_key.as_str())
        );
        let (_, members, _) = h
            .send("POST", "/registrations/toasters/query", None, &[])
            .await;
        assert_eq!(members.as_array().unwrap().len(), 1);

        // A disabled individual entry of any kind blocks one device of the enabled group.
        h.enroll(
            "/enrollments/toaster-2",
            json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"}),
        )
        .await;
        let key_2 = derive_device_key(&group_key, "toaster-2").unwrap();
        let blocked = h
            .register("toaster-2", &device_token("toaster-2", &key_2), json!({}))
            .await;
        assert_eq!(blocked["status"], "disabled");
        assert!(h
            .state
            .store
            .hub_device("hub-a.example.net", "toaster-2")
            .await
            .unwrap()
            .is_none());
        // A disabled group yields disabled too.
        let mut disabled_group = group.clone();
        disabled_group["provisioningStatus"] = json!("disabled");
        h.enroll("/enrollmentGroups/toasters", disabled_group).await;
        let key_3 = derive_device_key(&group_key, "toaster-3").unwrap();
        assert_eq!(
            h.register("toaster-3", &device_token("toaster-3", &key_3), json!({}))
                .await["status"],
            "disabled"
        );
    }
}

#[tokio::test]
async fn bad_device_requests_get_the_dps_error_body() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({})).await;
        let created = h
            .enroll(
                "/enrollments/dev-1",
                json!({"attestation": {"type": "symmetricKey"}}),
            )
            .await;
        let key = created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
        let token = device_token("dev-1", &key);
        let register = format!("/{ID_SCOPE}/registrations/dev-1/register");
        let other_key = crate::model::enrollment::generate_key();
        let (status, body, _) = h
            .device(
                "PUT",
                &register,
                &device_token("dev-1", &other_key),
                Some(json!({})),
            )
            .await;
        assert_error(status, &body, 401, 401_002);
        let (status, body, _) = h
            .device(
                "PUT",
                "/0ne99999999/registrations/dev-1/register",
                &token,
                Some(json!({})),
            )
            .await;
        assert_error(status, &body, 404, 404_206);
        let (status, body, _) = h
            .raw(
                "PUT",
                &register,
                Some("{nope".into()),
                &[("authorization", &token)],
                true,
            )
            .await;
        assert_error(status, &body, 400, 400_001);
        let (status, body, _) = h
            .device(
                "PUT",
                &register,
                &token,
                Some(json!({"registrationId": "dev-2"})),
            )
            .await;
        assert_error(status, &body, 400, 400_004);
        let big = json!({"payload": {"x": "a".repeat(100_000)}});
        let (status, body, _) = h.device("PUT", &register, &token, Some(big)).await;
        assert_error(status, &body, 400, 400_005);
        // A token for another device, and an expired token.
        let (status, body, _) = h
            .device(
                "PUT",
                &register,
                &device_token("dev-2", &key),
                Some(json!({})),
            )
            .await;
        assert_error(status, &body, 401, 401_002);
        let raw_key =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key).unwrap();
        let expired = build_token(
            &format!("{ID_SCOPE}/registrations/dev-1"),
            &raw_key,
            Some("registration"),
            crate::clock::unix_now() - 5,
        );
        let (status, body, _) = h.device("PUT", &register, &expired, Some(json!({}))).await;
        assert_error(status, &body, 401, 401_002);
        // An unknown device.
        let (status, body, _) = h
            .device(
                "PUT",
                &format!("/{ID_SCOPE}/registrations/ghost/register"),
                &device_token("ghost", &key),
                Some(json!({})),
            )
            .await;
        assert_error(status, &body, 401, 401_002);
        // Polling an unknown operation, then polling too fast.
        let poll = format!("/{ID_SCOPE}/registrations/dev-1/operations/4.0000000000000000.nope");
        let (status, body, _) = h.device("GET", &poll, &token, None).await;
        assert_error(status, &body, 404, 404_207);
        for _ in 0..4 {
            h.device("GET", &poll, &token, None).await;
        }
        let (status, body, headers) = h.device("GET", &poll, &token, None).await;
        assert_error(status, &body, 429, 429_001);
        let retry: u32 = headers
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((2..=5).contains(&retry));
        // Nothing refused was written, and the service still serves others.
        assert!(h.state.store.registration("dev-1").await.unwrap().is_none());
        let (status, _, _) = h.send("GET", "/enrollments/dev-1", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn reprovisioning_follows_the_enrollments_policy() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({})).await;
        h.link("hub-b.example.net", json!({})).await;
        for (id, update, migrate) in [
            ("migrate-1", true, true),
            ("reset-1", true, false),
            ("never-1", false, false),
        ] {
            let path = format!("/enrollments/{id}");
            let created = h
                .enroll(
                    &path,
                    json!({"attestation": {"type": "symmetricKey"}, "iotHubs": ["hub-a.example.net"],
                           "initialTwin": {"tags": {"v": 1}},
                           "reprovisionPolicy": {"updateHubAssignment": update, "migrateDeviceData": migrate}}),
                )
                .await;
            let key = created["attestation"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap()
                .to_owned();
            let token = device_token(id, &key);
            let first = h.register(id, &token, json!({})).await;
            assert_eq!(
                first["registrationState"]["assignedHub"],
                "hub-a.example.net"
            );
            // The twin evolves on the hub; then the enrollment moves to hub b.
            let evolved = json!({"tags": {"v": 2}, "properties": {"desired": {"changed": true}}});
            h.state
                .store
                .hub_replace_twin("hub-a.example.net", id, &evolved)
                .await
                .unwrap();
            let mut moved = created.clone();
            moved["iotHubs"] = json!(["hub-b.example.net"]);
            h.enroll(&path, moved).await;
            let second = h.register(id, &token, json!({})).await;
            let state = &second["registrationState"];
            let on_a = h
                .state
                .store
                .hub_device("hub-a.example.net", id)
                .await
                .unwrap();
            let on_b = h
                .state
                .store
                .hub_device("hub-b.example.net", id)
                .await
                .unwrap();
            match id {
                "migrate-1" => {
                    assert_eq!(
                        (state["assignedHub"].as_str(), state["substatus"].as_str()),
                        (Some("hub-b.example.net"), Some("deviceDataMigrated"))
                    );
                    assert!(on_a.is_none(), "the old device is deleted");
                    assert_eq!(on_b.unwrap().twin, evolved, "the current twin moved along");
                }
                "reset-1" => {
                    assert_eq!(
                        (state["assignedHub"].as_str(), state["substatus"].as_str()),
                        (Some("hub-b.example.net"), Some("deviceDataReset"))
                    );
                    assert!(on_a.is_none());
                    assert_eq!(
                        on_b.unwrap().twin,
                        json!({"tags": {"v": 1}, "properties": {"desired": {}}}),
                        "the initial config"
                    );
                }
                _ => {
                    assert_eq!(
                        (state["assignedHub"].as_str(), state["substatus"].as_str()),
                        (
                            Some("hub-a.example.net"),
                            Some("reprovisionedToInitialAssignment")
                        )
                    );
                    assert_eq!(
                        on_a.unwrap().twin,
                        evolved,
                        "never: the device stays with its data"
                    );
                    assert!(on_b.is_none());
                }
            }
            assert_eq!(
                state["createdDateTimeUtc"],
                first["registrationState"]["createdDateTimeUtc"]
            );
        }
    }
}

#[tokio::test]
async fn a_hub_that_is_not_linked_fails_the_registration_with_a_message() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({"applyAllocationPolicy": false}))
            .await;
        let created = h
            .enroll(
                "/enrollments/dev-1",
                json!({"attestation": {"type": "symmetricKey"}}),
            )
            .await;
        let key = created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
        let done = h
            .register("dev-1", &device_token("dev-1", &key), json!({}))
            .await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["registrationState"]["errorCode"], 400_210);
        assert!(done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("applyAllocationPolicy"));
    }
}

mod mqtt_session {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{
        Connect, ConnectReturnCode, Packet, Publish, Subscribe, SubscribeFilter,
        SubscribeReasonCode,
    };
    use rumqttc::mqttbytes::QoS;
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::{backends, device_token, ID_SCOPE};
    use crate::provisioning::Protocol;

    struct Client {
        io: DuplexStream,
        buffer: BytesMut,
    }

    impl Client {
        fn start(provisioning: Arc<crate::provisioning::Provisioning>) -> Self {
            let (io, server) = tokio::io::duplex(256 * 1024);
            tokio::spawn(crate::protocol::mqtt::session(
                server,
                provisioning,
                Protocol::Mqtt,
                None,
                None,
            ));
            Self {
                io,
                buffer: BytesMut::new(),
            }
        }

        async fn send(&mut self, packet: Packet) {
            let mut out = BytesMut::new();
            packet.write(&mut out, usize::MAX).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        /// The next packet, or `None` when the server closed the connection.
        async fn next(&mut self) -> Option<Packet> {
            loop {
                if let Ok(packet) = Packet::read(&mut self.buffer, 1 << 20) {
                    return Some(packet);
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut chunk))
                    .await
                    .unwrap()
                    .unwrap_or(0);
                if n == 0 {
                    return None;
                }
                self.buffer.extend_from_slice(&chunk[..n]);
            }
        }

        async fn connect(&mut self, registration_id: &str, password: &str) -> ConnectReturnCode {
            let mut connect = Connect::new(registration_id);
            connect.keep_alive = 60;
            connect.set_login(format!("{ID_SCOPE}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=test"), password);
            self.send(Packet::Connect(connect)).await;
            match self.next().await {
                Some(Packet::ConnAck(ack)) => {
                    assert!(!ack.session_present);
                    ack.code
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }

        async fn request(
            &mut self,
            topic: &str,
            qos: QoS,
            pkid: u16,
            payload: &[u8],
        ) -> (String, Value) {
            let mut publish = Publish::new(topic, qos, payload.to_vec());
            publish.pkid = pkid;
            self.send(Packet::Publish(publish)).await;
            if qos == QoS::AtLeastOnce {
                match self.next().await {
                    Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, pkid, "PUBACK comes first"),
                    other => panic!("expected PUBACK, got {other:?}"),
                }
            }
            match self.next().await {
                Some(Packet::Publish(response)) => {
                    assert_eq!(response.qos, QoS::AtLeastOnce);
                    (
                        response.topic,
                        serde_json::from_slice(&response.payload).unwrap(),
                    )
                }
                other => panic!("expected the response PUBLISH, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn other_mqtt_versions_get_connack_1() {
        let h = backends().await.into_iter().next().unwrap();
        for level in [3u8, 5u8] {
            let mut client = Client::start(h.state.provisioning.clone());
            // CONNECT "MQTT" level 3 or 5, clean session, keep-alive 60, client id "d".
            let packet = [
                0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x3c, 0x00,
                0x01, b'd',
            ];
            client.io.write_all(&packet).await.unwrap();
            assert!(
                matches!(client.next().await, Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::RefusedProtocolVersion),
                "level {level}"
            );
            assert!(client.next().await.is_none());
        }
    }

    #[tokio::test]
    async fn keep_alive_is_enforced() {
        let h = backends().await.into_iter().next().unwrap();
        let mut client = Client::start(h.state.provisioning.clone());
        let mut connect = Connect::new("sleepy");
        connect.keep_alive = 1;
        connect.set_login(
            format!("{ID_SCOPE}/registrations/sleepy/api-version=2019-03-31"),
            "token",
        );
        client.send(Packet::Connect(connect)).await;
        assert!(matches!(client.next().await, Some(Packet::ConnAck(_))));
        let started = std::time::Instant::now();
        assert!(
            client.next().await.is_none(),
            "silence beyond 1.5 x keep-alive closes the session"
        );
        assert!(started.elapsed() >= Duration::from_millis(1400));
    }

    #[tokio::test]
    async fn a_device_registers_over_an_mqtt_session() {
        for h in backends().await {
            h.link("hub-a.example.net", json!({})).await;
            let created = h
                .enroll(
                    "/enrollments/mqtt-dev",
                    json!({"attestation": {"type": "symmetricKey"}}),
                )
                .await;
            let key = created["attestation"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap()
                .to_owned();
            let mut client = Client::start(h.state.provisioning.clone());
            assert_eq!(
                client
                    .connect("mqtt-dev", &device_token("mqtt-dev", &key))
                    .await,
                ConnectReturnCode::Success
            );
            let mut subscribe = Subscribe::new_many([
                SubscribeFilter::new("$dps/registrations/res/#".to_owned(), QoS::ExactlyOnce),
                SubscribeFilter::new("devices/#".to_owned(), QoS::AtLeastOnce),
            ]);
            subscribe.pkid = 7;
            client.send(Packet::Subscribe(subscribe)).await;
            match client.next().await {
                Some(Packet::SubAck(ack)) => {
                    assert_eq!(ack.pkid, 7);
                    assert_eq!(
                        ack.return_codes,
                        vec![
                            SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            SubscribeReasonCode::Failure
                        ]
                    );
                }
                other => panic!("expected SUBACK, got {other:?}"),
            }
            let (topic, accepted) = client
                .request(
                    "$dps/registrations/PUT/iotdps-register/?$rid=abc",
                    QoS::AtLeastOnce,
                    1,
                    b" ",
                )
                .await;
            assert_eq!(topic, "$dps/registrations/res/202/?$rid=abc&retry-after=3");
            assert_eq!(accepted["status"], "assigning");
            let operation = accepted["operationId"].as_str().unwrap().to_owned();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let poll = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=def&operationId={operation}");
            let (topic, done) = client.request(&poll, QoS::AtMostOnce, 0, b"").await;
            assert_eq!(topic, "$dps/registrations/res/200/?$rid=def");
            assert_eq!(done["status"], "assigned", "{done}");
            assert_eq!(
                done["registrationState"]["assignedHub"],
                "hub-a.example.net"
            );
            // An undocumented topic ends this connection.
            client
                .send(Packet::Publish(Publish::new(
                    "devices/mqtt-dev/messages/events/",
                    QoS::AtMostOnce,
                    b"x".to_vec(),
                )))
                .await;
            assert!(client.next().await.is_none());

            // A wrong key is answered on res/401 with the DPS error body.
            let mut client = Client::start(h.state.provisioning.clone());
            let wrong = device_token("mqtt-dev", &crate::model::enrollment::generate_key());
            assert_eq!(
                client.connect("mqtt-dev", &wrong).await,
                ConnectReturnCode::Success
            );
            let (topic, error) = client
                .request(
                    "$dps/registrations/PUT/iotdps-register/?$rid=1",
                    QoS::AtLeastOnce,
                    1,
                    b"",
                )
                .await;
            assert_eq!(topic, "$dps/registrations/res/401/?$rid=1");
            assert_eq!(error["errorCode"], 401_002);

            // Garbage instead of CONNECT, a ClientId that differs from the username, and a
            // malformed username each end their own connection only.
            let mut garbage = Client::start(h.state.provisioning.clone());
            garbage.io.write_all(&[0xff; 64]).await.unwrap();
            assert!(garbage.next().await.is_none());
            let mut mismatch = Client::start(h.state.provisioning.clone());
            let mut connect = Connect::new("someone-else");
            connect.set_login(
                format!("{ID_SCOPE}/registrations/mqtt-dev/api-version=2019-03-31"),
                "x",
            );
            mismatch.send(Packet::Connect(connect)).await;
            assert!(
                matches!(mismatch.next().await, Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::BadClientId)
            );
            let mut bad_user = Client::start(h.state.provisioning.clone());
            let mut connect = Connect::new("mqtt-dev");
            connect.set_login("not-a-dps-username", "x");
            bad_user.send(Packet::Connect(connect)).await;
            assert!(
                matches!(bad_user.next().await, Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::BadUserNamePassword)
            );
            // An oversized packet ends the connection.
            let mut big = Client::start(h.state.provisioning.clone());
            assert_eq!(
                big.connect("mqtt-dev", &device_token("mqtt-dev", &key))
                    .await,
                ConnectReturnCode::Success
            );
            let huge = vec![b' '; 200 * 1024];
            big.send(Packet::Publish(Publish::new(
                "$dps/registrations/PUT/iotdps-register/?$rid=2",
                QoS::AtMostOnce,
                huge,
            )))
            .await;
            assert!(big.next().await.is_none());
            // The service kept serving: the device's record is there.
            assert!(h
                .state
                .store
                .registration("mqtt-dev")
                .await
                .unwrap()
                .is_some());
        }
    }
}

#[tokio::test]
async fn a_poll_finishes_an_operation_whose_node_died() {
    for h in backends().await {
        h.link("hub-a.example.net", json!({})).await;
        let created = h
            .enroll(
                "/enrollments/orphan-1",
                json!({"attestation": {"type": "symmetricKey"}}),
            )
            .await;
        let key = created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned();
        // What a node leaves behind when it dies after answering 202: an operation still
        // assigning, whose lease has run out.
        let request = json!({"registrationId": "orphan-1", "group": false, "enrollmentId": "orphan-1",
                             "payload": null, "protocol": "Http", "client": null, "apiVersion": "2021-06-01"});
        h.state
            .store
            .insert_operation(&crate::store::OperationRow {
                operation_id: "4.0000000000000000.orphan".to_owned(),
                registration_key: "orphan-1".to_owned(),
                status: "assigning".to_owned(),
                request: request.to_string(),
                result: None,
                lease_until: crate::clock::unix_now() - 10,
            })
            .await
            .unwrap();
        let (status, polled, _) = h
            .device(
                "GET",
                &format!("/{ID_SCOPE}/registrations/orphan-1/operations/4.0000000000000000.orphan"),
                &device_token("orphan-1", &key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{polled}");
        assert_eq!(polled["status"], "assigned");
        assert_eq!(
            polled["registrationState"]["assignedHub"],
            "hub-a.example.net"
        );
        assert!(h
            .state
            .store
            .registration("orphan-1")
            .await
            .unwrap()
            .is_some());
    }
}
