//! The data model of the service API: enrollments, registration records, naming rules. Pure
//! data and validation; no I/O.

pub mod access;
pub mod enrollment;
pub mod names;
pub mod registration;
