//! How a caller proves who it is: SAS tokens (devices and service callers) and X.509
//! certificates. TPM comes with its own issue.

pub mod chain;
pub mod sas;
pub mod x509;
