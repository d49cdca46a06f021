//! How a caller proves who it is, as pure functions without I/O: SAS tokens (devices and
//! service callers), X.509 certificates and device chains, and the TPM activation blob.

pub mod chain;
pub mod sas;
pub mod tpm;
pub mod x509;
