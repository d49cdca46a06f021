//! Write Berth allocation policies and reprovisioning rules in Rust, as WebAssembly components.
//!
//! A policy is a `cdylib` crate that depends on this one, implements [`AllocationPolicy`] (or
//! [`ReprovisioningRule`]) and exports it with [`export_allocation_policy!`] (or
//! [`export_reprovisioning_rule!`]); `cargo build --target wasm32-wasip2 --release` then yields
//! a component of the world `berth:policy/allocation-policy@0.1.0` (or
//! `reprovisioning-rule`), ready for `berth policy upload`.
//!
//! ```
//! use berth_policy_sdk::{log, Allocation, AllocationError, AllocationPolicy, AllocationRequest, Twin};
//!
//! struct Toasters;
//!
//! impl AllocationPolicy for Toasters {
//!     fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
//!         if !request.device.registration_id.contains("-contoso-tstrsd-007") {
//!             return Err(AllocationError::failed("Unrecognized device registration."));
//!         }
//!         let hub = request
//!             .hub_containing("-toasters-")
//!             .ok_or_else(|| AllocationError::failed("No toasters hub found for the enrollment."))?;
//!         log::info(format!("toaster {} goes to {}", request.device.registration_id, hub.name));
//!         Ok(Allocation::to_hub(&hub.name).with_twin(Twin::new().tag("deviceType", "toaster")))
//!     }
//! }
//!
//! berth_policy_sdk::export_allocation_policy!(Toasters);
//! # let request = berth_policy_sdk::testing::request("kitchen-contoso-tstrsd-007")
//! #     .hub("contoso-toasters-hub-1.azure-devices.net").build();
//! # assert_eq!(Toasters::allocate(request).unwrap().hub, "contoso-toasters-hub-1.azure-devices.net");
//! ```
//!
//! # What the policy sees and answers
//! The types mirror the DPS custom allocation webhook: an [`AllocationRequest`] carries the
//! matched [`Enrollment`], the [`DeviceContext`] (registration ID, attestation with the
//! certificate facts of X.509 devices, payload, current hub, protocol) and the
//! [`LinkedHub`]s; the answer is an [`Allocation`] (hub, optional device ID, initial twin and
//! payload) or an [`AllocationError`], which the host turns into the DPS outcome: `Failed` is
//! 400207, `HubNotSpecified` 400208, `Unauthorized` 400209. JSON-valued fields are JSON text;
//! [`Twin`], [`payload`] and [`Allocation::to_hub`] read and write them.
//!
//! # Host capabilities
//! [`log`], [`config`] and [`lookup`] are the only things a policy can reach outside itself;
//! the operator grants the configuration and tables per binding. A component gets no file
//! system, network or environment variables, and a fresh instance serves every call, so
//! nothing carries over between devices.
//!
//! # Testing without a host
//! Keep the logic in the `allocate` function (or functions it calls) and test it with
//! `cargo test` on your machine. Off `wasm32` the capabilities are served by [`testing`], an
//! in-memory environment per test thread, so the same code runs unchanged; [`testing`] also
//! builds requests. The export macros are inert in native builds. To run the compiled
//! component itself, use `berth policy test policy.wasm --request request.json`.

pub use serde_json;

#[doc(hidden)]
#[path = "bindings.rs"]
pub mod __private;
mod backend;
mod capabilities;
mod helpers;
pub mod log;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod twin;

pub use __private::allocation::berth::policy::types::{
    Allocation, AllocationError, AllocationRequest, Attestation, AttestationKind, CertificateFacts,
    DeviceContext, Enrollment, EnrollmentKind, ExistingRegistration, LinkedHub, ReprovisionAction,
    ReprovisionDecision, ReprovisionPolicy, ReprovisionRequest,
};
pub use capabilities::{config, config_as, lookup, ConfigError};
pub use helpers::{payload, payload_value, same_hub, weighted_choice};
pub use twin::Twin;

/// The WIT package the components this SDK builds implement.
pub const WIT_PACKAGE: &str = "berth:policy@0.1.0";

/// A custom allocation policy: the world `berth:policy/allocation-policy`.
///
/// The host calls `allocate` once per registration, on a fresh instance, whatever the
/// enrollment's reprovisioning policy (DPS calls its webhook on every registration too).
pub trait AllocationPolicy {
    /// Chooses the hub for the device (one of `request.linked_hubs`), optionally with a device
    /// ID, an initial twin and a payload for the device; or refuses it.
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError>;
}

/// A reprovisioning rule: the world `berth:policy/reprovisioning-rule`.
///
/// The host calls `decide` when a registered device registers again and the allocation
/// proposes a hub; the rule says whether the device stays, moves with its twin, or moves and
/// starts over.
pub trait ReprovisioningRule {
    /// Decides what happens to the device; an error fails the registration with the message.
    fn decide(request: ReprovisionRequest) -> Result<ReprovisionDecision, String>;
}

/// Exports a type implementing [`AllocationPolicy`] as the component's `allocate` function.
/// Use it once per crate, at the top level, with the type's name (not a path).
#[macro_export]
macro_rules! export_allocation_policy {
    ($policy:ident) => {
        $crate::__private::allocation::__export_allocation_policy!(
            $policy with_types_in $crate::__private::allocation
        );
    };
}

/// Exports a type implementing [`ReprovisioningRule`] as the component's `decide` function.
/// Use it once per crate, at the top level, with the type's name (not a path).
#[macro_export]
macro_rules! export_reprovisioning_rule {
    ($rule:ident) => {
        $crate::__private::reprovisioning::__export_reprovisioning_rule!(
            $rule with_types_in $crate::__private::reprovisioning
        );
    };
}
