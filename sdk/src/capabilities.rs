//! The binding's configuration and the operator's lookup tables, parsed from the JSON text the
//! host hands over.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::AllocationError;

/// The configuration the operator set on this policy's binding, or `None` when it has none.
/// Text that is not JSON reads as `None` too (the host validates it when it is set).
pub fn config() -> Option<Value> {
    crate::backend::config().and_then(|text| serde_json::from_str(&text).ok())
}

/// The configuration deserialized into `T`: the usual way to read a policy's settings.
///
/// ```
/// # use berth_policy_sdk::{config_as, AllocationError};
/// #[derive(serde::Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// struct Settings {
///     minimum_firmware: String,
/// }
///
/// # fn allocate() -> Result<(), AllocationError> {
/// let settings: Settings = config_as()?; // a missing or wrong configuration fails the device
/// # let _ = settings.minimum_firmware; Ok(()) }
/// # berth_policy_sdk::testing::set_config(&serde_json::json!({"minimumFirmware": "1.2.0"}));
/// # allocate().unwrap();
/// ```
pub fn config_as<T: DeserializeOwned>() -> Result<T, ConfigError> {
    let text = crate::backend::config().ok_or(ConfigError::Missing)?;
    serde_json::from_str(&text).map_err(|error| ConfigError::Invalid(error.to_string()))
}

/// The JSON value stored under `key` in the lookup table `table`; `None` when the table or the
/// key is absent, when the operator did not grant the table to this binding, or when the
/// stored text is not JSON.
pub fn lookup(table: &str, key: &str) -> Option<Value> {
    crate::backend::lookup(table, key).and_then(|text| serde_json::from_str(&text).ok())
}

/// Why [`config_as`] has no configuration to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The binding has no configuration.
    Missing,
    /// The configuration does not have the expected shape: serde's explanation.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => formatter.write_str("the policy has no configuration"),
            Self::Invalid(reason) => {
                write!(formatter, "the policy configuration is invalid: {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// A configuration problem fails the registration (DPS 400207) with the explanation, so `?`
/// works inside [`AllocationPolicy::allocate`](crate::AllocationPolicy::allocate).
impl From<ConfigError> for AllocationError {
    fn from(error: ConfigError) -> Self {
        AllocationError::Failed(error.to_string())
    }
}
