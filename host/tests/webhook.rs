#![allow(clippy::unwrap_used)]
//! The custom allocation webhook client against a fake webhook: the `AllocationRequest` it
//! sends (wire-protocol.md §9.1), and each row of the failure table (§9.3), retries included.

mod fake_webhook;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::allocation::custom::{CustomDecision, CustomFailure, CustomRequest};
use berth::allocation::webhook::{WebhookClient, WebhookSettings};
use berth::hubs::LinkedHub;
use berth::model::enrollment::{Enrollment, EnrollmentKind};
use fake_webhook::{FakeWebhook, Reply, FUNCTION_KEY, PATH};
use serde_json::{json, Value};

const HUB_A: &str = "hub-a.azure-devices.net";
const HUB_B: &str = "hub-b.azure-devices.net";
const SYMMETRIC_KEY: &str = "c2VjcmV0LXByaW1hcnkta2V5LXRoYXQtbXVzdC1ub3QtbGVhaw==";

/// Fast settings: short intervals so retry tests take milliseconds.
fn fast(attempts: u32) -> WebhookSettings {
    WebhookSettings {
        timeout: Duration::from_secs(5),
        attempts,
        initial_interval: Duration::from_millis(10),
        interval_step: Duration::from_millis(20),
    }
}

fn client(settings: WebhookSettings) -> WebhookClient {
    WebhookClient::new(settings, None).unwrap()
}

fn linked_hub(name: &str) -> LinkedHub {
    LinkedHub {
        name: name.to_owned(),
        connection_string: None,
        allocation_weight: 1,
        apply_allocation_policy: true,
        location: None,
    }
}

/// A symmetric-key group enrollment with custom allocation toward `webhook_url`, keys included
/// (the client must strip them).
fn group_enrollment(webhook_url: &str) -> Enrollment {
    serde_json::from_value(json!({
        "enrollmentGroupId": "contoso-custom-allocated-devices",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": SYMMETRIC_KEY, "secondaryKey": SYMMETRIC_KEY},
        },
        "capabilities": {"iotEdge": false},
        "etag": "\"13003fea-0000-0300-0000-62d1d5e50000\"",
        "provisioningStatus": "enabled",
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
        "createdDateTimeUtc": "2022-07-05T21:27:16.8123235Z",
        "lastUpdatedDateTimeUtc": "2022-07-05T21:27:16.8123235Z",
        "allocationPolicy": "custom",
        "iotHubs": [HUB_A, HUB_B],
        "customAllocationDefinition": {"webhookUrl": webhook_url, "apiVersion": "2021-10-01"},
    }))
    .unwrap()
}

fn individual_enrollment(webhook_url: &str) -> Enrollment {
    serde_json::from_value(json!({
        "registrationId": "breakroom499-contoso-tstrsd-007",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": SYMMETRIC_KEY, "secondaryKey": SYMMETRIC_KEY},
        },
        "provisioningStatus": "enabled",
        "allocationPolicy": "custom",
        "iotHubs": [HUB_A, HUB_B],
        "customAllocationDefinition": {"webhookUrl": webhook_url, "apiVersion": "2021-10-01"},
    }))
    .unwrap()
}

/// A first registration of a group device, no payload, both hubs linked.
fn group_request(webhook_url: &str) -> CustomRequest {
    CustomRequest {
        kind: EnrollmentKind::Group,
        enrollment: group_enrollment(webhook_url),
        registration_id: "breakroom499-contoso-tstrsd-007".to_owned(),
        payload: None,
        current_hub: None,
        current_device_id: None,
        protocol: "https".to_owned(),
        certificate: None,
        client_address: Some("127.0.0.1".to_owned()),
        linked_hubs: vec![linked_hub(HUB_A), linked_hub(HUB_B)],
    }
}

async fn allocate(
    webhook: &FakeWebhook,
    settings: WebhookSettings,
) -> Result<CustomDecision, CustomFailure> {
    client(settings)
        .allocate(&webhook.url(), "2021-10-01", &group_request(&webhook.url()))
        .await
}

fn failed(message: &str) -> Result<CustomDecision, CustomFailure> {
    Err(CustomFailure::Failed(message.to_owned()))
}

fn hub_answer(hub: &str) -> Reply {
    Reply::json(200, &json!({"iotHubHostName": hub}))
}

// ---------------------------------------------------------------- the request (§9.1)

#[tokio::test]
async fn group_request_has_exactly_the_allocation_request_shape() {
    let webhook = FakeWebhook::start(vec![hub_answer(HUB_A)]).await;
    allocate(&webhook, fast(1)).await.unwrap();

    let request = webhook.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, PATH);
    assert_eq!(
        request.query.as_deref(),
        Some(format!("code={FUNCTION_KEY}").as_str()),
        "the URL is used verbatim, query string included"
    );
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    let body = request.body.unwrap();
    assert_eq!(
        body,
        json!({
            "enrollmentGroup": {
                "enrollmentGroupId": "contoso-custom-allocated-devices",
                "attestation": {"type": "symmetricKey", "symmetricKey": {}},
                "capabilities": {"iotEdge": false},
                "etag": "\"13003fea-0000-0300-0000-62d1d5e50000\"",
                "provisioningStatus": "enabled",
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
                "createdDateTimeUtc": "2022-07-05T21:27:16.8123235Z",
                "lastUpdatedDateTimeUtc": "2022-07-05T21:27:16.8123235Z",
                "allocationPolicy": "custom",
                "iotHubs": [HUB_A, HUB_B],
                "customAllocationDefinition": {
                    "webhookUrl": webhook.masked_url(),
                    "apiVersion": "2021-10-01",
                },
            },
            "deviceRuntimeContext": {
                "registrationId": "breakroom499-contoso-tstrsd-007",
                "symmetricKey": {},
            },
            "linkedHubs": [HUB_A, HUB_B],
        })
    );
    assert!(
        !request.raw_body.contains(FUNCTION_KEY),
        "the function key is masked in the enrollment copy"
    );
    assert!(
        !request.raw_body.contains(SYMMETRIC_KEY),
        "the symmetric keys are stripped"
    );
}

#[tokio::test]
async fn re_registration_of_an_individual_device_sends_its_assignment_and_payload() {
    let webhook = FakeWebhook::start(vec![hub_answer(HUB_B)]).await;
    let request = CustomRequest {
        kind: EnrollmentKind::Individual,
        enrollment: individual_enrollment(&webhook.url()),
        registration_id: "breakroom499-contoso-tstrsd-007".to_owned(),
        payload: Some(json!({"modelId": "dtmi:contoso:thermostat;1", "floor": 4})),
        current_hub: Some(HUB_A.to_owned()),
        current_device_id: Some("breakroom499-contoso-tstrsd-007".to_owned()),
        protocol: "mqtt".to_owned(),
        certificate: None,
        client_address: None,
        // Only the enrollment's linked hubs are offered.
        linked_hubs: vec![linked_hub(HUB_B)],
    };
    let decision = client(fast(1))
        .allocate(&webhook.url(), "2021-10-01", &request)
        .await
        .unwrap();
    assert_eq!(decision.hub, HUB_B);

    let body = webhook.only_request().body.unwrap();
    let fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        ["deviceRuntimeContext", "individualEnrollment", "linkedHubs"]
    );
    assert_eq!(
        body["individualEnrollment"]["registrationId"],
        "breakroom499-contoso-tstrsd-007"
    );
    assert_eq!(
        body["individualEnrollment"]["attestation"],
        json!({"type": "symmetricKey", "symmetricKey": {}})
    );
    assert_eq!(
        body["individualEnrollment"]["customAllocationDefinition"]["webhookUrl"],
        webhook.masked_url()
    );
    assert_eq!(
        body["deviceRuntimeContext"],
        json!({
            "registrationId": "breakroom499-contoso-tstrsd-007",
            "currentIotHubHostName": HUB_A,
            "currentDeviceId": "breakroom499-contoso-tstrsd-007",
            "symmetricKey": {},
            "payload": {"modelId": "dtmi:contoso:thermostat;1", "floor": 4},
        })
    );
    assert_eq!(body["linkedHubs"], json!([HUB_B]));
}

// ---------------------------------------------------------------- 200 answers (§9.2, §9.3)

#[tokio::test]
async fn a_linked_hub_is_assigned_with_the_twin_and_payload_passed_through() {
    let twin = json!({"tags": {"room": "499"}, "properties": {"desired": {"fanOn": true}}});
    let payload = json!({"welcome": ["a", 1, null]});
    let webhook = FakeWebhook::start(vec![Reply::json(
        200,
        &json!({"iotHubHostName": HUB_B, "initialTwin": twin, "payload": payload}),
    )])
    .await;
    assert_eq!(
        allocate(&webhook, fast(1)).await,
        Ok(CustomDecision {
            hub: HUB_B.to_owned(),
            device_id: None,
            initial_twin: Some(twin),
            payload: Some(payload),
        })
    );
}

#[tokio::test]
async fn the_hub_name_is_matched_case_insensitively_and_spelled_as_linked() {
    let webhook = FakeWebhook::start(vec![hub_answer("HUB-A.Azure-Devices.NET")]).await;
    let decision = allocate(&webhook, fast(1)).await.unwrap();
    assert_eq!(decision.hub, HUB_A);
    assert_eq!(decision.initial_twin, None);
    assert_eq!(decision.payload, None);
}

#[tokio::test]
async fn the_docs_table_spelling_iot_hub_hostname_is_accepted() {
    let webhook =
        FakeWebhook::start(vec![Reply::json(200, &json!({"iotHubHostname": HUB_A}))]).await;
    assert_eq!(allocate(&webhook, fast(1)).await.unwrap().hub, HUB_A);
}

#[tokio::test]
async fn a_missing_null_or_empty_hub_is_hub_not_specified_without_retry() {
    for answer in [
        json!({}),
        json!({"iotHubHostName": null, "payload": {"x": 1}}),
        json!({"iotHubHostName": ""}),
        json!({"iotHubHostName": "   "}),
    ] {
        let webhook = FakeWebhook::start(vec![Reply::json(200, &answer)]).await;
        assert_eq!(
            allocate(&webhook, fast(3)).await,
            Err(CustomFailure::HubNotSpecified),
            "{answer}"
        );
        assert_eq!(webhook.received().len(), 1, "{answer}");
    }
}

#[tokio::test]
async fn an_empty_200_body_names_no_hub() {
    let webhook = FakeWebhook::start(vec![Reply::status(200)]).await;
    assert_eq!(
        allocate(&webhook, fast(1)).await,
        Err(CustomFailure::HubNotSpecified)
    );
}

#[tokio::test]
async fn a_hub_that_is_not_linked_fails() {
    let webhook = FakeWebhook::start(vec![hub_answer("rogue.azure-devices.net")]).await;
    let Err(CustomFailure::Failed(message)) = allocate(&webhook, fast(3)).await else {
        panic!("expected Failed");
    };
    assert!(
        message.contains(
            "returned hub 'rogue.azure-devices.net', which is not one of the linked hubs"
        ),
        "{message}"
    );
    assert!(
        message.contains(HUB_A) && message.contains(HUB_B),
        "{message}"
    );
    assert_eq!(webhook.received().len(), 1, "not retried");
}

#[tokio::test]
async fn a_hub_name_that_is_not_a_string_fails() {
    let webhook = FakeWebhook::start(vec![Reply::json(200, &json!({"iotHubHostName": 42}))]).await;
    assert_eq!(
        allocate(&webhook, fast(1)).await,
        failed("Custom allocation failed: the webhook's iotHubHostName is not a string")
    );
}

#[tokio::test]
async fn an_initial_twin_that_is_not_an_object_fails() {
    let webhook = FakeWebhook::start(vec![Reply::json(
        200,
        &json!({"iotHubHostName": HUB_A, "initialTwin": "tags"}),
    )])
    .await;
    assert_eq!(
        allocate(&webhook, fast(1)).await,
        failed("Custom allocation failed: the webhook's initialTwin is not a JSON object")
    );
}

#[tokio::test]
async fn a_200_that_is_not_json_fails_without_retry() {
    let webhook = FakeWebhook::start(vec![Reply::raw(
        200,
        "text/html",
        "<html>Function host is running</html>",
    )])
    .await;
    assert_eq!(
        allocate(&webhook, fast(3)).await,
        failed("Custom allocation failed: the webhook answered 200 with a body that is not JSON")
    );
    assert_eq!(webhook.received().len(), 1);
}

#[tokio::test]
async fn a_200_that_is_json_but_not_an_object_fails() {
    let webhook = FakeWebhook::start(vec![Reply::json(200, &json!([HUB_A]))]).await;
    assert_eq!(
        allocate(&webhook, fast(1)).await,
        failed("Custom allocation failed: the webhook's answer is not a JSON object")
    );
}

#[tokio::test]
async fn an_answer_over_96_kib_fails_without_retry() {
    let huge = json!({"iotHubHostName": HUB_A, "payload": "x".repeat(100 * 1024)});
    let expected =
        failed("Custom allocation failed: the webhook's answer is larger than 98304 bytes");
    // With a Content-Length, and streamed without one.
    for reply in [Reply::json(200, &huge), Reply::json(200, &huge).chunked()] {
        let webhook = FakeWebhook::start(vec![reply]).await;
        assert_eq!(allocate(&webhook, fast(3)).await, expected);
        assert_eq!(webhook.received().len(), 1);
    }
}

#[tokio::test]
async fn an_answer_just_under_the_limit_is_read() {
    let payload = "x".repeat(90 * 1024);
    let webhook = FakeWebhook::start(vec![Reply::json(
        200,
        &json!({"iotHubHostName": HUB_A, "payload": payload}),
    )
    .chunked()])
    .await;
    let decision = allocate(&webhook, fast(1)).await.unwrap();
    assert_eq!(decision.payload, Some(Value::String(payload)));
}

// ---------------------------------------------------------------- refusals (§9.3)

#[tokio::test]
async fn unauthorized_401_is_not_retried() {
    let webhook = FakeWebhook::start(vec![Reply::status(401), hub_answer(HUB_A)]).await;
    assert_eq!(
        allocate(&webhook, fast(3)).await,
        Err(CustomFailure::Unauthorized(
            "Custom allocation failed with status code: 401".to_owned()
        ))
    );
    assert_eq!(webhook.received().len(), 1);
}

#[tokio::test]
async fn other_4xx_fail_with_their_status_and_are_not_retried() {
    for status in [400, 403, 404, 409] {
        let webhook = FakeWebhook::start(vec![
            Reply::json(status, &json!({"error": "no"})),
            hub_answer(HUB_A),
        ])
        .await;
        assert_eq!(
            allocate(&webhook, fast(3)).await,
            failed(&format!(
                "Custom allocation failed with status code: {status}"
            ))
        );
        assert_eq!(webhook.received().len(), 1, "{status}");
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let webhook = FakeWebhook::start(vec![
        Reply::status(302).header("location", "/api/elsewhere"),
        hub_answer(HUB_A),
    ])
    .await;
    assert_eq!(
        allocate(&webhook, fast(3)).await,
        failed("Custom allocation failed with status code: 302")
    );
    assert_eq!(webhook.only_request().path, PATH);
}

// ---------------------------------------------------------------- retries (§9.3)

#[tokio::test]
async fn throttling_429_is_retried_then_succeeds() {
    let webhook = FakeWebhook::start(vec![Reply::status(429), hub_answer(HUB_A)]).await;
    assert_eq!(allocate(&webhook, fast(10)).await.unwrap().hub, HUB_A);
    let received = webhook.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].raw_body, received[1].raw_body,
        "a retry sends the same request"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempts_are_spent() {
    let webhook = FakeWebhook::start(vec![Reply::status(503)]).await;
    assert_eq!(
        allocate(&webhook, fast(4)).await,
        failed("Custom allocation failed with status code: 503")
    );
    assert_eq!(webhook.received().len(), 4);
}

#[tokio::test]
async fn the_last_status_is_the_one_reported() {
    let webhook = FakeWebhook::start(vec![
        Reply::status(500),
        Reply::status(429),
        Reply::status(502),
    ])
    .await;
    assert_eq!(
        allocate(&webhook, fast(3)).await,
        failed("Custom allocation failed with status code: 502")
    );
    assert_eq!(webhook.received().len(), 3);
}

#[tokio::test]
async fn retries_wait_the_initial_interval_then_one_step_more() {
    let webhook = FakeWebhook::start(vec![
        Reply::status(503),
        Reply::status(503),
        hub_answer(HUB_A),
    ])
    .await;
    let settings = WebhookSettings {
        timeout: Duration::from_secs(5),
        attempts: 3,
        initial_interval: Duration::from_millis(150),
        interval_step: Duration::from_millis(300),
    };
    assert_eq!(allocate(&webhook, settings).await.unwrap().hub, HUB_A);
    let at: Vec<Instant> = webhook.received().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 3);
    let (first_wait, second_wait) = (at[1] - at[0], at[2] - at[1]);
    assert!(
        first_wait >= Duration::from_millis(150) && first_wait < Duration::from_millis(150 + 1000),
        "first wait {first_wait:?}"
    );
    assert!(
        second_wait >= Duration::from_millis(450)
            && second_wait < Duration::from_millis(450 + 1000),
        "second wait {second_wait:?}"
    );
}

#[tokio::test]
async fn a_timeout_is_retried_and_then_fails() {
    let webhook = FakeWebhook::start(vec![hub_answer(HUB_A).delayed(Duration::from_secs(3))]).await;
    let settings = WebhookSettings {
        timeout: Duration::from_millis(200),
        ..fast(2)
    };
    let started = Instant::now();
    assert_eq!(
        allocate(&webhook, settings).await,
        failed("Custom allocation failed: the webhook did not answer within 200 ms")
    );
    assert_eq!(webhook.received().len(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_first_answer_then_a_quick_one_succeeds() {
    let webhook = FakeWebhook::start(vec![
        hub_answer(HUB_B).delayed(Duration::from_secs(3)),
        hub_answer(HUB_A),
    ])
    .await;
    let settings = WebhookSettings {
        timeout: Duration::from_millis(200),
        ..fast(2)
    };
    assert_eq!(allocate(&webhook, settings).await.unwrap().hub, HUB_A);
}

#[tokio::test]
async fn an_unreachable_webhook_is_retried_and_the_key_is_not_in_the_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}{PATH}?code={FUNCTION_KEY}");
    let request = group_request(&url);
    let Err(CustomFailure::Failed(message)) =
        client(fast(2)).allocate(&url, "2021-10-01", &request).await
    else {
        panic!("expected Failed");
    };
    assert!(
        message.starts_with("Custom allocation failed: cannot reach the webhook"),
        "{message}"
    );
    assert!(!message.contains(FUNCTION_KEY), "{message}");
}

#[tokio::test]
async fn a_url_that_is_not_http_fails_without_a_call() {
    let webhook = FakeWebhook::start(vec![hub_answer(HUB_A)]).await;
    let request = group_request(&webhook.url());
    assert_eq!(
        client(fast(1))
            .allocate("wasm:policy?secret", "2021-10-01", &request)
            .await,
        failed("Custom allocation failed: the webhook URL wasm:policy?**** is not an http or https URL")
    );
    assert!(webhook.received().is_empty());
}

// ---------------------------------------------------------------- HTTPS

#[tokio::test]
async fn https_webhooks_are_trusted_through_the_extra_ca() {
    let webhook = FakeWebhook::start_https(vec![hub_answer(HUB_A)]).await;
    let client = WebhookClient::new(fast(1), Some(webhook.ca_pem_path())).unwrap();
    let decision = client
        .allocate(&webhook.url(), "2021-10-01", &group_request(&webhook.url()))
        .await
        .unwrap();
    assert_eq!(decision.hub, HUB_A);
    assert_eq!(
        webhook.only_request().query.as_deref(),
        Some(format!("code={FUNCTION_KEY}").as_str())
    );
}

#[tokio::test]
async fn an_untrusted_certificate_fails_at_once() {
    let webhook = FakeWebhook::start_https(vec![hub_answer(HUB_A)]).await;
    let settings = WebhookSettings {
        initial_interval: Duration::from_secs(2),
        ..fast(3)
    };
    let started = Instant::now();
    let Err(CustomFailure::Failed(message)) = allocate(&webhook, settings).await else {
        panic!("expected Failed");
    };
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a TLS refusal is not retried"
    );
    assert!(message.contains("cannot reach the webhook"), "{message}");
    assert!(!message.contains(FUNCTION_KEY), "{message}");
    assert!(webhook.received().is_empty());
}

#[test]
fn a_ca_file_that_is_not_pem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate").unwrap();
    let error = WebhookClient::new(WebhookSettings::default(), Some(&path)).unwrap_err();
    assert!(error.contains("holds no certificate"), "{error}");
    let missing = dir.path().join("absent.pem");
    let error = WebhookClient::new(WebhookSettings::default(), Some(&missing)).unwrap_err();
    assert!(error.contains("cannot read the webhook CA file"), "{error}");
}

// ---------------------------------------------------------------- logs

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_show_the_masked_url_and_never_the_function_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let webhook = FakeWebhook::start(vec![Reply::status(503), Reply::status(404)]).await;
    assert_eq!(
        allocate(&webhook, fast(3)).await,
        failed("Custom allocation failed with status code: 404")
    );
    let https = FakeWebhook::start_https(vec![hub_answer(HUB_A)]).await;
    assert!(allocate(&https, fast(1)).await.is_err());

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains(&webhook.masked_url()), "{logs}");
    assert!(
        logs.contains("status=503") && logs.contains("attempt=1"),
        "{logs}"
    );
    assert!(
        logs.contains("status=404") && logs.contains("attempt=2"),
        "{logs}"
    );
    assert!(logs.contains("error="), "{logs}");
    assert!(!logs.contains(FUNCTION_KEY), "{logs}");
}
