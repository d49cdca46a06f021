//! Firmware quarantine: a device whose payload reports a firmware version below the configured
//! minimum goes to the quarantine hub; every other device is spread over the enrollment's
//! other hubs by weight, the same device always landing on the same hub. Its companion
//! reprovisioning rule, `quarantine-rule`, moves registered devices in and out. See README.md.

use std::cmp::Ordering;

use berth_policy_sdk::{
    config_as, export_allocation_policy, log, payload_value, weighted_choice, Allocation,
    AllocationError, AllocationPolicy, AllocationRequest, Twin,
};
use serde::Deserialize;
use serde_json::json;

/// The binding's configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Settings {
    /// The lowest firmware version allowed out of quarantine, e.g. "1.2.0".
    minimum_firmware: String,
    /// The quarantine hub: a linked hub's host name or its first label.
    quarantine_hub: String,
    /// The payload field that carries the firmware version.
    #[serde(default = "default_firmware_field")]
    firmware_field: String,
    /// Whether a device that reports no (readable) version is quarantined.
    #[serde(default = "yes")]
    quarantine_unreported: bool,
}

fn default_firmware_field() -> String {
    "firmwareVersion".to_owned()
}

fn yes() -> bool {
    true
}

struct Quarantine;

impl AllocationPolicy for Quarantine {
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
        let settings: Settings = config_as()?;
        let minimum = Version::parse(&settings.minimum_firmware).ok_or_else(|| {
            log::error(format!(
                "minimumFirmware '{}' is not a version",
                settings.minimum_firmware
            ));
            AllocationError::failed(
                "the policy configuration is invalid: minimumFirmware is not a version",
            )
        })?;
        let quarantine_hub = request
            .linked_hub(&settings.quarantine_hub)
            .ok_or_else(|| {
                log::error(format!(
                    "the quarantine hub '{}' is not among the enrollment's hubs",
                    settings.quarantine_hub
                ));
                AllocationError::failed("the quarantine hub is not available")
            })?;

        let reported = payload_value(&request.device).and_then(|payload| {
            payload
                .get(&settings.firmware_field)?
                .as_str()
                .map(str::to_owned)
        });
        let reason = match reported.as_deref().map(|text| (text, Version::parse(text))) {
            Some((_, Some(version))) if version >= minimum => None,
            Some((text, Some(_))) => Some(format!(
                "firmware {text} is below {}",
                settings.minimum_firmware
            )),
            Some((text, None)) if settings.quarantine_unreported => Some(format!(
                "firmware version '{}' is not understood",
                truncate(text)
            )),
            None if settings.quarantine_unreported => {
                Some("no firmware version reported".to_owned())
            }
            Some((_, None)) | None => None,
        };
        let registration_id = &request.device.registration_id;

        if let Some(reason) = reason {
            log::info(format!("{registration_id} quarantined: {reason}"));
            let twin = Twin::of_enrollment(&request.enrollment).tag(
                "quarantine",
                json!({"reason": reason, "minimumFirmware": settings.minimum_firmware}),
            );
            return Ok(Allocation::to_hub(&quarantine_hub.name)
                .with_twin(twin)
                .with_payload(json!({
                    "quarantined": true,
                    "reason": reason,
                    "minimumFirmware": settings.minimum_firmware,
                })));
        }

        let healthy_hubs = request
            .candidate_hubs()
            .filter(|hub| hub.name != quarantine_hub.name);
        let hub = weighted_choice(healthy_hubs, registration_id).ok_or_else(|| {
            log::error("the enrollment offers no hub besides the quarantine hub");
            AllocationError::failed("no hub outside quarantine is available")
        })?;
        log::debug(format!("{registration_id} is healthy: {}", hub.name));
        Ok(Allocation::to_hub(&hub.name).with_payload(json!({"quarantined": false})))
    }
}

export_allocation_policy!(Quarantine);

/// A dotted numeric version ("1.2.0", "v12.0.2.5"); missing trailing parts count as 0.
#[derive(Debug)]
struct Version(Vec<u64>);

impl Version {
    /// At most 8 parts of digits, an optional leading `v`; anything else is not a version.
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.strip_prefix(['v', 'V']).unwrap_or(text);
        let parts = text
            .split('.')
            .map(|part| {
                if part.is_empty() || !part.bytes().all(|byte| byte.is_ascii_digit()) {
                    return None;
                }
                part.parse().ok()
            })
            .collect::<Option<Vec<u64>>>()?;
        (parts.len() <= 8).then_some(Self(parts))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let length = self.0.len().max(other.0.len());
        let part = |version: &Self, index: usize| version.0.get(index).copied().unwrap_or(0);
        (0..length)
            .map(|index| part(self, index).cmp(&part(other, index)))
            .find(|ordering| ordering.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

/// At most 32 characters of device-sent text, for messages.
fn truncate(text: &str) -> String {
    text.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use berth_policy_sdk::{testing, AllocationError, AllocationPolicy, AllocationRequest, Twin};
    use serde_json::{json, Value};

    use super::{Quarantine, Version};

    const QUARANTINE: &str = "contoso-quarantine.azure-devices.net";
    const EAST: &str = "contoso-east.azure-devices.net";
    const WEST: &str = "contoso-west.azure-devices.net";

    fn configure() {
        testing::set_config(
            &json!({"minimumFirmware": "1.2.0", "quarantineHub": "contoso-quarantine"}),
        );
    }

    fn reporting(registration_id: &str, payload: Value) -> AllocationRequest {
        testing::request(registration_id)
            .hub(EAST)
            .hub(QUARANTINE)
            .hub(WEST)
            .payload(payload)
            .build()
    }

    fn payload_of(allocation: &berth_policy_sdk::Allocation) -> Value {
        serde_json::from_str(allocation.payload.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn old_firmware_goes_to_quarantine_with_a_tag_and_a_payload() {
        configure();
        let allocation =
            Quarantine::allocate(reporting("sensor-1", json!({"firmwareVersion": "1.1.9"})))
                .unwrap();
        assert_eq!(allocation.hub, QUARANTINE);
        let twin = Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap();
        assert_eq!(
            twin.tags()["quarantine"],
            json!({"reason": "firmware 1.1.9 is below 1.2.0", "minimumFirmware": "1.2.0"})
        );
        assert_eq!(payload_of(&allocation)["quarantined"], json!(true));
    }

    #[test]
    fn good_firmware_is_spread_over_the_other_hubs_stably() {
        configure();
        let mut seen = std::collections::HashSet::new();
        for index in 0..64 {
            let registration_id = format!("sensor-{index}");
            let request = reporting(&registration_id, json!({"firmwareVersion": "1.2"}));
            let allocation = Quarantine::allocate(request.clone()).unwrap();
            assert_ne!(allocation.hub, QUARANTINE);
            assert_eq!(allocation.initial_twin, None);
            assert_eq!(payload_of(&allocation), json!({"quarantined": false}));
            assert_eq!(Quarantine::allocate(request).unwrap().hub, allocation.hub);
            seen.insert(allocation.hub);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn unreported_or_unreadable_firmware_is_quarantined_unless_configured_otherwise() {
        configure();
        for payload in [
            json!({}),
            json!({"firmwareVersion": "latest"}),
            json!({"firmwareVersion": 2}),
        ] {
            assert_eq!(
                Quarantine::allocate(reporting("sensor-1", payload))
                    .unwrap()
                    .hub,
                QUARANTINE
            );
        }
        let no_payload = testing::request("sensor-1")
            .hub(EAST)
            .hub(QUARANTINE)
            .build();
        assert_eq!(
            Quarantine::allocate(no_payload.clone()).unwrap().hub,
            QUARANTINE
        );

        testing::set_config(&json!({
            "minimumFirmware": "1.2.0",
            "quarantineHub": QUARANTINE,
            "quarantineUnreported": false,
        }));
        assert_eq!(Quarantine::allocate(no_payload).unwrap().hub, EAST);
    }

    #[test]
    fn firmware_field_is_configurable() {
        testing::set_config(&json!({
            "minimumFirmware": "12.0.2.5",
            "quarantineHub": "contoso-quarantine",
            "firmwareField": "MyDeviceFirmwareVersion",
        }));
        let request = reporting(
            "contoso-toaster-007",
            json!({"MyDeviceFirmwareVersion": "12.0.2.5"}),
        );
        assert_ne!(Quarantine::allocate(request).unwrap().hub, QUARANTINE);
    }

    #[test]
    fn configuration_problems_fail_the_registration() {
        let request = reporting("sensor-1", json!({"firmwareVersion": "2.0"}));
        assert_eq!(
            Quarantine::allocate(request.clone()).unwrap_err(),
            AllocationError::Failed("the policy has no configuration".to_owned())
        );
        testing::set_config(&json!({"minimumFirmware": "1.2.0"}));
        assert!(
            matches!(Quarantine::allocate(request.clone()), Err(AllocationError::Failed(m)) if m.contains("quarantineHub"))
        );
        testing::set_config(&json!({"minimumFirmware": "one", "quarantineHub": QUARANTINE}));
        assert!(
            matches!(Quarantine::allocate(request.clone()), Err(AllocationError::Failed(m)) if m.contains("minimumFirmware"))
        );
        testing::set_config(&json!({"minimumFirmware": "1.0", "quarantineHub": "elsewhere"}));
        assert_eq!(
            Quarantine::allocate(request).unwrap_err(),
            AllocationError::Failed("the quarantine hub is not available".to_owned())
        );
    }

    #[test]
    fn enrollment_with_only_the_quarantine_hub_fails_healthy_devices() {
        configure();
        let request = testing::request("sensor-1")
            .hub(QUARANTINE)
            .payload(json!({"firmwareVersion": "3.0.0"}))
            .build();
        assert_eq!(
            Quarantine::allocate(request).unwrap_err(),
            AllocationError::Failed("no hub outside quarantine is available".to_owned())
        );
    }

    #[test]
    fn versions_compare_numerically_part_by_part() {
        let version = |text| Version::parse(text).unwrap();
        assert!(version("1.10.0") > version("1.9.9"));
        assert_eq!(version("1.2"), version("1.2.0.0"));
        assert_eq!(version("v2.0"), version("2"));
        assert!(version("12.0.2.5") > version("12.0.2"));
        for bad in [
            "",
            "1..2",
            "1.2-beta",
            "1.2.",
            "a",
            "1.2.3.4.5.6.7.8.9",
            "99999999999999999999",
        ] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
    }
}
