//! Reprovisioning against two hubs of the `azure` driver (fake IoT hubs, a test double): a
//! device re-registers after its enrollment's hub list changed, and the hubs show the creates,
//! twin copies and deletes each reprovisioning policy calls for.

#![allow(clippy::unwrap_used)]

mod fake_hub;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use berth::attestation::sas::build_token;
use berth::hubs::azure::AzureDriver;
use berth::hubs::driver::HubDrivers;
use berth::hubs::LinkedHub;
use berth::model::enrollment::{validate, Enrollment, EnrollmentKind};
use berth::provisioning::{
    DeviceCall, DeviceRegistration, OperationStatus, Protocol, Provisioning, ProvisioningSettings,
};
use berth::store::{Sealer, Store};
use fake_hub::FakeHub;
use serde_json::{json, Value};

const SCOPE: &str = "0ne00000042";

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    provisioning: Arc<Provisioning>,
    a: FakeHub,
    b: FakeHub,
}

async fn world() -> World {
    let (a, b) = (FakeHub::start(), FakeHub::start());
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("hubs-ca.pem");
    let pem = [
        std::fs::read_to_string(a.ca_pem_path()).unwrap(),
        std::fs::read_to_string(b.ca_pem_path()).unwrap(),
    ]
    .join("\n");
    std::fs::write(&bundle, pem).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::open(&url, Sealer::new(&[3u8; 32])).await.unwrap();
    for hub in [&a, &b] {
        let linked = LinkedHub {
            name: hub.host().to_owned(),
            connection_string: Some(hub.connection_string()),
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
        };
        store
            .put_linked_hub(&linked, None, 50)
            .await
            .unwrap()
            .unwrap();
    }
    let drivers = HubDrivers::new(store.clone(), AzureDriver::new(Some(&bundle)).unwrap());
    let metrics = Arc::new(berth::telemetry::metrics::Metrics::default());
    let custom = Arc::new(berth::provisioning::custom::Custom::new(
        store.clone(),
        berth::policy::PolicyEngine::new(None).unwrap(),
        berth::allocation::webhook::WebhookClient::new(
            berth::allocation::webhook::WebhookSettings::default(),
            None,
        )
        .unwrap(),
        metrics.clone(),
    ));
    let provisioning = Arc::new(Provisioning::new(
        store.clone(),
        drivers,
        SCOPE.to_owned(),
        ProvisioningSettings::default(),
        metrics,
        custom,
    ));
    World {
        _dir: dir,
        store,
        provisioning,
        a,
        b,
    }
}

impl World {
    async fn enroll(&self, id: &str, body: Value) -> String {
        let input: Enrollment = serde_json::from_value(body).unwrap();
        let (row, _) = self
            .store
            .put_enrollment(EnrollmentKind::Individual, id, None, |existing| {
                validate(
                    EnrollmentKind::Individual,
                    Some(id),
                    input.clone(),
                    existing,
                    &|_| true,
                )
            })
            .await
            .unwrap();
        row.record.keys.unwrap().primary_key.unwrap()
    }

    async fn register(&self, id: &str, key: &str) -> OperationStatus {
        let token = build_token(
            &format!("{SCOPE}/registrations/{id}"),
            &STANDARD.decode(key).unwrap(),
            Some("registration"),
            4_000_000_000,
        );
        let call = DeviceCall {
            id_scope: SCOPE,
            registration_id: id,
            authorization: Some(&token),
            protocol: Protocol::Http,
            client: None,
            api_version: Some("2021-06-01"),
            certificates: None,
        };
        let accepted = self
            .provisioning
            .register(call, DeviceRegistration::default())
            .await
            .unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let status = self
                .provisioning
                .operation_status(call, &accepted.operation_id)
                .await
                .unwrap();
            if !status.is_assigning() {
                return status;
            }
        }
        panic!("{id} did not finish registering");
    }
}

fn calls(hub: &FakeHub, device: &str) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&format!("/{device}")))
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reprovision_policy_does_what_the_seed_says_on_real_hub_calls() {
    let w = world().await;
    let initial_twin =
        json!({"tags": {"fleet": "one"}, "properties": {"desired": {"interval": 10}}});
    for (id, update, migrate) in [
        ("migrate-1", true, true),
        ("reset-1", true, false),
        ("never-1", false, false),
    ] {
        let enrollment = |hub: &str| {
            json!({"attestation": {"type": "symmetricKey"}, "iotHubs": [hub], "initialTwin": initial_twin,
                   "reprovisionPolicy": {"updateHubAssignment": update, "migrateDeviceData": migrate}})
        };
        let key = w.enroll(id, enrollment(w.a.host())).await;
        let first = w.register(id, &key).await;
        assert_eq!(first.status, "assigned", "{first:?}");
        assert_eq!(
            first.registration_state.assigned_hub.as_deref(),
            Some(w.a.host())
        );
        let device = &w.a.devices()[id];
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            key.as_str()
        );
        assert_eq!(w.a.twin(id).unwrap()["tags"], json!({"fleet": "one"}));
        // The device's twin evolves on hub A, then its enrollment moves it to hub B.
        w.a.seed_device(
            id,
            &json!({"tags": {"fleet": "two"}, "properties": {"desired": {"interval": 99}}}),
        );
        w.a.clear_requests();
        w.b.clear_requests();
        w.enroll(id, enrollment(w.b.host())).await;
        let second = w.register(id, &key).await;
        let state = &second.registration_state;
        let (on_a, on_b) = (calls(&w.a, id), calls(&w.b, id));
        match id {
            "migrate-1" => {
                assert_eq!(state.assigned_hub.as_deref(), Some(w.b.host()));
                assert_eq!(state.substatus.as_deref(), Some("deviceDataMigrated"));
                assert!(
                    on_a.iter().any(|c| c.starts_with("GET /twins/")),
                    "twin read from A: {on_a:?}"
                );
                assert!(
                    on_a.iter().any(|c| c.starts_with("DELETE /devices/")),
                    "device deleted from A: {on_a:?}"
                );
                assert!(
                    on_b.iter().any(|c| c.starts_with("PUT /devices/")),
                    "device created on B: {on_b:?}"
                );
                assert_eq!(
                    w.b.twin(id).unwrap()["tags"],
                    json!({"fleet": "two"}),
                    "the current twin moved"
                );
                assert!(!w.a.devices().contains_key(id));
            }
            "reset-1" => {
                assert_eq!(state.assigned_hub.as_deref(), Some(w.b.host()));
                assert_eq!(state.substatus.as_deref(), Some("deviceDataReset"));
                assert!(
                    !on_a.iter().any(|c| c.starts_with("GET /twins/")),
                    "no twin read: {on_a:?}"
                );
                assert!(on_a.iter().any(|c| c.starts_with("DELETE /devices/")));
                assert_eq!(
                    w.b.twin(id).unwrap()["tags"],
                    json!({"fleet": "one"}),
                    "the initial config"
                );
            }
            _ => {
                assert_eq!(state.assigned_hub.as_deref(), Some(w.a.host()));
                assert_eq!(
                    state.substatus.as_deref(),
                    Some("reprovisionedToInitialAssignment")
                );
                assert!(on_b.is_empty(), "nothing on B: {on_b:?}");
                assert!(!on_a.iter().any(|c| c.starts_with("DELETE")), "{on_a:?}");
                assert_eq!(
                    w.a.twin(id).unwrap()["tags"],
                    json!({"fleet": "two"}),
                    "data kept"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_refuses_fails_the_registration_with_its_message() {
    let w = world().await;
    let key = w
        .enroll(
            "refused-1",
            json!({"attestation": {"type": "symmetricKey"}, "iotHubs": [w.a.host()]}),
        )
        .await;
    w.a.fail_next(1, 403);
    let done = w.register("refused-1", &key).await;
    assert_eq!(done.status, "failed");
    assert_eq!(done.registration_state.error_code, Some(403_001));
    let message = done.registration_state.error_message.unwrap();
    assert!(message.contains("403"), "{message}");
    assert!(
        w.store.registration("refused-1").await.unwrap().is_none(),
        "no record for a failed first registration"
    );
    // A transient 503 is retried and the registration succeeds.
    w.a.fail_next(2, 503);
    let key = w
        .enroll(
            "retried-1",
            json!({"attestation": {"type": "symmetricKey"}, "iotHubs": [w.a.host()]}),
        )
        .await;
    assert_eq!(w.register("retried-1", &key).await.status, "assigned");
}
