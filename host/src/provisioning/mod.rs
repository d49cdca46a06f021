//! Device registration: attestation, the registration operation, allocation and the hub
//! work, independent of the transport that carried the request. HTTPS, MQTT and MQTT over
//! WebSocket adapters turn bytes into [`DeviceCall`]s and [`OperationStatus`] back into bytes.
//!
//! Registration is asynchronous (wire-protocol.md §3.4): `register` attests the device,
//! stores an operation and answers `assigning`; the assignment runs in the background and
//! its outcome is written to the operation row, which any node reads when the device polls.
//! An operation whose node died keeps `assigning` until its lease runs out; the next poll,
//! on any node, then takes it over and finishes it.

pub mod attest;
pub mod custom;
pub mod plan;
mod throttle;
pub mod tpm;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::allocation::GeoMap;
use crate::clock::now_utc;
use crate::error::{NotFoundKind, ServiceError};
use crate::hubs::driver::{managed_twin, DeviceIdentity, HubDrivers, HubError};
use crate::model::enrollment::{EnrollmentKind, ProvisioningStatus};
use crate::model::registration::{RegistrationRecord, RegistrationState};
use crate::store::{OperationRow, Store};
use crate::telemetry::metrics::{AssignmentLabels, AttestationLabels, Metrics, RegistrationLabels};

pub use throttle::Throttle;

/// How long a node owns an operation it is working on before another may take it over.
const LEASE_SECONDS: i64 = 60;
/// The error code a `disabled` state carries (wire-protocol.md §3.4 asks for one).
const DISABLED_ERROR_CODE: u32 = 401_003;
/// Seconds the device is told to wait before polling: an integer from 2 to 5 (§3.7).
pub const RETRY_AFTER_SECONDS: u32 = 3;

/// The transport a device used, as the seed's `protocol` dimension names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Http,
    Mqtt,
    MqttWs,
    Amqp,
    AmqpWs,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "Http",
            Self::Mqtt => "Mqtt",
            Self::MqttWs => "MqttWs",
            Self::Amqp => "Amqp",
            Self::AmqpWs => "AmqpWs",
        }
    }
}

/// Who is calling and how.
#[derive(Debug, Clone, Copy)]
pub struct DeviceCall<'a> {
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    pub authorization: Option<&'a str>,
    pub protocol: Protocol,
    pub client: Option<IpAddr>,
    pub api_version: Option<&'a str>,
    /// The certificate chain the device presented in the TLS handshake, leaf first.
    pub certificates: Option<&'a [Vec<u8>]>,
}

impl DeviceCall<'_> {
    /// An X.509 device: a client certificate and no other credential (wire-protocol.md §4.1).
    fn x509(&self) -> Option<&[Vec<u8>]> {
        match (self.authorization, self.certificates) {
            (None, Some(chain)) if !chain.is_empty() => Some(chain),
            _ => None,
        }
    }
}

/// The register request body (`DeviceRegistration`, §3.3). Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    pub registration_id: Option<String>,
    pub payload: Option<Value>,
    pub tpm: Option<Value>,
}

/// `RegistrationOperationStatus`: what register and poll answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub operation_id: String,
    pub status: String,
    pub registration_state: RegistrationState,
}

impl OperationStatus {
    /// Still assigning: the device polls again (HTTP 202, MQTT `res/202`).
    pub fn is_assigning(&self) -> bool {
        self.status == "assigning"
    }
}

/// What an operation row remembers of the request, to run (or re-run) the assignment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationRequest {
    registration_id: String,
    group: bool,
    enrollment_id: String,
    payload: Option<Value>,
    protocol: Protocol,
    client: Option<IpAddr>,
    api_version: Option<String>,
    /// A disabled entry covers the device (deny wins), whatever its enrollment says now.
    #[serde(default)]
    blocked: bool,
    /// X.509 devices: the certificate that proved the identity.
    #[serde(default)]
    certificate: Option<crate::attestation::chain::LeafFacts>,
}

/// What register hands to the assignment it starts, so that it is not read back.
#[derive(Debug)]
struct Prefetched {
    request: OperationRequest,
    enrollment: crate::store::EnrollmentRow,
}

/// Settings of device registration.
#[derive(Debug, Clone, Default)]
pub struct ProvisioningSettings {
    pub geo: GeoMap,
    /// Service-wide registrations per minute; `None` is unlimited.
    pub registrations_per_minute: Option<u32>,
}

/// The device-facing service, shared by every transport.
#[derive(Debug)]
pub struct Provisioning {
    store: Store,
    drivers: HubDrivers,
    id_scope: String,
    geo: GeoMap,
    throttle: Throttle,
    metrics: Arc<Metrics>,
    custom: Arc<custom::Custom>,
    /// Operations this node started lately, so that a poll can wait for the outcome instead
    /// of answering `assigning` and being polled again, and skip the attestation its register
    /// request already made with the same credential.
    running: std::sync::Mutex<RunningMap>,
}

/// The operations this node started, swept of old entries at most once a second (a sweep
/// walks the whole map).
#[derive(Debug)]
struct RunningMap {
    entries: std::collections::HashMap<String, Running>,
    swept: Instant,
}

impl Default for RunningMap {
    fn default() -> Self {
        Self {
            entries: std::collections::HashMap::new(),
            swept: Instant::now(),
        }
    }
}

/// An operation this node started.
#[derive(Debug, Clone)]
struct Running {
    registration_key: String,
    /// What the register request proved itself with: its SAS token, or its certificate.
    credential: Vec<u8>,
    done: tokio::sync::watch::Receiver<bool>,
    started: Instant,
}

/// How long a started operation's entry is kept for its polls.
const RUNNING_KEPT: Duration = Duration::from_secs(30);
/// Entries are swept once the map holds this many; beyond `RUNNING_CAP` new operations are
/// not remembered (their polls attest and read the database, as on any other node).
const RUNNING_SWEEP: usize = 4096;
const RUNNING_CAP: usize = 200_000;

/// The credential a call proves itself with, to recognize the same device's next poll.
fn credential(call: &DeviceCall<'_>) -> Vec<u8> {
    match (call.authorization, call.x509()) {
        (Some(token), _) => token.as_bytes().to_vec(),
        (None, Some(chain)) => chain.first().cloned().unwrap_or_default(),
        (None, None) => Vec::new(),
    }
}

/// How long a poll waits for an assignment running on this node before it answers
/// `assigning`; below the 3-second `retry-after`, so a device never waits longer than it
/// would have between polls.
const POLL_WAIT: Duration = Duration::from_secs(2);

fn new_operation_id() -> String {
    let mut bytes = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("4.{}.{}", hex::encode(bytes), uuid::Uuid::new_v4())
}

fn assigning(operation_id: &str, registration_id: &str) -> OperationStatus {
    OperationStatus {
        operation_id: operation_id.to_owned(),
        status: "assigning".to_owned(),
        registration_state: RegistrationState {
            registration_id: registration_id.to_owned(),
            status: "assigning".to_owned(),
            ..RegistrationState::default()
        },
    }
}

impl Provisioning {
    pub fn new(
        store: Store,
        drivers: HubDrivers,
        id_scope: String,
        settings: ProvisioningSettings,
        metrics: Arc<Metrics>,
        custom: Arc<custom::Custom>,
    ) -> Self {
        Self {
            store,
            drivers,
            id_scope,
            geo: settings.geo,
            throttle: Throttle::new(settings.registrations_per_minute),
            metrics,
            custom,
            running: std::sync::Mutex::default(),
        }
    }

    pub fn id_scope(&self) -> &str {
        &self.id_scope
    }

    /// Custom allocation (policies, webhooks), shared with the service API's policy routes.
    pub fn custom(&self) -> &Arc<custom::Custom> {
        &self.custom
    }

    /// Drops rate-limiter state of devices not seen lately and expired operations.
    pub async fn housekeeping(&self) {
        self.throttle.forget_idle();
        if let Err(error) = self.store.expire_operations(24 * 3600).await {
            tracing::warn!(error = %error, "could not expire old operations");
        }
    }

    fn check_call(&self, call: &DeviceCall<'_>) -> Result<(), ServiceError> {
        if !call.id_scope.eq_ignore_ascii_case(&self.id_scope) {
            return Err(ServiceError::not_found(
                NotFoundKind::IdScope,
                call.id_scope,
            ));
        }
        crate::model::names::check_registration_id("registrationId", call.registration_id)
            .map_err(ServiceError::invalid)
    }

    async fn attest(&self, call: &DeviceCall<'_>) -> Result<attest::Attested, ServiceError> {
        let started = Instant::now();
        let outcome = match call.x509() {
            Some(chain) => attest::attest_x509(&self.store, call.registration_id, chain).await,
            None => {
                attest::attest(
                    &self.store,
                    &self.id_scope,
                    call.registration_id,
                    call.authorization,
                )
                .await
            }
        };
        let (status, signature) = match &outcome {
            Ok(_) => ("Success", 200),
            Err(error) => ("Failure", error.status()),
        };
        self.metrics
            .attestation_attempts
            .get_or_create(&AttestationLabels {
                status: status.to_owned(),
                protocol: call.protocol.as_str().to_owned(),
            })
            .inc();
        device_log(
            "AttestationAttempt",
            status,
            signature,
            outcome.as_ref().err().map(ToString::to_string).as_deref(),
            started,
            call,
            None,
        );
        outcome
    }

    /// Register (§3.1): attests, stores the operation, starts the assignment.
    pub async fn register(
        self: &Arc<Self>,
        call: DeviceCall<'_>,
        body: DeviceRegistration,
    ) -> Result<OperationStatus, ServiceError> {
        self.check_call(&call)?;
        if let Some(body_id) = &body.registration_id {
            if !body_id.eq_ignore_ascii_case(call.registration_id) {
                return Err(ServiceError::invalid(format!(
                    "registrationId '{body_id}' in the body does not match '{}' in the request",
                    call.registration_id
                )));
            }
        }
        if body.tpm.as_ref().is_some_and(|t| !t.is_null())
            && matches!(call.protocol, Protocol::Mqtt | Protocol::MqttWs)
        {
            return Err(ServiceError::invalid(
                "TPM attestation is not available over MQTT (as in DPS); register over HTTPS or AMQP",
            ));
        }
        self.throttle.admit_registration()?;
        let attested = self.attest(&call).await?;
        let operation_id = new_operation_id();
        let request = OperationRequest {
            registration_id: call.registration_id.to_owned(),
            group: attested.kind == EnrollmentKind::Group,
            enrollment_id: attested.enrollment.record.id.clone(),
            payload: body.payload.filter(|p| !p.is_null()),
            protocol: call.protocol,
            client: call.client,
            api_version: call.api_version.map(str::to_owned),
            blocked: attested.disabled,
            certificate: attested.certificate,
        };
        let request_json =
            serde_json::to_string(&request).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let row = OperationRow {
            operation_id: operation_id.clone(),
            registration_key: call.registration_id.to_ascii_lowercase(),
            status: "assigning".to_owned(),
            request: request_json,
            result: None,
            lease_until: crate::clock::unix_now() + LEASE_SECONDS,
        };
        self.store.insert_operation(&row).await?;
        let this = Arc::clone(self);
        let id = operation_id.clone();
        let (done, watch) = tokio::sync::watch::channel(false);
        if let Ok(mut map) = self.running.lock() {
            if map.entries.len() >= RUNNING_SWEEP && map.swept.elapsed() >= Duration::from_secs(1) {
                map.entries
                    .retain(|_, entry| entry.started.elapsed() < RUNNING_KEPT);
                map.swept = Instant::now();
            }
            if map.entries.len() < RUNNING_CAP {
                map.entries.insert(
                    operation_id.clone(),
                    Running {
                        registration_key: row.registration_key.clone(),
                        credential: credential(&call),
                        done: watch,
                        started: Instant::now(),
                    },
                );
            }
        }
        let prefetched = Prefetched {
            request,
            enrollment: attested.enrollment,
        };
        tokio::spawn(async move {
            Box::pin(this.process(&id, Some(prefetched))).await;
            let _ = done.send(true);
        });
        Ok(assigning(&operation_id, call.registration_id))
    }

    /// The TPM challenge (wire-protocol.md §7.3): for a register request with the device's
    /// TPM keys and no credential. Returns the `authenticationKey` blob (Base64).
    pub async fn tpm_challenge(
        &self,
        call: DeviceCall<'_>,
        presented: &tpm::Presented,
    ) -> Result<String, ServiceError> {
        self.check_call(&call)?;
        self.throttle.admit_registration()?;
        let outcome = tpm::challenge(&self.store, call.registration_id, presented).await;
        if let Err(error) = &outcome {
            device_log(
                "AttestationAttempt",
                "Failure",
                error.status(),
                Some(&error.to_string()),
                Instant::now(),
                &call,
                None,
            );
        }
        outcome
    }

    /// Checks a device's credentials without registering it: the AMQP transport
    /// authenticates in SASL, before any request (wire-protocol.md §6.2).
    pub async fn authenticate(&self, call: DeviceCall<'_>) -> Result<(), ServiceError> {
        self.check_call(&call)?;
        self.attest(&call).await.map(|_| ())
    }

    /// Operation status lookup (§3.1): assigning, or the final state.
    pub async fn operation_status(
        self: &Arc<Self>,
        call: DeviceCall<'_>,
        operation_id: &str,
    ) -> Result<OperationStatus, ServiceError> {
        self.check_call(&call)?;
        self.throttle.admit_poll(call.registration_id)?;
        let not_found = || ServiceError::not_found(NotFoundKind::Operation, operation_id);
        let running = self
            .running
            .lock()
            .ok()
            .and_then(|map| map.entries.get(operation_id).cloned())
            .filter(|r| r.started.elapsed() < RUNNING_KEPT);
        // The register request on this node attested this very credential moments ago.
        let attested_here = running.as_ref().is_some_and(|r| {
            r.registration_key == call.registration_id.to_ascii_lowercase()
                && !r.credential.is_empty()
                && bool::from(subtle::ConstantTimeEq::ct_eq(
                    r.credential.as_slice(),
                    credential(&call).as_slice(),
                ))
        });
        if !attested_here {
            self.attest(&call).await?;
        }
        if let Some(mut running) = running {
            let _ = tokio::time::timeout(POLL_WAIT, running.done.wait_for(|done| *done)).await;
        }
        let mut row = self
            .store
            .operation(operation_id)
            .await?
            .ok_or_else(not_found)?;
        if row.registration_key != call.registration_id.to_ascii_lowercase() {
            return Err(not_found());
        }
        let now = crate::clock::unix_now();
        if row.status == "assigning"
            && row.lease_until < now
            && self
                .store
                .claim_operation(operation_id, now, now + LEASE_SECONDS)
                .await?
        {
            tracing::info!(operation_id, "taking over an operation whose lease expired");
            // Boxed: the assignment's state is large and this path is rare.
            Box::pin(self.process(operation_id, None)).await;
            row = self
                .store
                .operation(operation_id)
                .await?
                .ok_or_else(not_found)?;
        }
        match (&row.status[..], &row.result) {
            ("assigning", _) | (_, None) => Ok(assigning(operation_id, call.registration_id)),
            (status, Some(result)) => Ok(OperationStatus {
                operation_id: operation_id.to_owned(),
                status: status.to_owned(),
                registration_state: serde_json::from_str(result)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            }),
        }
    }

    /// Device registration status lookup (§3.10): the stored state, or 404.
    pub async fn status_lookup(
        &self,
        call: DeviceCall<'_>,
    ) -> Result<RegistrationState, ServiceError> {
        self.check_call(&call)?;
        self.throttle.admit_poll(call.registration_id)?;
        self.attest(&call).await?;
        self.store
            .registration(call.registration_id)
            .await?
            .map(|record| record.state)
            .ok_or_else(|| {
                ServiceError::not_found(NotFoundKind::Registration, call.registration_id)
            })
    }

    /// Runs the assignment of an operation and records its outcome. Never fails: whatever
    /// goes wrong becomes the operation's `failed` state.
    async fn process(&self, operation_id: &str, prefetched: Option<Prefetched>) {
        let started = Instant::now();
        let outcome = self.assign(operation_id, prefetched).await;
        let (state, record) = match outcome {
            Ok(Some(done)) => done,
            Ok(None) => return,
            Err((request, code, message)) => {
                let now = now_utc();
                let state = RegistrationState {
                    registration_id: request.map_or_else(String::new, |r| r.registration_id),
                    status: "failed".to_owned(),
                    error_code: Some(i64::from(code)),
                    error_message: Some(message),
                    created_date_time_utc: Some(now.clone()),
                    last_updated_date_time_utc: Some(now),
                    ..RegistrationState::default()
                };
                (state, None)
            }
        };
        let status = state.status.clone();
        let hub = state.assigned_hub.clone().unwrap_or_default();
        let result = self.finish(operation_id, state, record.as_ref()).await;
        self.metrics
            .registration_attempts
            .get_or_create(&RegistrationLabels {
                iot_hub_name: hub.clone(),
                status: status.clone(),
            })
            .inc();
        if status == "assigned" && result.is_ok() {
            self.metrics
                .device_assignments
                .get_or_create(&AssignmentLabels {
                    iot_hub_name: hub.clone(),
                })
                .inc();
        }
        tracing::info!(
            target: "berth::device_operations",
            category = "DeviceOperations",
            operation_name = "RegistrationAttempt",
            result_type = if status == "assigned" || status == "disabled" { "Success" } else { "Failure" },
            result_signature = status.as_str(),
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            correlation_id = operation_id,
            iot_hub_name = hub.as_str(),
            "registration finished"
        );
    }

    async fn finish(
        &self,
        operation_id: &str,
        state: RegistrationState,
        record: Option<&RegistrationRecord>,
    ) -> Result<(), ()> {
        match self
            .store
            .finish_operation(operation_id, &state, record)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::error!(error = %error, operation_id, "could not record the outcome of a registration");
                Err(())
            }
        }
    }

    /// The assignment itself. `Ok(None)`: the operation is gone or already finished.
    #[allow(clippy::type_complexity)]
    async fn assign(
        &self,
        operation_id: &str,
        prefetched: Option<Prefetched>,
    ) -> Result<
        Option<(RegistrationState, Option<RegistrationRecord>)>,
        (Option<OperationRequest>, u32, String),
    > {
        let internal = |request: Option<&OperationRequest>, error: &dyn std::fmt::Display| {
            tracing::error!(error = %error, operation_id, "registration failed inside Berth");
            (
                request.cloned(),
                500_000,
                "the provisioning service failed; retry the registration".to_owned(),
            )
        };
        // A registration this node just attested brings what it read; an operation taken over
        // from another node is read back from the database.
        let fresh = prefetched.is_some();
        let (request, enrollment) = if let Some(prefetched) = prefetched {
            (prefetched.request, prefetched.enrollment)
        } else {
            let row = match self.store.operation(operation_id).await {
                Ok(Some(row)) if row.status == "assigning" => row,
                Ok(_) => return Ok(None),
                Err(error) => return Err(internal(None, &error)),
            };
            let request: OperationRequest =
                serde_json::from_str(&row.request).map_err(|e| internal(None, &e))?;
            let kind = if request.group {
                EnrollmentKind::Group
            } else {
                EnrollmentKind::Individual
            };
            match self.store.enrollment(kind, &request.enrollment_id).await {
                Ok(Some(row)) => (request, row),
                Ok(None) => {
                    return Err((
                        Some(request),
                        404_201,
                        "the device's enrollment was deleted during the registration".to_owned(),
                    ))
                }
                Err(error) => return Err(internal(Some(&request), &error)),
            }
        };
        let kind = if request.group {
            EnrollmentKind::Group
        } else {
            EnrollmentKind::Individual
        };
        let registration_id = request.registration_id.clone();
        // Attestation has just weighed the device's individual entry (`blocked`).
        let individual = if kind == EnrollmentKind::Group && !fresh {
            self.store
                .enrollment(EnrollmentKind::Individual, &registration_id)
                .await
                .map_err(|e| internal(Some(&request), &e))?
        } else {
            None
        };
        let is_disabled = |row: &crate::store::EnrollmentRow| {
            row.record.doc.provisioning_status == Some(ProvisioningStatus::Disabled)
        };
        if request.blocked
            || is_disabled(&enrollment)
            || individual.as_ref().is_some_and(is_disabled)
        {
            let now = now_utc();
            let state = RegistrationState {
                registration_id,
                status: "disabled".to_owned(),
                error_code: Some(i64::from(DISABLED_ERROR_CODE)),
                error_message: Some("the device's enrollment is disabled".to_owned()),
                created_date_time_utc: Some(now.clone()),
                last_updated_date_time_utc: Some(now),
                ..RegistrationState::default()
            };
            return Ok(Some((state, None)));
        }
        let mut tpm_blob = None;
        let device_keys = match kind {
            _ if request.certificate.is_some() => {
                crate::model::enrollment::SymmetricKeys::default()
            }
            EnrollmentKind::Individual
                if enrollment.record.attestation_type()
                    == crate::model::enrollment::AttestationType::Tpm =>
            {
                let (key, blob) = tpm::issued_key(&self.store, &registration_id)
                    .await
                    .map_err(|e| (Some(request.clone()), e.error_code(), e.to_string()))?;
                tpm_blob = Some(blob);
                crate::model::enrollment::SymmetricKeys {
                    primary_key: Some(key.clone()),
                    secondary_key: Some(key),
                }
            }
            EnrollmentKind::Individual => enrollment.record.keys.clone().unwrap_or_default(),
            EnrollmentKind::Group => {
                let keys = enrollment.record.keys.clone().unwrap_or_default();
                let derive = |k: &Option<String>| {
                    k.as_deref().and_then(|k| {
                        crate::attestation::sas::derive_device_key(k, &registration_id).ok()
                    })
                };
                crate::model::enrollment::SymmetricKeys {
                    primary_key: derive(&keys.primary_key),
                    secondary_key: derive(&keys.secondary_key),
                }
            }
        };
        let previous = self
            .store
            .registration(&registration_id)
            .await
            .map_err(|e| internal(Some(&request), &e))?;
        let linked: Vec<crate::hubs::LinkedHub> = self
            .store
            .linked_hubs()
            .await
            .map_err(|e| internal(Some(&request), &e))?
            .into_iter()
            .map(|row| row.hub)
            .collect();
        let custom_request = || crate::allocation::custom::CustomRequest {
            kind,
            enrollment: crate::model::enrollment::redacted(&enrollment.document()),
            registration_id: registration_id.clone(),
            payload: request.payload.clone(),
            current_hub: previous
                .as_ref()
                .filter(|p| p.state.status == "assigned")
                .and_then(|p| p.state.assigned_hub.clone()),
            current_device_id: previous
                .as_ref()
                .filter(|p| p.state.status == "assigned")
                .and_then(|p| p.state.device_id.clone()),
            protocol: request.protocol.as_str().to_owned(),
            client_address: request.client.map(|c| c.to_string()),
            certificate: request.certificate.clone(),
            linked_hubs: custom_candidates(&enrollment.record.doc, &linked),
        };
        let failed = |failure: crate::allocation::custom::CustomFailure| {
            (
                Some(request.clone()),
                failure.error_code(),
                failure.to_string(),
            )
        };
        // Custom allocation runs on every registration, also under "never re-provision",
        // so that new returned data reaches the device (seed, HOOK).
        let custom_decision = if enrollment.record.doc.allocation_policy
            == Some(crate::model::enrollment::AllocationPolicy::Custom)
        {
            Some(
                self.custom
                    .allocate(&enrollment.record.doc, custom_request())
                    .await
                    .map_err(failed)?,
            )
        } else {
            None
        };
        let mut doc = enrollment.record.doc.clone();
        let mut twin_override = custom_decision
            .as_ref()
            .and_then(|d| d.initial_twin.clone());
        let base_input = plan::PlanInput {
            registration_id: &registration_id,
            kind,
            enrollment: &enrollment.record.doc,
            previous: previous.as_ref().map(|r| &r.state),
            linked: &linked,
            client_location: plan::client_location(&self.geo, request.client),
            legacy_api: plan::is_legacy_api_version(request.api_version.as_deref()),
            custom: custom_decision.as_ref(),
        };
        // A reprovisioning rule decides for a device that is already assigned.
        if let Some(existing) = previous.as_ref().filter(|p| p.state.status == "assigned") {
            if doc
                .policy_binding
                .as_ref()
                .is_some_and(|b| b.reprovisioning.is_some())
            {
                let proposed = plan::allocate(&base_input)
                    .map_err(|e| (Some(request.clone()), e.error_code(), e.to_string()))?;
                let existing_wit = crate::policy::bindings::types::ExistingRegistration {
                    hub: existing.state.assigned_hub.clone().unwrap_or_default(),
                    device_id: existing.state.device_id.clone().unwrap_or_default(),
                    substatus: existing.state.substatus.clone().unwrap_or_default(),
                    assigned_at: existing
                        .state
                        .last_updated_date_time_utc
                        .clone()
                        .unwrap_or_default(),
                };
                if let Some((action, twin)) = self
                    .custom
                    .reprovision(&doc, existing_wit, &custom_request(), &proposed.name)
                    .await
                    .map_err(failed)?
                {
                    let (update, migrate) = match action {
                        custom::RuleAction::Keep => (false, false),
                        custom::RuleAction::Migrate => (true, true),
                        custom::RuleAction::Reset => (true, false),
                    };
                    doc.reprovision_policy = Some(crate::model::enrollment::ReprovisionPolicy {
                        update_hub_assignment: update,
                        migrate_device_data: migrate,
                    });
                    if twin.is_some() {
                        twin_override = twin;
                    }
                }
            }
        }
        let input = plan::PlanInput {
            enrollment: &doc,
            ..base_input
        };
        let mut decision = plan::plan(&input)
            .map_err(|e| (Some(request.clone()), e.error_code(), e.to_string()))?;
        // A returned twin overrides the enrollment's twin and its migration settings (seed).
        if twin_override.is_some() {
            decision.twin = plan::TwinAction::WriteInitial;
        }
        let identity = DeviceIdentity {
            device_id: decision.device_id.clone(),
            primary_key: device_keys.primary_key.clone(),
            secondary_key: device_keys.secondary_key.clone(),
            // X.509 devices go into the hub as `selfSigned` with the leaf's thumbprint, also
            // when a CA-based group admitted them (seed X509-23).
            x509_thumbprint: request
                .certificate
                .as_ref()
                .map(|c| c.sha256_thumbprint.clone()),
            iot_edge: enrollment
                .record
                .doc
                .capabilities
                .is_some_and(|c| c.iot_edge),
        };
        let initial_twin = twin_override
            .unwrap_or_else(|| managed_twin(enrollment.record.doc.initial_twin.as_ref()));
        self.apply(&decision, &identity, &initial_twin, &linked)
            .await
            .map_err(|(hub, error)| {
                (
                    Some(request.clone()),
                    error.error_code(),
                    format!("IoT hub {hub}: {error}"),
                )
            })?;
        let now = now_utc();
        let state = RegistrationState {
            registration_id: registration_id.clone(),
            created_date_time_utc: previous
                .as_ref()
                .and_then(|p| p.state.created_date_time_utc.clone())
                .or_else(|| Some(now.clone())),
            assigned_hub: Some(decision.hub.name.clone()),
            device_id: Some(decision.device_id.clone()),
            status: "assigned".to_owned(),
            substatus: Some(decision.substatus.to_owned()),
            last_updated_date_time_utc: Some(now),
            payload: custom_decision.and_then(|d| d.payload),
            tpm: tpm_blob.map(|authentication_key| {
                crate::model::registration::TpmRegistrationResult { authentication_key }
            }),
            x509: request.certificate.as_ref().map(|_| {
                crate::model::registration::X509RegistrationResult {
                    enrollment_group_id: (kind == EnrollmentKind::Group)
                        .then(|| enrollment.record.id.clone()),
                }
            }),
            ..RegistrationState::default()
        };
        let record = RegistrationRecord {
            state: state.clone(),
            enrollment_group_id: (kind == EnrollmentKind::Group)
                .then(|| enrollment.record.id.clone()),
        };
        Ok(Some((state, Some(record))))
    }

    /// Carries out a plan against the hubs: identity, twin, then the old device's removal.
    async fn apply(
        &self,
        decision: &plan::Plan,
        identity: &DeviceIdentity,
        initial_twin: &Value,
        linked: &[crate::hubs::LinkedHub],
    ) -> Result<(), (String, HubError)> {
        let hub = &decision.hub;
        let at = |error: HubError| (hub.name.clone(), error);
        self.drivers
            .upsert_device(hub, identity)
            .await
            .map_err(at)?;
        match &decision.twin {
            plan::TwinAction::WriteInitial => self
                .drivers
                .replace_twin(hub, &identity.device_id, initial_twin)
                .await
                .map_err(at)?,
            plan::TwinAction::CopyFrom {
                hub: old_hub,
                device_id,
            } => {
                let source = linked.iter().find(|h| h.name.eq_ignore_ascii_case(old_hub));
                let twin = match source {
                    Some(source) => self
                        .drivers
                        .get_twin(source, device_id)
                        .await
                        .map_err(|e| (source.name.clone(), e))?,
                    None => None,
                };
                let twin = twin.unwrap_or_else(|| initial_twin.clone());
                self.drivers
                    .replace_twin(hub, &identity.device_id, &twin)
                    .await
                    .map_err(at)?;
            }
            plan::TwinAction::Keep => {}
        }
        if let Some((old_hub, old_device)) = &decision.delete {
            self.drivers
                .delete_device(old_hub, old_device)
                .await
                .map_err(|e| (old_hub.name.clone(), e))?;
        }
        Ok(())
    }
}

/// The hubs a custom allocation may choose: the linked hubs the enrollment names, or every
/// linked hub when it names none.
fn custom_candidates(
    enrollment: &crate::model::enrollment::Enrollment,
    linked: &[crate::hubs::LinkedHub],
) -> Vec<crate::hubs::LinkedHub> {
    let named: Vec<&str> = match (&enrollment.iot_hubs, &enrollment.iot_hub_host_name) {
        (Some(hubs), _) if !hubs.is_empty() => hubs.iter().map(String::as_str).collect(),
        (_, Some(hub)) => vec![hub.as_str()],
        _ => return linked.to_vec(),
    };
    linked
        .iter()
        .filter(|hub| named.iter().any(|n| n.eq_ignore_ascii_case(&hub.name)))
        .cloned()
        .collect()
}

/// One `DeviceOperations` log entry with the seed's fields (MON-06/07).
fn device_log(
    operation_name: &str,
    result_type: &str,
    result_signature: u16,
    description: Option<&str>,
    started: Instant,
    call: &DeviceCall<'_>,
    operation_id: Option<&str>,
) {
    let properties = serde_json::json!({
        "id": call.registration_id,
        "type": "Registration",
        "protocol": call.protocol.as_str(),
    });
    tracing::info!(
        target: "berth::device_operations",
        category = "DeviceOperations",
        operation_name,
        operation_version = "March2019",
        result_type,
        result_signature,
        result_description = description.unwrap_or(""),
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        caller_ip_address = crate::telemetry::masked_address(call.client).as_str(),
        correlation_id = operation_id.unwrap_or(""),
        properties = %properties,
        "device operation"
    );
}

/// Runs housekeeping every few minutes until the process ends.
pub fn spawn_housekeeping(provisioning: Arc<Provisioning>) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(300));
        loop {
            interval.tick().await;
            provisioning.housekeeping().await;
        }
    });
}
