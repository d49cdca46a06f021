//! The custom allocation function of the DPS tutorial "Use custom allocation policies" as a
//! Berth policy: toasters (`-contoso-tstrsd-007`) go to the `-toasters-` hub, heat pumps
//! (`-contoso-hpsd-088`) to the `-heatpumps-` hub, each with its initial twin; anything else is
//! refused with the tutorial's messages. See README.md.

use berth_policy_sdk::{
    export_allocation_policy, log, Allocation, AllocationError, AllocationPolicy,
    AllocationRequest, Twin,
};
use serde_json::json;

/// A Contoso division: which devices it owns, which hub serves it, how its devices start.
struct Division {
    /// The division's name, returned to the device in the payload.
    name: &'static str,
    /// Devices whose registration ID contains this belong to the division.
    registration_marker: &'static str,
    /// The division's hub is the linked hub whose name contains this.
    hub_marker: &'static str,
    /// The refusal when no such hub is linked.
    missing_hub: &'static str,
    initial_twin: fn() -> Twin,
}

const DIVISIONS: [Division; 2] = [
    Division {
        name: "toasters",
        registration_marker: "-contoso-tstrsd-007",
        hub_marker: "-toasters-",
        missing_hub: "No toasters hub found for the enrollment.",
        initial_twin: || {
            Twin::new()
                .tag("deviceType", "toaster")
                .desired("state", "ready")
                .desired("darknessSetting", "medium")
        },
    },
    Division {
        name: "heatpumps",
        // The tutorial's text, device IDs and output say 088; its function's code says 008.
        registration_marker: "-contoso-hpsd-088",
        hub_marker: "-heatpumps-",
        missing_hub: "No heat pumps hub found for the enrollment.",
        initial_twin: || {
            Twin::new()
                .tag("deviceType", "heatpump")
                .desired("state", "on")
                .desired("temperatureSetting", "65")
        },
    },
];

struct ContosoDivisions;

impl AllocationPolicy for ContosoDivisions {
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
        let registration_id = &request.device.registration_id;
        if request.linked_hubs.is_empty() {
            log::info("no linked hubs");
            return Err(AllocationError::failed(
                "No hub group defined for the enrollment.",
            ));
        }
        let Some(division) = DIVISIONS
            .iter()
            .find(|division| registration_id.contains(division.registration_marker))
        else {
            log::info(format!("unknown device registration {registration_id}"));
            return Err(AllocationError::failed("Unrecognized device registration."));
        };
        let Some(hub) = request.hub_containing(division.hub_marker) else {
            log::info(division.missing_hub);
            return Err(AllocationError::failed(division.missing_hub));
        };
        log::info(format!(
            "{registration_id} belongs to {}: {}",
            division.name, hub.name
        ));
        Ok(Allocation::to_hub(&hub.name)
            .with_twin((division.initial_twin)())
            .with_payload(json!({"division": division.name})))
    }
}

export_allocation_policy!(ContosoDivisions);

#[cfg(test)]
mod tests {
    use berth_policy_sdk::{testing, AllocationError, AllocationPolicy, AllocationRequest, Twin};
    use serde_json::json;

    use super::ContosoDivisions;

    const TOASTERS: &str = "contoso-toasters-hub-1098.azure-devices.net";
    const HEAT_PUMPS: &str = "contoso-heatpumps-hub-1098.azure-devices.net";

    fn both_hubs(registration_id: &str) -> AllocationRequest {
        testing::request(registration_id)
            .hub(TOASTERS)
            .hub(HEAT_PUMPS)
            .build()
    }

    #[test]
    fn toaster_goes_to_the_toasters_hub_ready_and_medium() {
        let allocation =
            ContosoDivisions::allocate(both_hubs("breakroom499-contoso-tstrsd-007")).unwrap();
        assert_eq!(allocation.hub, TOASTERS);
        assert_eq!(
            Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap(),
            Twin::new()
                .tag("deviceType", "toaster")
                .desired("state", "ready")
                .desired("darknessSetting", "medium")
        );
        let payload: serde_json::Value =
            serde_json::from_str(allocation.payload.as_deref().unwrap()).unwrap();
        assert_eq!(payload, json!({"division": "toasters"}));
        assert_eq!(allocation.device_id, None);
    }

    #[test]
    fn heat_pump_goes_to_the_heatpumps_hub_on_at_65() {
        let allocation =
            ContosoDivisions::allocate(both_hubs("mainbuilding167-contoso-hpsd-088")).unwrap();
        assert_eq!(allocation.hub, HEAT_PUMPS);
        assert_eq!(
            Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap(),
            Twin::new()
                .tag("deviceType", "heatpump")
                .desired("state", "on")
                .desired("temperatureSetting", "65")
        );
        assert_eq!(
            allocation.payload.as_deref(),
            Some(r#"{"division":"heatpumps"}"#)
        );
    }

    #[test]
    fn unrecognized_registration_fails_like_the_tutorial() {
        for registration_id in [
            "contoso-heatpump-088",
            "contoso-toaster-007",
            "mainbuilding167-contoso-hpsd-008",
        ] {
            assert_eq!(
                ContosoDivisions::allocate(both_hubs(registration_id)).unwrap_err(),
                AllocationError::Failed("Unrecognized device registration.".to_owned()),
                "{registration_id}"
            );
        }
    }

    #[test]
    fn toaster_without_a_toasters_hub_fails() {
        let request = testing::request("breakroom499-contoso-tstrsd-007")
            .hub(HEAT_PUMPS)
            .build();
        assert_eq!(
            ContosoDivisions::allocate(request).unwrap_err(),
            AllocationError::Failed("No toasters hub found for the enrollment.".to_owned())
        );
        let request = testing::request("mainbuilding167-contoso-hpsd-088")
            .hub(TOASTERS)
            .build();
        assert_eq!(
            ContosoDivisions::allocate(request).unwrap_err(),
            AllocationError::Failed("No heat pumps hub found for the enrollment.".to_owned())
        );
    }

    #[test]
    fn enrollment_without_hubs_fails() {
        let request = testing::request("breakroom499-contoso-tstrsd-007").build();
        assert_eq!(
            ContosoDivisions::allocate(request).unwrap_err(),
            AllocationError::Failed("No hub group defined for the enrollment.".to_owned())
        );
    }

    #[test]
    fn only_the_hubs_the_enrollment_names_are_considered() {
        let request = testing::request("breakroom499-contoso-tstrsd-007")
            .hub("contoso-toasters-old-1.azure-devices.net")
            .hub(TOASTERS)
            .enrollment_hubs([TOASTERS])
            .build();
        assert_eq!(ContosoDivisions::allocate(request).unwrap().hub, TOASTERS);
    }
}
