//! Shared access policies and their rights (seed SVC-04..06, wire-protocol.md §2.3).

use std::fmt;

/// One permission of a shared access policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    ServiceConfig,
    EnrollmentRead,
    EnrollmentWrite,
    RegistrationStatusRead,
    RegistrationStatusWrite,
    /// Accepted for compatibility with Azure's rights list; the service API does not use it.
    DeviceConnect,
}

const ALL: [(Right, &str); 6] = [
    (Right::ServiceConfig, "ServiceConfig"),
    (Right::EnrollmentRead, "EnrollmentRead"),
    (Right::EnrollmentWrite, "EnrollmentWrite"),
    (Right::RegistrationStatusRead, "RegistrationStatusRead"),
    (Right::RegistrationStatusWrite, "RegistrationStatusWrite"),
    (Right::DeviceConnect, "DeviceConnect"),
];

impl Right {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(r, _)| *r == self).map_or("", |(_, n)| n)
    }
}

/// A set of rights, written as Azure writes it: `"ServiceConfig, EnrollmentRead"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    /// What `provisioningserviceowner` holds.
    pub fn owner() -> Self {
        [
            Right::ServiceConfig,
            Right::EnrollmentRead,
            Right::EnrollmentWrite,
            Right::RegistrationStatusRead,
            Right::RegistrationStatusWrite,
        ]
        .into_iter()
        .fold(Self::default(), |rights, r| Self(rights.0 | r.bit()))
    }

    pub fn contains(self, right: Right) -> bool {
        self.0 & right.bit() != 0
    }

    /// Parses a comma-separated list; unknown names are an error that names them.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rights = Self::default();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let (right, _) = ALL
                .iter()
                .find(|(_, n)| n.eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    format!("'{name}' is not a right; rights are {}", Self::all_names())
                })?;
            rights.0 |= right.bit();
        }
        if rights.0 == 0 {
            return Err(format!(
                "a policy needs at least one right of {}",
                Self::all_names()
            ));
        }
        Ok(rights)
    }

    fn all_names() -> String {
        ALL.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ALL
            .iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// A shared access policy with its two keys (Base64 of 32 random bytes when generated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub name: String,
    pub rights: Rights,
    pub primary_key: String,
    pub secondary_key: String,
}

/// The policy every instance starts with (SVC-04).
pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// A policy key: 32 random bytes, Base64.
pub fn generate_policy_key() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_azure_rights_lists() {
        let rights = Rights::parse("EnrollmentRead, registrationstatusread").unwrap();
        assert!(rights.contains(Right::EnrollmentRead));
        assert!(!rights.contains(Right::EnrollmentWrite));
        assert_eq!(rights.to_string(), "EnrollmentRead, RegistrationStatusRead");
        assert!(Rights::parse("EnrollmentRead, Everything").is_err());
        assert!(Rights::parse("").is_err());
        assert!(Rights::owner().contains(Right::ServiceConfig));
    }
}
