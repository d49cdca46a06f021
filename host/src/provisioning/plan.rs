//! The registration decision, without I/O: given the enrollment, the device's previous
//! record and the linked hubs, where does the device go and what happens to its data
//! (seed ALLOC, REPROV, TWIN). The caller carries the plan out against the hub drivers.
//!
//! Substatus rules (DPS documents the values, not all the cases; these are Berth's):
//! - first assignment: `initialAssignment`;
//! - a different hub, migrate: `deviceDataMigrated` (twin copied from the old hub, old
//!   device deleted); a different hub, reset: `deviceDataReset` (the enrollment's initial
//!   twin written, old device deleted);
//! - the same hub, reset: `deviceDataReset` (a factory reset, REPROV-05);
//! - the same hub otherwise, never re-provision, or the legacy sticky rule:
//!   `reprovisionedToInitialAssignment` (back to the hub it had; identity refreshed, twin kept).

use crate::allocation::{self, GeoMap};
use crate::hubs::LinkedHub;
use crate::model::enrollment::{AllocationPolicy, Enrollment, EnrollmentKind};
use crate::model::registration::RegistrationState;

/// What to do with the twin on the target hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinAction {
    /// Write the enrollment's initial twin.
    WriteInitial,
    /// Copy the twin of the device on this hub (the old one).
    CopyFrom { hub: String, device_id: String },
    /// Leave the twin as it is.
    Keep,
}

/// The decision for one registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hub: LinkedHub,
    pub device_id: String,
    pub substatus: &'static str,
    pub twin: TwinAction,
    /// The previous device to delete, on another hub or under another device ID.
    pub delete: Option<(LinkedHub, String)>,
}

/// Why no plan could be made; the registration fails with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no linked IoT hub is available to this enrollment: {0}")]
    NoHub(String),
    #[error("custom allocation produced no decision")]
    CustomUnavailable,
}

impl PlanError {
    /// The DPS error code of the failed registration state.
    pub fn error_code(&self) -> u32 {
        match self {
            Self::NoHub(_) => 400_210,
            Self::CustomUnavailable => 400_207,
        }
    }
}

/// The facts a decision needs.
#[derive(Debug)]
pub struct PlanInput<'a> {
    pub registration_id: &'a str,
    pub kind: EnrollmentKind,
    pub enrollment: &'a Enrollment,
    /// The device's record, when it registered before.
    pub previous: Option<&'a RegistrationState>,
    pub linked: &'a [LinkedHub],
    pub client_location: Option<&'a str>,
    /// The device speaks an api-version from before reprovisioning (≤ 2018-04-01).
    pub legacy_api: bool,
    /// What custom allocation decided, for enrollments with `allocationPolicy: custom`.
    pub custom: Option<&'a crate::allocation::custom::CustomDecision>,
}

fn find<'a>(linked: &'a [LinkedHub], name: &str) -> Option<&'a LinkedHub> {
    linked
        .iter()
        .find(|hub| hub.name.eq_ignore_ascii_case(name))
}

/// Chooses the hub the enrollment's allocation policy gives for this device.
pub fn allocate(input: &PlanInput<'_>) -> Result<LinkedHub, PlanError> {
    let enrollment = input.enrollment;
    let named: Vec<&str> = match (&enrollment.iot_hubs, &enrollment.iot_hub_host_name) {
        (Some(hubs), _) if !hubs.is_empty() => hubs.iter().map(String::as_str).collect(),
        (_, Some(hub)) => vec![hub.as_str()],
        _ => Vec::new(),
    };
    let policy = enrollment.allocation_policy.unwrap_or(
        if enrollment.iot_hub_host_name.is_some() && named.len() == 1 {
            AllocationPolicy::Static
        } else {
            AllocationPolicy::Hashed
        },
    );
    if policy == AllocationPolicy::Static {
        let name = named
            .first()
            .ok_or_else(|| PlanError::NoHub("static allocation names no hub".to_owned()))?;
        return find(input.linked, name)
            .cloned()
            .ok_or_else(|| PlanError::NoHub(format!("the static hub '{name}' is not linked")));
    }
    if policy == AllocationPolicy::Custom {
        let decision = input.custom.ok_or(PlanError::CustomUnavailable)?;
        return find(input.linked, &decision.hub).cloned().ok_or_else(|| {
            PlanError::NoHub(format!(
                "custom allocation chose '{}', which is not linked",
                decision.hub
            ))
        });
    }
    // Only linked hubs the enrollment names (all linked hubs when it names none) that
    // take part in allocation policies.
    let candidates: Vec<&LinkedHub> = if named.is_empty() {
        input.linked.iter().collect()
    } else {
        named
            .iter()
            .filter_map(|name| find(input.linked, name))
            .collect()
    };
    let candidates: Vec<&LinkedHub> = candidates
        .into_iter()
        .filter(|hub| hub.apply_allocation_policy)
        .collect();
    let chosen = match policy {
        AllocationPolicy::GeoLatency => {
            allocation::geo_latency(input.registration_id, input.client_location, &candidates)
        }
        _ => allocation::hashed(input.registration_id, &candidates),
    };
    chosen.cloned().ok_or_else(|| {
        PlanError::NoHub(if named.is_empty() {
            "no linked hub has applyAllocationPolicy set".to_owned()
        } else {
            format!(
                "none of {} is linked with applyAllocationPolicy set",
                named.join(", ")
            )
        })
    })
}

/// Decides where the device goes and what happens to its data.
pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let device_id = match input.kind {
        EnrollmentKind::Individual => input
            .custom
            .and_then(|d| d.device_id.clone())
            .or_else(|| input.enrollment.device_id.clone())
            .unwrap_or_else(|| input.registration_id.to_owned()),
        EnrollmentKind::Group => input.registration_id.to_owned(),
    };
    let previous = input
        .previous
        .filter(|p| p.status == "assigned")
        .and_then(|p| {
            let hub = find(input.linked, p.assigned_hub.as_deref()?)?;
            Some((
                hub,
                p.device_id
                    .clone()
                    .unwrap_or_else(|| input.registration_id.to_owned()),
            ))
        });
    let Some((old_hub, old_device)) = previous else {
        return Ok(Plan {
            hub: allocate(input)?,
            device_id,
            substatus: "initialAssignment",
            twin: TwinAction::WriteInitial,
            delete: None,
        });
    };
    let policy = input.enrollment.reprovision_policy;
    let sticky = policy.is_none() && input.legacy_api;
    let (update, migrate) = policy.map_or((true, true), |p| {
        (p.update_hub_assignment, p.migrate_device_data)
    });
    if sticky || !update {
        let delete = (!old_device.eq_ignore_ascii_case(&device_id))
            .then(|| (old_hub.clone(), old_device.clone()));
        let twin = if delete.is_some() {
            TwinAction::CopyFrom {
                hub: old_hub.name.clone(),
                device_id: old_device,
            }
        } else {
            TwinAction::Keep
        };
        return Ok(Plan {
            hub: old_hub.clone(),
            device_id,
            substatus: "reprovisionedToInitialAssignment",
            twin,
            delete,
        });
    }
    let hub = allocate(input)?;
    let same_place =
        hub.name.eq_ignore_ascii_case(&old_hub.name) && old_device.eq_ignore_ascii_case(&device_id);
    let delete = (!same_place).then(|| (old_hub.clone(), old_device.clone()));
    let (substatus, twin) = match (same_place, migrate) {
        (_, false) => ("deviceDataReset", TwinAction::WriteInitial),
        (true, true) => ("reprovisionedToInitialAssignment", TwinAction::Keep),
        (false, true) => (
            "deviceDataMigrated",
            TwinAction::CopyFrom {
                hub: old_hub.name.clone(),
                device_id: old_device,
            },
        ),
    };
    Ok(Plan {
        hub,
        device_id,
        substatus,
        twin,
        delete,
    })
}

/// True for api-versions from before reprovisioning policies (REPROV-09/10: ≤ 2018-04-01).
pub fn is_legacy_api_version(api_version: Option<&str>) -> bool {
    api_version
        .and_then(|v| v.get(..10))
        .is_some_and(|date| date <= "2018-04-01")
}

/// The location of a client address, for geoLatency.
pub fn client_location(geo: &GeoMap, address: Option<std::net::IpAddr>) -> Option<&str> {
    address.and_then(|a| geo.locate(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::enrollment::ReprovisionPolicy;

    fn hub(name: &str) -> LinkedHub {
        LinkedHub {
            name: name.to_owned(),
            connection_string: None,
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
        }
    }

    fn enrollment(hubs: &[&str], policy: Option<(bool, bool)>) -> Enrollment {
        Enrollment {
            iot_hubs: Some(hubs.iter().map(|h| (*h).to_owned()).collect()),
            allocation_policy: Some(AllocationPolicy::Hashed),
            reprovision_policy: policy.map(|(u, m)| ReprovisionPolicy {
                update_hub_assignment: u,
                migrate_device_data: m,
            }),
            ..Enrollment::default()
        }
    }

    fn assigned(hub: &str) -> RegistrationState {
        RegistrationState {
            registration_id: "dev".into(),
            status: "assigned".into(),
            assigned_hub: Some(hub.into()),
            device_id: Some("dev".into()),
            ..RegistrationState::default()
        }
    }

    fn input<'a>(
        e: &'a Enrollment,
        previous: Option<&'a RegistrationState>,
        linked: &'a [LinkedHub],
    ) -> PlanInput<'a> {
        PlanInput {
            registration_id: "dev",
            kind: EnrollmentKind::Group,
            enrollment: e,
            previous,
            linked,
            client_location: None,
            legacy_api: false,
            custom: None,
        }
    }

    #[test]
    fn first_registration_is_an_initial_assignment() {
        let linked = [hub("a"), hub("b")];
        let e = enrollment(&["b"], None);
        let plan = plan(&input(&e, None, &linked)).unwrap();
        assert_eq!(plan.hub.name, "b");
        assert_eq!(plan.substatus, "initialAssignment");
        assert_eq!(plan.twin, TwinAction::WriteInitial);
        assert!(plan.delete.is_none());
    }

    #[test]
    fn each_reprovision_policy_moves_and_keeps_data_as_the_seed_says() {
        let linked = [hub("a"), hub("b")];
        let previous = assigned("a");
        // The enrollment's hub list changed from a to b.
        let migrate = plan(&input(
            &enrollment(&["b"], Some((true, true))),
            Some(&previous),
            &linked,
        ))
        .unwrap();
        assert_eq!(
            (migrate.hub.name.as_str(), migrate.substatus),
            ("b", "deviceDataMigrated")
        );
        assert_eq!(
            migrate.twin,
            TwinAction::CopyFrom {
                hub: "a".into(),
                device_id: "dev".into()
            }
        );
        assert_eq!(
            migrate
                .delete
                .as_ref()
                .map(|(h, d)| (h.name.as_str(), d.as_str())),
            Some(("a", "dev"))
        );

        let reset = plan(&input(
            &enrollment(&["b"], Some((true, false))),
            Some(&previous),
            &linked,
        ))
        .unwrap();
        assert_eq!(
            (reset.hub.name.as_str(), reset.substatus),
            ("b", "deviceDataReset")
        );
        assert_eq!(reset.twin, TwinAction::WriteInitial);
        assert!(reset.delete.is_some());

        let never = plan(&input(
            &enrollment(&["b"], Some((false, false))),
            Some(&previous),
            &linked,
        ))
        .unwrap();
        assert_eq!(
            (never.hub.name.as_str(), never.substatus),
            ("a", "reprovisionedToInitialAssignment")
        );
        assert_eq!(never.twin, TwinAction::Keep);
        assert!(never.delete.is_none());

        let same = plan(&input(
            &enrollment(&["a"], Some((true, true))),
            Some(&previous),
            &linked,
        ))
        .unwrap();
        assert_eq!(
            (same.substatus, &same.twin),
            ("reprovisionedToInitialAssignment", &TwinAction::Keep)
        );
        let factory_reset = plan(&input(
            &enrollment(&["a"], Some((true, false))),
            Some(&previous),
            &linked,
        ))
        .unwrap();
        assert_eq!(
            (factory_reset.substatus, &factory_reset.twin),
            ("deviceDataReset", &TwinAction::WriteInitial)
        );
        assert!(factory_reset.delete.is_none());
    }

    #[test]
    fn legacy_api_versions_stick_when_no_policy_is_set() {
        let linked = [hub("a"), hub("b")];
        let previous = assigned("a");
        let e = enrollment(&["b"], None);
        let mut legacy = input(&e, Some(&previous), &linked);
        legacy.legacy_api = true;
        assert_eq!(plan(&legacy).unwrap().hub.name, "a");
        let modern = input(&e, Some(&previous), &linked);
        assert_eq!(
            plan(&modern).unwrap().hub.name,
            "b",
            "without the legacy api the default policy migrates"
        );
        assert!(is_legacy_api_version(Some("2018-04-01")));
        assert!(is_legacy_api_version(Some("2017-11-15")));
        assert!(!is_legacy_api_version(Some("2018-09-01-preview")));
        assert!(!is_legacy_api_version(None));
    }

    #[test]
    fn only_linked_hubs_with_apply_allocation_policy_take_part() {
        let mut off = hub("b");
        off.apply_allocation_policy = false;
        let linked = [hub("a"), off];
        let e = enrollment(&["b"], None);
        assert!(matches!(
            plan(&input(&e, None, &linked)),
            Err(PlanError::NoHub(_))
        ));
        let e = enrollment(&["a", "b", "unlinked"], None);
        assert_eq!(plan(&input(&e, None, &linked)).unwrap().hub.name, "a");
        let mut custom = enrollment(&["a"], None);
        custom.allocation_policy = Some(AllocationPolicy::Custom);
        assert_eq!(
            plan(&input(&custom, None, &linked)).unwrap_err(),
            PlanError::CustomUnavailable
        );
    }
}
