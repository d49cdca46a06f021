//! The reprovisioning rule that goes with the `quarantine` allocation policy: when a
//! registered device registers again, it moves into or out of the quarantine hub with its
//! twin, and otherwise stays where it is. See README.md.

use berth_policy_sdk::{
    config_as, export_reprovisioning_rule, log, same_hub, ReprovisionDecision, ReprovisionRequest,
    ReprovisioningRule,
};
use serde::Deserialize;

/// The part of the binding's configuration this rule reads (the `quarantine` policy's
/// configuration, shared by the binding, has more).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Settings {
    /// The quarantine hub: a linked hub's host name or its first label.
    quarantine_hub: String,
}

struct QuarantineRule;

impl ReprovisioningRule for QuarantineRule {
    fn decide(request: ReprovisionRequest) -> Result<ReprovisionDecision, String> {
        let settings: Settings = config_as().map_err(|error| error.to_string())?;
        let existing = &request.existing.hub;
        let proposed = &request.proposed_hub;
        let registration_id = &request.request.device.registration_id;
        let quarantined = |hub: &str| same_hub(hub, &settings.quarantine_hub);

        if same_hub(existing, proposed) {
            return Ok(ReprovisionDecision::keep());
        }
        if quarantined(proposed) {
            log::info(format!(
                "{registration_id} enters quarantine: {existing} → {proposed}"
            ));
            return Ok(ReprovisionDecision::migrate());
        }
        if quarantined(existing) {
            log::info(format!(
                "{registration_id} leaves quarantine: {existing} → {proposed}"
            ));
            return Ok(ReprovisionDecision::migrate());
        }
        if request
            .request
            .candidate_hubs()
            .any(|hub| hub.is_named(existing))
        {
            log::debug(format!(
                "{registration_id} stays on {existing} (proposed {proposed})"
            ));
            return Ok(ReprovisionDecision::keep());
        }
        log::info(format!(
            "{registration_id} leaves {existing}, no longer offered: → {proposed}"
        ));
        Ok(ReprovisionDecision::migrate())
    }
}

export_reprovisioning_rule!(QuarantineRule);

#[cfg(test)]
mod tests {
    use berth_policy_sdk::{testing, ReprovisionAction, ReprovisionRequest, ReprovisioningRule};
    use serde_json::json;

    use super::QuarantineRule;

    const QUARANTINE: &str = "contoso-quarantine.azure-devices.net";
    const EAST: &str = "contoso-east.azure-devices.net";
    const WEST: &str = "contoso-west.azure-devices.net";

    fn moving(existing: &str, proposed: &str) -> ReprovisionRequest {
        testing::set_config(
            &json!({"minimumFirmware": "1.2.0", "quarantineHub": "contoso-quarantine"}),
        );
        testing::request("sensor-1")
            .hub(EAST)
            .hub(QUARANTINE)
            .hub(WEST)
            .reprovision(existing, proposed)
    }

    fn action(request: ReprovisionRequest) -> ReprovisionAction {
        QuarantineRule::decide(request).unwrap().action
    }

    #[test]
    fn devices_enter_and_leave_quarantine_with_their_twin() {
        assert_eq!(action(moving(EAST, QUARANTINE)), ReprovisionAction::Migrate);
        assert_eq!(action(moving(QUARANTINE, WEST)), ReprovisionAction::Migrate);
    }

    #[test]
    fn healthy_devices_stay_on_their_hub() {
        assert_eq!(action(moving(EAST, WEST)), ReprovisionAction::Keep);
        assert_eq!(action(moving(EAST, EAST)), ReprovisionAction::Keep);
        assert_eq!(
            action(moving(QUARANTINE, QUARANTINE)),
            ReprovisionAction::Keep
        );
    }

    #[test]
    fn devices_on_a_hub_no_longer_offered_move() {
        assert_eq!(
            action(moving("contoso-retired.azure-devices.net", WEST)),
            ReprovisionAction::Migrate
        );
    }

    #[test]
    fn decisions_leave_the_twin_alone() {
        assert_eq!(
            QuarantineRule::decide(moving(EAST, QUARANTINE))
                .unwrap()
                .twin,
            None
        );
    }

    #[test]
    fn missing_configuration_is_an_error() {
        let request = moving(EAST, QUARANTINE);
        testing::clear_config();
        assert_eq!(
            QuarantineRule::decide(request).unwrap_err(),
            "the policy has no configuration"
        );
    }
}
