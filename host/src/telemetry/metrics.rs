//! Prometheus metrics (`/metrics`). Series names follow the seed's metric names in
//! snake case: `AttestationAttempts` → `berth_attestation_attempts_total`, and so on.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceOperationLabels {
    pub operation: String,
    pub resource_type: String,
    pub result_type: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestationLabels {
    pub status: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrationLabels {
    pub iot_hub_name: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AssignmentLabels {
    pub iot_hub_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub outcome: String,
}

/// Every series Berth exports, registered once per process.
pub struct Metrics {
    registry: Registry,
    pub service_operations: Family<ServiceOperationLabels, Counter>,
    pub service_operation_seconds: Family<ServiceOperationLabels, Histogram>,
    pub attestation_attempts: Family<AttestationLabels, Counter>,
    pub registration_attempts: Family<RegistrationLabels, Counter>,
    pub device_assignments: Family<AssignmentLabels, Counter>,
    /// Policy calls by policy version and outcome (ok, refused, error).
    pub policy_calls: Family<PolicyLabels, Counter>,
    pub policy_call_seconds: Family<PolicyLabels, Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let service_operations = Family::<ServiceOperationLabels, Counter>::default();
        let service_operation_seconds =
            Family::<ServiceOperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
            });
        let attestation_attempts = Family::<AttestationLabels, Counter>::default();
        let registration_attempts = Family::<RegistrationLabels, Counter>::default();
        let device_assignments = Family::<AssignmentLabels, Counter>::default();
        let policy_calls = Family::<PolicyLabels, Counter>::default();
        let policy_call_seconds = Family::<PolicyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
        });
        registry.register(
            "service_operations",
            "Service API operations by result (ServiceOperations)",
            service_operations.clone(),
        );
        registry.register(
            "service_operation_duration_seconds",
            "Service API operation latency",
            service_operation_seconds.clone(),
        );
        registry.register(
            "attestation_attempts",
            "Device attestations attempted (AttestationAttempts)",
            attestation_attempts.clone(),
        );
        registry.register(
            "registration_attempts",
            "Device registrations attempted (RegistrationAttempts)",
            registration_attempts.clone(),
        );
        registry.register(
            "device_assignments",
            "Devices assigned to a hub (DeviceAssignments)",
            device_assignments.clone(),
        );
        registry.register(
            "policy_calls",
            "WebAssembly policy calls by outcome",
            policy_calls.clone(),
        );
        registry.register(
            "policy_call_duration_seconds",
            "WebAssembly policy call wall time",
            policy_call_seconds.clone(),
        );
        Self {
            registry,
            service_operations,
            service_operation_seconds,
            attestation_attempts,
            registration_attempts,
            device_assignments,
            policy_calls,
            policy_call_seconds,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
