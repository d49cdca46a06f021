//! Berth: a self-hosted device provisioning service that speaks the wire protocol of Azure
//! IoT Hub Device Provisioning Service.
//!
//! The crate is one library with one public face (this file) and the `berth` binary. Each
//! folder is one concern; see `docs/ARCHITECTURE.md` for the map and what each may touch.

// `deny`, not `forbid`: the policy host needs `unsafe` in two audited places (the
// wasmtime bindings and loading its own compiled artifacts); everything else is safe code.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod allocation;
pub mod attestation;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod hubs;
pub mod instance;
pub mod model;
pub mod policy;
pub mod protocol;
pub mod provisioning;
pub mod server;
pub mod service_api;
pub mod store;
pub mod telemetry;

pub use config::ServeConfig;
pub use error::ServiceError;
pub use instance::Instance;
pub use service_api::app;

#[cfg(test)]
mod robustness_tests;
