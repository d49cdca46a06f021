//! Native stand-ins for the host, so policy logic runs under plain `cargo test`.
//!
//! Off `wasm32`, [`config`](crate::config), [`lookup`](crate::lookup) and the
//! [`log`](crate::log) functions read and write an in-memory environment instead of calling
//! the host. The environment is per thread, and the test harness runs each `#[test]` on its
//! own thread, so tests set up their configuration and tables without seeing each other's.
//! The module also builds requests without spelling out every field.
//!
//! ```
//! use berth_policy_sdk::{lookup, testing};
//! use serde_json::json;
//!
//! testing::set_lookup("tenants", "fabrikam", &json!({"hub": "fabrikam-hub"}));
//! assert_eq!(lookup("tenants", "fabrikam"), Some(json!({"hub": "fabrikam-hub"})));
//! assert_eq!(lookup("tenants", "contoso"), None);
//!
//! let request = testing::request("sensor-7")
//!     .hub("fabrikam-hub.azure-devices.net")
//!     .payload(json!({"tenant": "fabrikam"}))
//!     .build();
//! assert_eq!(request.device.registration_id, "sensor-7");
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::Value;

use crate::log::Level;
use crate::{
    AllocationRequest, Attestation, AttestationKind, CertificateFacts, DeviceContext, Enrollment,
    EnrollmentKind, ExistingRegistration, LinkedHub, ReprovisionPolicy, ReprovisionRequest, Twin,
};

#[derive(Default)]
struct Environment {
    config: Option<String>,
    tables: HashMap<String, HashMap<String, String>>,
    logs: Vec<(Level, String)>,
}

thread_local! {
    static ENVIRONMENT: RefCell<Environment> = RefCell::new(Environment::default());
}

/// Sets the binding's configuration that [`config`](crate::config) returns.
pub fn set_config(config: &Value) {
    set_config_text(config.to_string());
}

/// Sets the configuration text verbatim, to test what a policy does with a bad one.
pub fn set_config_text(text: impl Into<String>) {
    ENVIRONMENT.with_borrow_mut(|environment| environment.config = Some(text.into()));
}

/// Removes the configuration.
pub fn clear_config() {
    ENVIRONMENT.with_borrow_mut(|environment| environment.config = None);
}

/// Stores `value` under `key` in the lookup table `table`.
pub fn set_lookup(table: &str, key: &str, value: &Value) {
    ENVIRONMENT.with_borrow_mut(|environment| {
        environment
            .tables
            .entry(table.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_string());
    });
}

/// The lines logged on this thread so far, oldest first.
pub fn logs() -> Vec<(Level, String)> {
    ENVIRONMENT.with_borrow(|environment| environment.logs.clone())
}

/// Forgets this thread's configuration, tables and logs.
pub fn reset() {
    ENVIRONMENT.with_borrow_mut(|environment| *environment = Environment::default());
}

pub(crate) fn config_text() -> Option<String> {
    ENVIRONMENT.with_borrow(|environment| environment.config.clone())
}

pub(crate) fn lookup_text(table: &str, key: &str) -> Option<String> {
    ENVIRONMENT.with_borrow(|environment| environment.tables.get(table)?.get(key).cloned())
}

pub(crate) fn log(level: Level, message: &str) {
    eprintln!("[policy {level:?}] {message}");
    ENVIRONMENT.with_borrow_mut(|environment| environment.logs.push((level, message.to_owned())));
}

/// A linked hub named `name` with `allocation_weight`, applying allocation policies, with no
/// location.
pub fn hub(name: &str, allocation_weight: u32) -> LinkedHub {
    LinkedHub {
        name: name.to_owned(),
        allocation_weight,
        apply_allocation_policy: true,
        location: None,
    }
}

/// A request from the device `registration_id`: a symmetric-key device over MQTT with no
/// payload, matched by the enrollment group `test-group` that names no hubs and has the
/// default reprovisioning policy, and no linked hubs until [`RequestBuilder::hub`] adds some.
pub fn request(registration_id: &str) -> RequestBuilder {
    RequestBuilder {
        request: AllocationRequest {
            enrollment: Enrollment {
                kind: EnrollmentKind::Group,
                id: "test-group".to_owned(),
                device_id: None,
                iot_hubs: Vec::new(),
                initial_twin: None,
                iot_edge: false,
                reprovision_policy: ReprovisionPolicy {
                    update_hub_assignment: true,
                    migrate_device_data: true,
                },
            },
            device: DeviceContext {
                registration_id: registration_id.to_owned(),
                attestation: Attestation {
                    kind: AttestationKind::SymmetricKey,
                    certificate: None,
                    endorsement_key: None,
                },
                payload: None,
                current_hub: None,
                current_device_id: None,
                protocol: "Mqtt".to_owned(),
                client_address: None,
            },
            linked_hubs: Vec::new(),
        },
    }
}

/// Builds an [`AllocationRequest`]; see [`request`].
#[derive(Clone, Debug)]
pub struct RequestBuilder {
    request: AllocationRequest,
}

impl RequestBuilder {
    /// Adds a linked hub of weight 1 that applies allocation policies.
    #[must_use]
    pub fn hub(self, name: &str) -> Self {
        self.linked_hub(hub(name, 1))
    }

    /// Adds a linked hub as given.
    #[must_use]
    pub fn linked_hub(mut self, hub: LinkedHub) -> Self {
        self.request.linked_hubs.push(hub);
        self
    }

    /// Sets the hubs the enrollment names (`iotHubs`).
    #[must_use]
    pub fn enrollment_hubs<'a>(mut self, names: impl IntoIterator<Item = &'a str>) -> Self {
        self.request.enrollment.iot_hubs = names.into_iter().map(str::to_owned).collect();
        self
    }

    /// Makes the enrollment the individual enrollment of this device.
    #[must_use]
    pub fn individual(mut self) -> Self {
        self.request.enrollment.kind = EnrollmentKind::Individual;
        self.request
            .enrollment
            .id
            .clone_from(&self.request.device.registration_id);
        self
    }

    /// Makes the enrollment the group `group_id`.
    #[must_use]
    pub fn group(mut self, group_id: &str) -> Self {
        self.request.enrollment.kind = EnrollmentKind::Group;
        group_id.clone_into(&mut self.request.enrollment.id);
        self
    }

    /// Sets the enrollment's initial twin.
    #[must_use]
    pub fn initial_twin(mut self, twin: &Twin) -> Self {
        self.request.enrollment.initial_twin = Some(twin.to_json());
        self
    }

    /// Sets the device's payload.
    #[must_use]
    pub fn payload(self, payload: impl Into<Value>) -> Self {
        let payload: Value = payload.into();
        self.payload_text(payload.to_string())
    }

    /// Sets the device's payload text verbatim.
    #[must_use]
    pub fn payload_text(mut self, text: impl Into<String>) -> Self {
        self.request.device.payload = Some(text.into());
        self
    }

    /// Makes the device an X.509 device presenting `certificate`.
    #[must_use]
    pub fn x509(mut self, certificate: CertificateFacts) -> Self {
        self.request.device.attestation = Attestation {
            kind: AttestationKind::X509,
            certificate: Some(certificate),
            endorsement_key: None,
        };
        self
    }

    /// Makes the device a TPM device with `endorsement_key`.
    #[must_use]
    pub fn tpm(mut self, endorsement_key: &str) -> Self {
        self.request.device.attestation = Attestation {
            kind: AttestationKind::Tpm,
            certificate: None,
            endorsement_key: Some(endorsement_key.to_owned()),
        };
        self
    }

    /// Marks the device as registered on `hub` as `device_id` (a re-registration).
    #[must_use]
    pub fn current(mut self, hub: &str, device_id: &str) -> Self {
        self.request.device.current_hub = Some(hub.to_owned());
        self.request.device.current_device_id = Some(device_id.to_owned());
        self
    }

    /// Sets the protocol: `Http`, `Mqtt`, `MqttWs`, `Amqp` or `AmqpWs`.
    #[must_use]
    pub fn protocol(mut self, protocol: &str) -> Self {
        protocol.clone_into(&mut self.request.device.protocol);
        self
    }

    /// The request.
    pub fn build(self) -> AllocationRequest {
        self.request
    }

    /// A reprovisioning request: the device, registered on `existing_hub`, registers again and
    /// the allocation proposes `proposed_hub`.
    pub fn reprovision(self, existing_hub: &str, proposed_hub: &str) -> ReprovisionRequest {
        let device_id = self.request.device.registration_id.clone();
        ReprovisionRequest {
            existing: ExistingRegistration {
                hub: existing_hub.to_owned(),
                device_id,
                substatus: "initialAssignment".to_owned(),
                assigned_at: "2026-01-01T00:00:00Z".to_owned(),
            },
            request: self.request,
            proposed_hub: proposed_hub.to_owned(),
        }
    }
}

/// Certificate facts for a leaf whose subject is `CN=<common_name>`, with made-up issuer,
/// thumbprints and validity; add the organization and unit with the `with_*` methods.
pub fn certificate(common_name: &str) -> CertificateFacts {
    CertificateFacts {
        subject_name: format!("CN={common_name}"),
        issuer_name: "CN=Test Root CA".to_owned(),
        common_name: Some(common_name.to_owned()),
        organization: None,
        organizational_unit: None,
        sha1_thumbprint: "0".repeat(40),
        sha256_thumbprint: "0".repeat(64),
        not_before: "2026-01-01T00:00:00Z".to_owned(),
        not_after: "2036-01-01T00:00:00Z".to_owned(),
        subject_alternative_names: Vec::new(),
        serial_number: "01".to_owned(),
        subject_attributes: vec![("CN".to_owned(), common_name.to_owned())],
        issuer_attributes: vec![("CN".to_owned(), "Test Root CA".to_owned())],
        chain: Vec::new(),
    }
}

impl CertificateFacts {
    /// Sets the subject's organization (O), keeping the subject name in step.
    #[must_use]
    pub fn with_organization(mut self, organization: &str) -> Self {
        self.organization = Some(organization.to_owned());
        self.subject_name = format!("{}, O={organization}", self.subject_name);
        self.subject_attributes
            .push(("O".to_owned(), organization.to_owned()));
        self
    }

    /// Sets the subject's organizational unit (OU), keeping the subject name in step.
    #[must_use]
    pub fn with_organizational_unit(mut self, unit: &str) -> Self {
        self.organizational_unit = Some(unit.to_owned());
        self.subject_name = format!("{}, OU={unit}", self.subject_name);
        self.subject_attributes
            .push(("OU".to_owned(), unit.to_owned()));
        self
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::log::{self, Level};
    use crate::{config, config_as, lookup, testing, ConfigError};

    #[test]
    fn capabilities_read_this_threads_environment() {
        assert_eq!(config(), None);
        assert_eq!(config_as::<serde_json::Value>(), Err(ConfigError::Missing));
        testing::set_config(&json!({"minimumFirmware": "1.2.0"}));
        assert_eq!(config(), Some(json!({"minimumFirmware": "1.2.0"})));
        assert!(matches!(
            config_as::<Vec<u8>>(),
            Err(ConfigError::Invalid(_))
        ));
        testing::set_config_text("{broken");
        assert_eq!(config(), None);

        testing::set_lookup("tenants", "a", &json!("hub-a"));
        assert_eq!(lookup("tenants", "a"), Some(json!("hub-a")));
        assert_eq!(lookup("tenants", "b"), None);
        assert_eq!(lookup("other", "a"), None);

        log::info("chose hub-a");
        log::warn(format!("{} left", 2));
        assert_eq!(
            testing::logs(),
            [
                (Level::Info, "chose hub-a".to_owned()),
                (Level::Warn, "2 left".to_owned())
            ]
        );
        testing::reset();
        assert!(testing::logs().is_empty());
        assert_eq!(config(), None);
    }

    #[test]
    fn environments_do_not_leak_between_threads() {
        testing::set_config(&json!(1));
        std::thread::spawn(|| assert_eq!(config(), None))
            .join()
            .unwrap();
    }
}
