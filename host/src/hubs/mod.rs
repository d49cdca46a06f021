//! Linked IoT hubs (seed HUB-01..07): the hubs devices may be assigned to, with their
//! allocation weight and flags, their connection strings, and the drivers that act on them.

pub mod azure;
pub mod driver;

use serde::Serialize;

/// A hub as linked to this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedHub {
    /// The hub's host name, e.g. `my-hub.azure-devices.net`.
    pub name: String,
    /// Present when linked by connection string; selects the `azure` driver.
    pub connection_string: Option<String>,
    pub allocation_weight: i64,
    pub apply_allocation_policy: bool,
    pub location: Option<String>,
}

impl LinkedHub {
    /// The driver that will act on this hub: `azure` with a connection string, else `record`.
    pub fn driver(&self) -> &'static str {
        if self.connection_string.is_some() {
            "azure"
        } else {
            "record"
        }
    }
}

/// The view reads return: the key of the connection string masked (HUB-04).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    pub allocation_weight: i64,
    pub apply_allocation_policy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub driver: &'static str,
    pub etag: String,
    pub created_date_time_utc: String,
    pub last_updated_date_time_utc: String,
}

/// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` of an IoT hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConnectionString {
    pub host_name: String,
    pub key_name: String,
    pub key: String,
}

impl HubConnectionString {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut host_name, mut key_name, mut key) = (None, None, None);
        for part in text.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("connection string part '{part}' is not Name=Value"))?;
            let slot = match name.trim().to_ascii_lowercase().as_str() {
                "hostname" => &mut host_name,
                "sharedaccesskeyname" => &mut key_name,
                "sharedaccesskey" => &mut key,
                _ => continue,
            };
            *slot = Some(value.trim().to_owned());
        }
        let host_name = host_name.ok_or("the connection string has no HostName")?;
        let key_name = key_name.ok_or("the connection string has no SharedAccessKeyName")?;
        let key = key.ok_or("the connection string has no SharedAccessKey")?;
        crate::model::names::check_host_name("HostName", &host_name)?;
        match base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key) {
            Ok(bytes) if !bytes.is_empty() => {}
            _ => return Err("the connection string's SharedAccessKey is not Base64".to_owned()),
        }
        Ok(Self {
            host_name,
            key_name,
            key,
        })
    }

    /// The connection string with its key replaced by `*****`.
    pub fn masked(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey=*****",
            self.host_name, self.key_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks_hub_connection_strings() {
        let cs = HubConnectionString::parse(
            "HostName=hub1.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0",
        )
        .unwrap();
        assert_eq!(cs.host_name, "hub1.azure-devices.net");
        assert_eq!(
            cs.masked(),
            "HostName=hub1.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=*****"
        );
        assert!(HubConnectionString::parse("HostName=h;SharedAccessKeyName=x").is_err());
        assert!(
            HubConnectionString::parse("HostName=h;SharedAccessKeyName=x;SharedAccessKey=***")
                .is_err()
        );
    }
}
