//! The code wit-bindgen generates from `wit/policy.wit`: one module per world. It is public
//! only because the export macros expand in the policy's crate and must name it; nothing here
//! is part of the SDK's API.
//!
//! The allocation world generates every type of `berth:policy/types` (also the ones only the
//! reprovisioning world uses) and the three imports; the reprovisioning world reuses them
//! through `with`, so both worlds share one set of types.
#![allow(unsafe_code, missing_docs, clippy::all, clippy::pedantic)]

pub mod allocation {
    wit_bindgen::generate!({
        path: "../wit",
        world: "allocation-policy",
        generate_unused_types: true,
        additional_derives: [PartialEq, Eq],
        pub_export_macro: true,
        export_macro_name: "__export_allocation_policy",
        default_bindings_module: "berth_policy_sdk::__private::allocation",
    });
}

pub mod reprovisioning {
    wit_bindgen::generate!({
        path: "../wit",
        world: "reprovisioning-rule",
        pub_export_macro: true,
        export_macro_name: "__export_reprovisioning_rule",
        default_bindings_module: "berth_policy_sdk::__private::reprovisioning",
        with: {
            "berth:policy/types@0.1.0": crate::__private::allocation::berth::policy::types,
            "berth:policy/log@0.1.0": crate::__private::allocation::berth::policy::log,
            "berth:policy/config@0.1.0": crate::__private::allocation::berth::policy::config,
            "berth:policy/lookup@0.1.0": crate::__private::allocation::berth::policy::lookup,
        },
    });
}

use crate::{AllocationPolicy, ReprovisioningRule};

impl<T: AllocationPolicy> allocation::Guest for T {
    fn allocate(
        request: crate::AllocationRequest,
    ) -> Result<crate::Allocation, crate::AllocationError> {
        <T as AllocationPolicy>::allocate(request)
    }
}

impl<T: ReprovisioningRule> reprovisioning::Guest for T {
    fn decide(request: crate::ReprovisionRequest) -> Result<crate::ReprovisionDecision, String> {
        <T as ReprovisioningRule>::decide(request)
    }
}
