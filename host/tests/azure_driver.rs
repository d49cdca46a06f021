#![allow(clippy::unwrap_used)]
//! The `azure` hub driver against the fake `IoT` hub (a test double over real HTTPS): what it
//! writes to the registry and twins, and how it retries and fails.

mod fake_hub;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use berth::hubs::azure::AzureDriver;
use berth::hubs::driver::DeviceIdentity;
use fake_hub::FakeHub;
use serde_json::json;

fn driver(hub: &FakeHub) -> AzureDriver {
    AzureDriver::new(Some(hub.ca_pem_path())).unwrap()
}

fn key(byte: u8) -> String {
    BASE64.encode([byte; 32])
}

fn identity(device_id: &str, primary: &str, secondary: &str, iot_edge: bool) -> DeviceIdentity {
    DeviceIdentity {
        device_id: device_id.to_owned(),
        primary_key: Some(primary.to_owned()),
        secondary_key: Some(secondary.to_owned()),
        x509_thumbprint: None,
        iot_edge,
    }
}

fn calls(hub: &FakeHub) -> Vec<(String, String)> {
    hub.calls()
}

fn call(method: &str, path: &str) -> (String, String) {
    (method.to_owned(), path.to_owned())
}

#[tokio::test]
async fn creating_a_new_device_writes_sas_keys_and_iot_edge() {
    let hub = FakeHub::start();
    driver(&hub)
        .upsert_device(
            &hub.connection_string(),
            &identity("dev-1", &key(1), &key(2), true),
        )
        .await
        .unwrap();

    let device = &hub.devices()["dev-1"];
    assert_eq!(device["status"], "enabled");
    assert_eq!(device["authentication"]["type"], "sas");
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        key(1)
    );
    assert_eq!(
        device["authentication"]["symmetricKey"]["secondaryKey"],
        key(2)
    );
    assert_eq!(device["capabilities"]["iotEdge"], true);

    assert_eq!(
        calls(&hub),
        [call("GET", "/devices/dev-1"), call("PUT", "/devices/dev-1")]
    );
    let requests = hub.requests();
    let put = &requests[1];
    assert_eq!(put.if_match, None, "a create must not send If-Match");
    assert_eq!(put.query.as_deref(), Some("api-version=2021-04-12"));
    assert_eq!(put.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        put.body.as_ref().unwrap(),
        &json!({
            "deviceId": "dev-1",
            "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}},
            "capabilities": {"iotEdge": true},
        })
    );
}

#[tokio::test]
async fn updating_an_existing_device_sends_if_match_and_changes_keys() {
    let hub = FakeHub::start();
    let driver = driver(&hub);
    let cs = hub.connection_string();
    driver
        .upsert_device(&cs, &identity("dev-1", &key(1), &key(2), false))
        .await
        .unwrap();
    hub.clear_requests();

    driver
        .upsert_device(&cs, &identity("dev-1", &key(3), &key(4), true))
        .await
        .unwrap();

    let device = &hub.devices()["dev-1"];
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        key(3)
    );
    assert_eq!(
        device["authentication"]["symmetricKey"]["secondaryKey"],
        key(4)
    );
    assert_eq!(device["capabilities"]["iotEdge"], true);
    let requests = hub.requests();
    assert_eq!(
        calls(&hub),
        [call("GET", "/devices/dev-1"), call("PUT", "/devices/dev-1")]
    );
    assert_eq!(requests[1].if_match.as_deref(), Some("\"*\""));
    assert!(requests.iter().all(|r| r.status == 200), "{requests:?}");
}

#[tokio::test]
async fn an_identity_without_keys_is_refused_before_calling_the_hub() {
    let hub = FakeHub::start();
    let identity = DeviceIdentity {
        device_id: "x509-device".to_owned(),
        primary_key: None,
        secondary_key: None,
        x509_thumbprint: None,
        iot_edge: false,
    };
    let error = driver(&hub)
        .upsert_device(&hub.connection_string(), &identity)
        .await
        .unwrap_err();
    assert_eq!(error.status, None);
    assert!(
        error
            .message
            .contains("neither a symmetric key nor a certificate"),
        "{error}"
    );
    assert!(hub.requests().is_empty());
}

#[tokio::test]
async fn an_x509_identity_is_written_self_signed_with_the_leaf_thumbprint() {
    let hub = FakeHub::start();
    let thumbprint = "0123456789ABCDEF".repeat(4);
    let identity = DeviceIdentity {
        device_id: "x509-device".to_owned(),
        primary_key: None,
        secondary_key: None,
        x509_thumbprint: Some(thumbprint.clone()),
        iot_edge: false,
    };
    driver(&hub)
        .upsert_device(&hub.connection_string(), &identity)
        .await
        .unwrap();
    let device = hub.devices()["x509-device"].clone();
    assert_eq!(device["authentication"]["type"], "selfSigned");
    assert_eq!(
        device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        thumbprint
    );
    assert_eq!(
        device["authentication"]["x509Thumbprint"]["secondaryThumbprint"],
        thumbprint
    );
}

#[tokio::test]
async fn replace_twin_then_get_twin_round_trips_tags_and_desired() {
    let hub = FakeHub::start();
    let driver = driver(&hub);
    let cs = hub.connection_string();
    driver
        .upsert_device(&cs, &identity("dev-1", &key(1), &key(2), false))
        .await
        .unwrap();
    let twin = json!({
        "tags": {"site": "north", "floor": 3},
        "properties": {"desired": {"interval": 30, "mode": {"fast": true}}},
    });

    driver.replace_twin(&cs, "dev-1", &twin).await.unwrap();
    let read = driver.get_twin(&cs, "dev-1").await.unwrap();

    assert_eq!(read, Some(twin.clone()));
    let stored = hub.twin("dev-1").unwrap();
    assert_eq!(stored["tags"], twin["tags"]);
    assert_eq!(stored["properties"]["desired"]["interval"], 30);
    assert_eq!(stored["properties"]["desired"]["$version"], 2);
    let put = hub
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.path == "/twins/dev-1")
        .unwrap();
    assert_eq!(put.if_match.as_deref(), Some("\"*\""));
}

#[tokio::test]
async fn get_twin_of_a_device_without_tags_gives_empty_objects() {
    let hub = FakeHub::start();
    let driver = driver(&hub);
    let cs = hub.connection_string();
    driver
        .upsert_device(&cs, &identity("dev-1", &key(1), &key(2), false))
        .await
        .unwrap();
    assert!(hub.twin("dev-1").unwrap().get("tags").is_none());

    let read = driver.get_twin(&cs, "dev-1").await.unwrap();

    assert_eq!(
        read,
        Some(json!({"tags": {}, "properties": {"desired": {}}}))
    );
}

#[tokio::test]
async fn get_twin_of_a_missing_device_is_none() {
    let hub = FakeHub::start();
    let twin = driver(&hub)
        .get_twin(&hub.connection_string(), "nobody")
        .await
        .unwrap();
    assert_eq!(twin, None);
    assert_eq!(calls(&hub), [call("GET", "/twins/nobody")]);
}

#[tokio::test]
async fn replace_twin_of_a_missing_device_fails_with_404() {
    let hub = FakeHub::start();
    let error = driver(&hub)
        .replace_twin(&hub.connection_string(), "nobody", &json!({"tags": {}}))
        .await
        .unwrap_err();
    assert_eq!(error.status, Some(404));
    assert!(error.message.contains("DeviceNotFound"), "{error}");
}

#[tokio::test]
async fn delete_removes_the_device_and_its_twin() {
    let hub = FakeHub::start();
    hub.seed_device("dev-1", &json!({"tags": {"a": 1}}));
    driver(&hub)
        .delete_device(&hub.connection_string(), "dev-1")
        .await
        .unwrap();
    assert!(hub.devices().is_empty());
    assert_eq!(hub.twin("dev-1"), None);
    let requests = hub.requests();
    assert_eq!(calls(&hub), [call("DELETE", "/devices/dev-1")]);
    assert_eq!(requests[0].if_match.as_deref(), Some("\"*\""));
}

#[tokio::test]
async fn delete_of_a_missing_device_is_ok() {
    let hub = FakeHub::start();
    driver(&hub)
        .delete_device(&hub.connection_string(), "nobody")
        .await
        .unwrap();
    assert_eq!(calls(&hub), [call("DELETE", "/devices/nobody")]);
    assert_eq!(hub.requests()[0].status, 404);
}

#[tokio::test]
async fn a_429_then_success_is_retried() {
    let hub = FakeHub::start();
    hub.fail_next(1, 429);
    driver(&hub)
        .upsert_device(
            &hub.connection_string(),
            &identity("dev-1", &key(1), &key(2), false),
        )
        .await
        .unwrap();
    let statuses: Vec<u16> = hub.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 404, 200]);
    assert!(hub.devices().contains_key("dev-1"));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let hub = FakeHub::start();
    hub.fail_next_with_retry_after(1, 503, Some(1));
    let started = Instant::now();
    let twin = driver(&hub)
        .get_twin(&hub.connection_string(), "nobody")
        .await
        .unwrap();
    assert_eq!(twin, None);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(hub.requests().len(), 2);
}

#[tokio::test]
async fn service_unavailable_three_times_then_success_is_retried() {
    let hub = FakeHub::start();
    hub.fail_next(3, 503);
    driver(&hub)
        .delete_device(&hub.connection_string(), "nobody")
        .await
        .unwrap();
    let statuses: Vec<u16> = hub.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 503, 404]);
}

#[tokio::test]
async fn a_503_beyond_the_retry_budget_fails_with_the_hubs_status_and_message() {
    let hub = FakeHub::start();
    hub.fail_next(4, 503);
    let error = driver(&hub)
        .get_twin(&hub.connection_string(), "dev-1")
        .await
        .unwrap_err();
    assert_eq!(error.status, Some(503));
    assert!(
        error.message.contains("ErrorCode:ServiceUnavailable"),
        "{error}"
    );
    assert_eq!(hub.requests().len(), 4, "one try and three retries");
}

#[tokio::test]
async fn a_wrong_key_yields_401_with_the_hubs_message() {
    let hub = FakeHub::start();
    let error = driver(&hub)
        .upsert_device(
            &hub.connection_string_with_key(&key(9)),
            &identity("dev-1", &key(1), &key(2), false),
        )
        .await
        .unwrap_err();
    assert_eq!(error.status, Some(401));
    assert_eq!(error.error_code(), 401_001);
    assert!(
        error
            .message
            .contains("ErrorCode:IotHubUnauthorizedAccess;Unauthorized"),
        "{error}"
    );
    assert_eq!(hub.requests().len(), 1, "a 401 is not retried");
    assert!(hub.devices().is_empty());
    assert!(
        !error.message.contains(&key(9)),
        "the key must not leak: {error}"
    );
}

#[tokio::test]
async fn a_400_is_not_retried() {
    let hub = FakeHub::start();
    hub.fail_next(1, 400);
    let error = driver(&hub)
        .replace_twin(&hub.connection_string(), "dev-1", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(error.status, Some(400));
    assert!(
        error.message.contains("ErrorCode:ArgumentInvalid"),
        "{error}"
    );
    assert_eq!(hub.requests().len(), 1);
}

#[tokio::test]
async fn an_unreachable_hub_fails_without_a_status() {
    let hub = FakeHub::start();
    let host = hub.host().to_owned();
    let cs = hub.connection_string();
    let driver = driver(&hub);
    drop(hub);
    // Give the fake's thread a moment to close its listener.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let error = driver.get_twin(&cs, "dev-1").await.unwrap_err();
    assert_eq!(error.status, None);
    assert!(error.message.contains(&host), "{error}");
}

#[tokio::test]
async fn a_hub_with_an_untrusted_certificate_is_refused() {
    let hub = FakeHub::start();
    let started = Instant::now();
    let error = AzureDriver::new(None)
        .unwrap()
        .get_twin(&hub.connection_string(), "dev-1")
        .await
        .unwrap_err();
    assert_eq!(error.status, None);
    assert!(error.message.contains("certificate"), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a certificate refusal is not retried"
    );
    assert!(hub.requests().is_empty());
}

#[tokio::test]
async fn an_unusable_connection_string_fails_before_calling_the_hub() {
    let hub = FakeHub::start();
    let error = driver(&hub)
        .delete_device(
            &format!("HostName={};SharedAccessKeyName=iothubowner", hub.host()),
            "dev-1",
        )
        .await
        .unwrap_err();
    assert_eq!(error.status, None);
    assert!(error.message.contains("SharedAccessKey"), "{error}");
    assert!(hub.requests().is_empty());
}
