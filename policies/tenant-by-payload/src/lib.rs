//! Multi-tenant allocation: the device names its tenant in its payload (`{"tenant": "…"}`)
//! and the operator's lookup table `tenants` names the tenant's hub. See README.md.

use berth_policy_sdk::{
    export_allocation_policy, log, lookup, payload_value, Allocation, AllocationError,
    AllocationPolicy, AllocationRequest, Twin,
};
use serde_json::{json, Value};

/// The lookup table that maps a tenant to its hub.
const TENANTS_TABLE: &str = "tenants";

/// Longest tenant name looked up (the table's keys are short names, not documents).
const MAX_TENANT_LENGTH: usize = 128;

struct TenantByPayload;

impl AllocationPolicy for TenantByPayload {
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
        let tenant = tenant_named_by(&request)
            .ok_or_else(|| AllocationError::unauthorized("the payload names no tenant"))?;
        let entry = lookup(TENANTS_TABLE, &tenant)
            .ok_or_else(|| AllocationError::failed(format!("unknown tenant '{tenant}'")))?;
        let hub_name = hub_of(&entry).ok_or_else(|| {
            log::error(format!(
                "the {TENANTS_TABLE} entry of '{tenant}' names no hub"
            ));
            AllocationError::failed(format!("tenant '{tenant}' has no hub"))
        })?;
        let hub = request.linked_hub(hub_name).ok_or_else(|| {
            log::error(format!(
                "tenant '{tenant}' is served by hub '{hub_name}', which this enrollment does not offer"
            ));
            AllocationError::failed(format!("the hub of tenant '{tenant}' is not available"))
        })?;
        log::info(format!(
            "{} belongs to tenant '{tenant}': {}",
            request.device.registration_id, hub.name
        ));
        let twin = Twin::of_enrollment(&request.enrollment).tag("tenant", tenant.clone());
        Ok(Allocation::to_hub(&hub.name)
            .with_twin(twin)
            .with_payload(json!({"tenant": tenant})))
    }
}

/// The non-empty `tenant` string of the device's payload object.
fn tenant_named_by(request: &AllocationRequest) -> Option<String> {
    let payload = payload_value(&request.device)?;
    let tenant = payload.get("tenant")?.as_str()?.trim();
    (!tenant.is_empty() && tenant.len() <= MAX_TENANT_LENGTH).then(|| tenant.to_owned())
}

/// The hub a `tenants` entry names: `"hub-name"` or `{"hub": "hub-name", …}`.
fn hub_of(entry: &Value) -> Option<&str> {
    match entry {
        Value::String(hub) => Some(hub.as_str()),
        Value::Object(fields) => fields.get("hub")?.as_str(),
        _ => None,
    }
    .filter(|hub| !hub.trim().is_empty())
}

export_allocation_policy!(TenantByPayload);

#[cfg(test)]
mod tests {
    use berth_policy_sdk::log::Level;
    use berth_policy_sdk::{testing, AllocationError, AllocationPolicy, Twin};
    use serde_json::{json, Value};

    use super::TenantByPayload;

    const FABRIKAM: &str = "fabrikam-hub.azure-devices.net";
    const CONTOSO: &str = "contoso-hub.azure-devices.net";

    fn request(payload: Value) -> berth_policy_sdk::AllocationRequest {
        testing::request("sensor-7")
            .hub(FABRIKAM)
            .hub(CONTOSO)
            .payload(payload)
            .build()
    }

    #[test]
    fn tenant_goes_to_the_hub_its_table_entry_names() {
        testing::set_lookup("tenants", "fabrikam", &json!({"hub": FABRIKAM}));
        testing::set_lookup("tenants", "contoso", &json!("contoso-hub"));

        let allocation = TenantByPayload::allocate(request(json!({"tenant": "fabrikam"}))).unwrap();
        assert_eq!(allocation.hub, FABRIKAM);
        assert_eq!(
            allocation.payload.as_deref(),
            Some(r#"{"tenant":"fabrikam"}"#)
        );

        // A bare string entry, and a hub named by its first label: the answer is the full name.
        let allocation = TenantByPayload::allocate(request(json!({"tenant": "contoso"}))).unwrap();
        assert_eq!(allocation.hub, CONTOSO);
    }

    #[test]
    fn tenant_tag_is_added_to_the_enrollment_twin() {
        testing::set_lookup("tenants", "fabrikam", &json!(FABRIKAM));
        let request = testing::request("sensor-7")
            .hub(FABRIKAM)
            .initial_twin(&Twin::new().tag("site", "north").desired("interval", 30))
            .payload(json!({"tenant": "fabrikam"}))
            .build();
        let allocation = TenantByPayload::allocate(request).unwrap();
        assert_eq!(
            Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap(),
            Twin::new()
                .tag("site", "north")
                .tag("tenant", "fabrikam")
                .desired("interval", 30)
        );
    }

    #[test]
    fn missing_tenant_is_unauthorized() {
        let unauthorized = AllocationError::Unauthorized("the payload names no tenant".to_owned());
        let no_payload = testing::request("sensor-7").hub(FABRIKAM).build();
        assert_eq!(
            TenantByPayload::allocate(no_payload).unwrap_err(),
            unauthorized
        );
        for payload in [
            json!({}),
            json!({"tenant": ""}),
            json!({"tenant": 7}),
            json!(["fabrikam"]),
        ] {
            assert_eq!(
                TenantByPayload::allocate(request(payload)).unwrap_err(),
                unauthorized
            );
        }
    }

    #[test]
    fn unknown_tenant_fails() {
        assert_eq!(
            TenantByPayload::allocate(request(json!({"tenant": "northwind"}))).unwrap_err(),
            AllocationError::Failed("unknown tenant 'northwind'".to_owned())
        );
    }

    #[test]
    fn hub_the_enrollment_does_not_offer_fails_and_is_logged() {
        testing::set_lookup(
            "tenants",
            "fabrikam",
            &json!({"hub": "elsewhere.azure-devices.net"}),
        );
        assert_eq!(
            TenantByPayload::allocate(request(json!({"tenant": "fabrikam"}))).unwrap_err(),
            AllocationError::Failed("the hub of tenant 'fabrikam' is not available".to_owned())
        );
        assert!(testing::logs()
            .iter()
            .any(|(level, line)| *level == Level::Error
                && line.contains("elsewhere.azure-devices.net")));
    }

    #[test]
    fn entry_without_a_hub_fails() {
        testing::set_lookup("tenants", "fabrikam", &json!({"region": "eu"}));
        assert_eq!(
            TenantByPayload::allocate(request(json!({"tenant": "fabrikam"}))).unwrap_err(),
            AllocationError::Failed("tenant 'fabrikam' has no hub".to_owned())
        );
    }
}
