//! WebAssembly policies end to end in process: upload validation, the sandbox's limits on
//! hostile policies (each fails only its own registration), the artifact cache, and custom
//! allocation through a policy reaching the device's registration state.
//!
//! The components are built by `tests/policies/build.sh` and `policies/build.sh` (run by
//! `tests/run.sh` before the Rust tests).

#![allow(clippy::unwrap_used)]

mod fake_webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use berth::attestation::sas::build_token;
use berth::hubs::azure::AzureDriver;
use berth::hubs::driver::HubDrivers;
use berth::hubs::LinkedHub;
use berth::model::enrollment::{validate, Enrollment, EnrollmentKind};
use berth::policy::{content_hash, Limits, PolicyEngine, PolicyError, World};
use berth::provisioning::custom::Custom;
use berth::provisioning::{
    DeviceCall, DeviceRegistration, OperationStatus, Protocol, Provisioning, ProvisioningSettings,
};
use berth::store::{Sealer, Store};
use serde_json::{json, Value};

const SCOPE: &str = "0ne000000AB";

fn component(relative: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; build the test components with tests/policies/build.sh and policies/build.sh (tests/run.sh does)", path.display())
    })
}

struct World_ {
    _dir: tempfile::TempDir,
    store: Store,
    engine: Arc<PolicyEngine>,
    provisioning: Arc<Provisioning>,
}

async fn world() -> World_ {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::open(&url, Sealer::new(&[4u8; 32])).await.unwrap();
    for name in [
        "hub-a.example.net",
        "hub-b.example.net",
        "contoso-toasters-hub.example.net",
        "contoso-heatpumps-hub.example.net",
    ] {
        let hub = LinkedHub {
            name: name.to_owned(),
            connection_string: None,
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
        };
        store.put_linked_hub(&hub, None, 50).await.unwrap().unwrap();
    }
    let engine = PolicyEngine::new(Some(dir.path().join("policy-cache"))).unwrap();
    let metrics = Arc::new(berth::telemetry::metrics::Metrics::default());
    let custom = Arc::new(Custom::new(
        store.clone(),
        engine.clone(),
        berth::allocation::webhook::WebhookClient::new(
            berth::allocation::webhook::WebhookSettings {
                timeout: Duration::from_secs(5),
                attempts: 3,
                initial_interval: Duration::from_millis(20),
                interval_step: Duration::from_millis(20),
            },
            None,
        )
        .unwrap(),
        metrics.clone(),
    ));
    let drivers = HubDrivers::new(store.clone(), AzureDriver::new(None).unwrap());
    let provisioning = Arc::new(Provisioning::new(
        store.clone(),
        drivers,
        SCOPE.to_owned(),
        ProvisioningSettings::default(),
        metrics,
        custom,
    ));
    World_ {
        _dir: dir,
        store,
        engine,
        provisioning,
    }
}

impl World_ {
    async fn upload(&self, name: &str, bytes: &[u8], limits: Limits) -> World {
        let (world, _) = self.engine.validate(bytes).unwrap();
        self.store
            .insert_policy_version(
                name,
                world.as_str(),
                &content_hash(bytes),
                bytes,
                &serde_json::to_string(&limits).unwrap(),
            )
            .await
            .unwrap();
        world
    }

    async fn enroll_group(&self, id: &str, body: Value) -> String {
        let input: Enrollment = serde_json::from_value(body).unwrap();
        let (row, _) = self
            .store
            .put_enrollment(EnrollmentKind::Group, id, None, |existing| {
                validate(
                    EnrollmentKind::Group,
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

    async fn register(
        &self,
        registration_id: &str,
        group_key: &str,
        payload: Option<Value>,
    ) -> OperationStatus {
        let key = berth::attestation::sas::derive_device_key(group_key, registration_id).unwrap();
        let token = build_token(
            &format!("{SCOPE}/registrations/{registration_id}"),
            &STANDARD.decode(key).unwrap(),
            Some("registration"),
            4_000_000_000,
        );
        let call = DeviceCall {
            id_scope: SCOPE,
            registration_id,
            authorization: Some(&token),
            protocol: Protocol::Mqtt,
            client: None,
            api_version: Some("2019-03-31"),
            certificates: None,
        };
        let body = DeviceRegistration {
            registration_id: None,
            payload,
            tpm: None,
        };
        let accepted = self.provisioning.register(call, body).await.unwrap();
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
        panic!("{registration_id} did not finish");
    }
}

#[test]
fn uploads_reject_what_is_not_a_policy() {
    let engine = PolicyEngine::new(None).unwrap();
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let error = engine.validate(&core_module).err().unwrap();
    assert!(
        matches!(&error, PolicyError::Invalid(m) if m.contains("core WebAssembly module")),
        "{error}"
    );
    let error = engine.validate(b"not wasm at all").err().unwrap();
    assert!(
        matches!(&error, PolicyError::Invalid(m) if m.contains("not a WebAssembly component")),
        "{error}"
    );
    let hostile = component("tests/policies/dist/hostile.wasm");
    let error = engine
        .validate(&hostile[..hostile.len() / 2])
        .err()
        .unwrap();
    assert!(
        matches!(&error, PolicyError::Invalid(m) if m.contains("does not compile")),
        "{error}"
    );
    let wrong = component("tests/policies/dist/wrong-world.wasm");
    let error = engine.validate(&wrong).err().unwrap();
    assert!(matches!(&error, PolicyError::Invalid(_)), "{error}");
    let (world, _) = engine.validate(&hostile).unwrap();
    assert_eq!(world, World::AllocationPolicy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_fail_only_their_own_registration() {
    let w = world().await;
    let limits = Limits {
        timeout_ms: 50,
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    w.upload(
        "hostile",
        &component("tests/policies/dist/hostile.wasm"),
        limits,
    )
    .await;
    let key = w
        .enroll_group(
            "hostile-devices",
            json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                   "iotHubs": ["hub-a.example.net"],
                   "customAllocationDefinition": {"webhookUrl": "wasm:hostile", "apiVersion": "2021-10-01"}}),
        )
        .await;
    for (id, expected) in [
        ("loop-1", "time limit"),
        ("bomb-1", "memory limit"),
        ("huge-1", "output size limit"),
        ("trap-1", "trapped"),
        ("unlinked-1", "not one of the enrollment's linked hubs"),
        ("badtwin-1", "invalid JSON as initialTwin"),
    ] {
        let done = w.register(id, &key, None).await;
        assert_eq!(done.status, "failed", "{id}: {done:?}");
        assert_eq!(done.registration_state.error_code, Some(400_207), "{id}");
        let message = done.registration_state.error_message.clone().unwrap();
        assert!(message.contains(expected), "{id}: {message}");
        // Every hostile call is followed by a good one: the host keeps serving.
        let good = w.register(&format!("good-after-{id}"), &key, None).await;
        assert_eq!(good.status, "assigned", "{good:?}");
        assert_eq!(
            good.registration_state.payload,
            Some(json!({"ok": true})),
            "the policy's payload reaches the device"
        );
    }
    let chatty = w.register("chatty-1", &key, None).await;
    assert_eq!(
        chatty.status, "assigned",
        "too many logs are cut, not fatal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_artifacts_are_cached_across_engines() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = component("tests/policies/dist/hostile.wasm");
    let hash = content_hash(&bytes);
    let first = PolicyEngine::new(Some(dir.path().to_path_buf())).unwrap();
    first.prepare(&hash, &bytes).unwrap();
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(cached.len(), 1, "one artifact per module and engine");
    assert!(cached[0].file_name().to_string_lossy().starts_with(&hash));
    // A second engine (a restart) loads the artifact instead of compiling: give it bytes that
    // would not compile, and it still prepares the policy from the cache.
    let second = PolicyEngine::new(Some(dir.path().to_path_buf())).unwrap();
    let prepared = second.prepare(&hash, b"not the module").unwrap();
    assert_eq!(prepared.world(), World::AllocationPolicy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_enrollment_follows_the_seeds_error_table() {
    use fake_webhook::{FakeWebhook, Reply};
    let w = world().await;
    let twin = json!({"tags": {"from": "webhook"}, "properties": {"desired": {"interval": 5}}});
    let hook = FakeWebhook::start(vec![
        Reply::json(200, &json!({"iotHubHostName": "hub-b.example.net", "initialTwin": twin, "payload": {"hello": "device"}})),
        Reply::json(200, &json!({"iotHubHostName": ""})),
        Reply::status(401),
        Reply::status(404),
        Reply::status(503),
        Reply::json(200, &json!({"iotHubHostName": "hub-a.example.net"})),
        Reply::json(200, &json!({"iotHubHostName": "elsewhere.example.net"})),
    ])
    .await;
    let key = w
        .enroll_group(
            "webhook-devices",
            json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                   "iotHubs": ["hub-a.example.net", "hub-b.example.net"],
                   "customAllocationDefinition": {"webhookUrl": format!("{}?code=secret", hook.url()), "apiVersion": "2021-10-01"}}),
        )
        .await;
    let assigned = w
        .register("hooked-1", &key, Some(json!({"model": "t1"})))
        .await;
    assert_eq!(assigned.status, "assigned", "{assigned:?}");
    assert_eq!(
        assigned.registration_state.assigned_hub.as_deref(),
        Some("hub-b.example.net")
    );
    assert_eq!(
        assigned.registration_state.payload,
        Some(json!({"hello": "device"}))
    );
    let device = w
        .store
        .hub_device("hub-b.example.net", "hooked-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        device.twin, twin,
        "the webhook's twin replaces the enrollment's"
    );
    let sent = hook.received();
    assert_eq!(
        sent[0].body.as_ref().unwrap()["deviceRuntimeContext"]["payload"],
        json!({"model": "t1"})
    );
    assert_eq!(
        sent[0].body.as_ref().unwrap()["linkedHubs"],
        json!(["hub-a.example.net", "hub-b.example.net"])
    );
    for (id, code, message) in [
        ("hooked-2", 400_208, "no IoT hub"),
        ("hooked-3", 400_209, "status code: 401"),
        ("hooked-4", 400_207, "status code: 404"),
    ] {
        let done = w.register(id, &key, None).await;
        assert_eq!(done.status, "failed", "{id}");
        assert_eq!(
            done.registration_state.error_code,
            Some(code),
            "{id}: {done:?}"
        );
        assert!(
            done.registration_state
                .error_message
                .unwrap()
                .contains(message),
            "{id}"
        );
    }
    let retried = w.register("hooked-5", &key, None).await;
    assert_eq!(retried.status, "assigned", "a 503 is retried: {retried:?}");
    let unlinked = w.register("hooked-6", &key, None).await;
    assert_eq!(unlinked.registration_state.error_code, Some(400_207));
}
