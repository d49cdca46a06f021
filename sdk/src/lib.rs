//! Write Berth allocation and reprovisioning policies as WebAssembly components.
//!
//! This crate will expose a trait, a macro and the types of the `berth:policy` WIT package
//! (see `wit/`); it is empty until the policy host exists.
