//! Conveniences on the interface types: building answers, reading the payload, finding hubs.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    Allocation, AllocationError, AllocationRequest, DeviceContext, LinkedHub, ReprovisionAction,
    ReprovisionDecision, Twin,
};

/// The device's payload deserialized into `T`; `None` when the device sent none or it does not
/// have the shape of `T`.
///
/// ```
/// # use berth_policy_sdk::{payload, testing};
/// #[derive(serde::Deserialize)]
/// struct Tenant {
///     tenant: String,
/// }
///
/// let request = testing::request("sensor-1").payload(serde_json::json!({"tenant": "fabrikam"})).build();
/// let named: Option<Tenant> = payload(&request.device);
/// assert_eq!(named.unwrap().tenant, "fabrikam");
/// ```
pub fn payload<T: DeserializeOwned>(device: &DeviceContext) -> Option<T> {
    serde_json::from_str(device.payload.as_deref()?).ok()
}

/// The device's payload as a JSON value; `None` when the device sent none.
pub fn payload_value(device: &DeviceContext) -> Option<Value> {
    serde_json::from_str(device.payload.as_deref()?).ok()
}

/// Picks one of `hubs` in proportion to their allocation weights, by a stable hash of `key`
/// (usually the registration ID): the same key and hubs give the same hub on every call and on
/// every node, so a re-registering device is not shuffled. Hubs of weight 0 are never picked
/// unless every hub has weight 0; then each is equally likely. `None` when `hubs` is empty.
pub fn weighted_choice<'a>(
    hubs: impl IntoIterator<Item = &'a LinkedHub>,
    key: &str,
) -> Option<&'a LinkedHub> {
    let hubs: Vec<&LinkedHub> = hubs.into_iter().collect();
    let total: u64 = hubs
        .iter()
        .map(|hub| u64::from(hub.allocation_weight))
        .sum();
    let hash = fnv1a(key.as_bytes());
    if total == 0 {
        let count = u64::try_from(hubs.len()).ok().filter(|count| *count > 0)?;
        let index = usize::try_from(hash % count).ok()?;
        return hubs.get(index).copied();
    }
    let mut point = hash % total;
    for hub in hubs {
        let weight = u64::from(hub.allocation_weight);
        if point < weight {
            return Some(hub);
        }
        point -= weight;
    }
    None
}

/// FNV-1a, 64 bits: small, stable across platforms and versions (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// True when `a` and `b` name the same hub: equal ignoring ASCII case, or one is the other's
/// first DNS label (`contoso-hub` and `contoso-hub.azure-devices.net`). Use it to compare a
/// configured hub name with the names in a request.
pub fn same_hub(a: &str, b: &str) -> bool {
    fn first_label(name: &str) -> &str {
        name.split('.').next().unwrap_or(name)
    }
    a.eq_ignore_ascii_case(b)
        || (!b.contains('.') && first_label(a).eq_ignore_ascii_case(b))
        || (!a.contains('.') && first_label(b).eq_ignore_ascii_case(a))
}

impl LinkedHub {
    /// True when this hub is `name`: its host name ignoring ASCII case, or the first label of
    /// its host name (`contoso-hub` names `contoso-hub.azure-devices.net`).
    pub fn is_named(&self, name: &str) -> bool {
        same_hub(&self.name, name)
    }
}

impl AllocationRequest {
    /// The hubs this device may be allocated to: the linked hubs the enrollment names, or,
    /// when it names none, every linked hub that applies allocation policies
    /// (`applyAllocationPolicy`), in the order the host listed them.
    pub fn candidate_hubs(&self) -> impl Iterator<Item = &LinkedHub> {
        let named = &self.enrollment.iot_hubs;
        self.linked_hubs.iter().filter(move |hub| {
            if named.is_empty() {
                hub.apply_allocation_policy
            } else {
                named.iter().any(|name| hub.is_named(name))
            }
        })
    }

    /// The first candidate hub (see [`candidate_hubs`](Self::candidate_hubs)) that satisfies
    /// `predicate`.
    pub fn find_hub(&self, mut predicate: impl FnMut(&LinkedHub) -> bool) -> Option<&LinkedHub> {
        self.candidate_hubs().find(|hub| predicate(hub))
    }

    /// The first candidate hub whose name contains `fragment`, ignoring ASCII case: the DPS
    /// samples' `hubString.Contains("-toasters-")`.
    pub fn hub_containing(&self, fragment: &str) -> Option<&LinkedHub> {
        let fragment = fragment.to_ascii_lowercase();
        self.find_hub(|hub| hub.name.to_ascii_lowercase().contains(&fragment))
    }

    /// The linked hub named `name` (see [`LinkedHub::is_named`]), whether or not the enrollment
    /// names it. A policy's answer must be a linked hub; check names that come from
    /// configuration or lookup tables with this.
    pub fn linked_hub(&self, name: &str) -> Option<&LinkedHub> {
        self.linked_hubs.iter().find(|hub| hub.is_named(name))
    }
}

impl Allocation {
    /// An allocation to `hub` (a linked hub's name), with the enrollment's initial twin, the
    /// device ID the enrollment implies and no payload until the `with_*` methods say otherwise.
    pub fn to_hub(hub: impl Into<String>) -> Self {
        Self {
            hub: hub.into(),
            device_id: None,
            initial_twin: None,
            payload: None,
        }
    }

    /// Replaces the enrollment's initial twin with `twin`. Start from
    /// [`Twin::of_enrollment`] to keep the operator's twin and add to it.
    #[must_use]
    pub fn with_twin(mut self, twin: Twin) -> Self {
        self.initial_twin = Some(twin.into_value().to_string());
        self
    }

    /// Returns `payload` to the device in `registrationState.payload`.
    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Value>) -> Self {
        self.payload = Some(payload.into().to_string());
        self
    }

    /// Names the device `device_id` (individual enrollments; ignored for groups).
    #[must_use]
    pub fn with_device_id(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }
}

impl AllocationError {
    /// DPS 400207: allocation failed, with `message` for the device.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }

    /// DPS 400209: the policy does not authorize this device, with `message`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(message.into())
    }
}

impl ReprovisionDecision {
    /// Stay on the current hub.
    pub fn keep() -> Self {
        Self {
            action: ReprovisionAction::Keep,
            twin: None,
        }
    }

    /// Move to the proposed hub and carry the device's twin along.
    pub fn migrate() -> Self {
        Self {
            action: ReprovisionAction::Migrate,
            twin: None,
        }
    }

    /// Move to the proposed hub and start from the initial configuration.
    pub fn reset() -> Self {
        Self {
            action: ReprovisionAction::Reset,
            twin: None,
        }
    }

    /// Replaces the twin that is written with `twin`.
    #[must_use]
    pub fn with_twin(mut self, twin: Twin) -> Self {
        self.twin = Some(twin.into_value().to_string());
        self
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{same_hub, weighted_choice};
    use crate::testing::{self, hub};
    use crate::{payload_value, Allocation, Twin};

    #[test]
    fn hub_names_match_host_names_and_their_first_label() {
        assert!(same_hub(
            "Contoso-Hub.azure-devices.net",
            "contoso-hub.azure-devices.net"
        ));
        assert!(same_hub("contoso-hub.azure-devices.net", "contoso-hub"));
        assert!(same_hub("contoso-hub", "contoso-hub.azure-devices.net"));
        assert!(!same_hub("contoso-hub.azure-devices.net", "contoso"));
        assert!(!same_hub("contoso-hub.a.net", "contoso-hub.b.net"));
    }

    #[test]
    fn candidates_are_the_enrollment_hubs_or_the_hubs_applying_policies() {
        let mut quiet = hub("quiet.azure-devices.net", 1);
        quiet.apply_allocation_policy = false;
        let request = testing::request("device")
            .linked_hub(hub("a.azure-devices.net", 1))
            .linked_hub(quiet)
            .build();
        let names: Vec<&str> = request
            .candidate_hubs()
            .map(|hub| hub.name.as_str())
            .collect();
        assert_eq!(names, ["a.azure-devices.net"]);

        let request = testing::request("device")
            .hub("a.azure-devices.net")
            .hub("b.azure-devices.net")
            .enrollment_hubs(["b.azure-devices.net"])
            .build();
        let names: Vec<&str> = request
            .candidate_hubs()
            .map(|hub| hub.name.as_str())
            .collect();
        assert_eq!(names, ["b.azure-devices.net"]);
        assert_eq!(request.linked_hub("a").unwrap().name, "a.azure-devices.net");
        assert!(request.hub_containing("A.AZURE").is_none());
        assert!(request.hub_containing("B.AZURE").is_some());
    }

    #[test]
    fn weighted_choice_is_stable_and_follows_weights() {
        let hubs = [hub("a", 1), hub("b", 3), hub("none", 0)];
        let first = weighted_choice(&hubs, "device-42").unwrap().name.clone();
        assert_eq!(weighted_choice(&hubs, "device-42").unwrap().name, first);
        let mut counts = std::collections::HashMap::new();
        for index in 0..4000 {
            let chosen = weighted_choice(&hubs, &format!("device-{index}")).unwrap();
            *counts.entry(chosen.name.clone()).or_insert(0) += 1;
        }
        assert!(!counts.contains_key("none"));
        assert!((800..1200).contains(&counts["a"]), "{counts:?}");
        assert!(weighted_choice(&[hub("z", 0)], "x").is_some());
        assert!(weighted_choice(&[], "x").is_none());
    }

    #[test]
    fn allocation_builder_fills_the_json_fields() {
        let allocation = Allocation::to_hub("a")
            .with_twin(Twin::new().tag("k", "v"))
            .with_payload(json!({"division": "toasters"}))
            .with_device_id("d");
        assert_eq!(allocation.hub, "a");
        assert_eq!(allocation.device_id.as_deref(), Some("d"));
        assert_eq!(
            allocation.payload.as_deref(),
            Some(r#"{"division":"toasters"}"#)
        );
        assert_eq!(
            Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap(),
            Twin::new().tag("k", "v")
        );
    }

    #[test]
    fn payload_that_is_not_json_reads_as_none() {
        let request = testing::request("device").payload_text("{not json").build();
        assert_eq!(payload_value(&request.device), None);
    }
}
