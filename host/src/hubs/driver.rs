//! What a hub driver does to a linked hub when a device is assigned (wire-protocol.md §10):
//! create or update the device identity, read and write its twin, delete it when it moves.
//! Two drivers: `record` (the embedded default: the hub registry is a table in Berth's own
//! database) and `azure` (the IoT Hub registry and twin REST API). A linked hub with a
//! connection string uses `azure`, one linked by host name uses `record`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::azure::AzureDriver;
use super::LinkedHub;
use crate::store::Store;

/// The device identity written to a hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    pub device_id: String,
    /// SAS authentication keys (Base64); `None` for devices that use certificates.
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    /// X.509 devices: the leaf's SHA-256 thumbprint (uppercase hex); authentication is then
    /// `selfSigned` instead of SAS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<String>,
    pub iot_edge: bool,
}

impl DeviceIdentity {
    /// The hub's `authentication` object (wire-protocol.md §10.2): `selfSigned` with the
    /// thumbprint for X.509 devices (the one thumbprint in both slots), else `sas` with the
    /// keys (a missing secondary repeats the primary). `None`: a SAS identity without a key.
    pub fn authentication(&self) -> Option<Value> {
        if let Some(thumbprint) = &self.x509_thumbprint {
            return Some(serde_json::json!({
                "type": "selfSigned",
                "x509Thumbprint": {
                    "primaryThumbprint": thumbprint,
                    "secondaryThumbprint": thumbprint,
                },
            }));
        }
        let present = |key: Option<&String>| {
            key.map(String::as_str)
                .filter(|k| !k.trim().is_empty())
                .map(str::to_owned)
        };
        let primary = present(self.primary_key.as_ref())?;
        let secondary = present(self.secondary_key.as_ref()).unwrap_or_else(|| primary.clone());
        Some(serde_json::json!({
            "type": "sas",
            "symmetricKey": { "primaryKey": primary, "secondaryKey": secondary },
        }))
    }
}

/// Why a hub refused or could not be reached; the registration fails with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    /// The hub's HTTP status, when it answered.
    pub status: Option<u16>,
    pub message: String,
}

impl HubError {
    pub fn new(status: Option<u16>, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// The DPS-style error code for the registration state (`status * 1000 + 1`).
    pub fn error_code(&self) -> u32 {
        u32::from(self.status.unwrap_or(503)) * 1000 + 1
    }
}

/// The twin parts DPS manages: `{"tags": {…}, "properties": {"desired": {…}}}`.
pub type Twin = Value;

/// Dispatches to the driver a linked hub uses.
#[derive(Debug, Clone)]
pub struct HubDrivers {
    store: Store,
    azure: AzureDriver,
}

impl HubDrivers {
    pub fn new(store: Store, azure: AzureDriver) -> Self {
        Self { store, azure }
    }

    /// Creates the device, or updates its identity (keys, capabilities) if it exists.
    pub async fn upsert_device(
        &self,
        hub: &LinkedHub,
        identity: &DeviceIdentity,
    ) -> Result<(), HubError> {
        match hub.connection_string.as_deref() {
            Some(cs) => self.azure.upsert_device(cs, identity).await,
            None => self
                .store
                .hub_upsert_device(&hub.name, identity)
                .await
                .map_err(store_error),
        }
    }

    /// The device's twin (tags and desired properties), or `None` when the device is absent.
    pub async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<Twin>, HubError> {
        match hub.connection_string.as_deref() {
            Some(cs) => self.azure.get_twin(cs, device_id).await,
            None => self
                .store
                .hub_twin(&hub.name, device_id)
                .await
                .map_err(store_error),
        }
    }

    /// Replaces the device's tags and desired properties with those of `twin`.
    pub async fn replace_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &Twin,
    ) -> Result<(), HubError> {
        match hub.connection_string.as_deref() {
            Some(cs) => self.azure.replace_twin(cs, device_id, twin).await,
            None => self
                .store
                .hub_replace_twin(&hub.name, device_id, twin)
                .await
                .map_err(store_error),
        }
    }

    /// Deletes the device; a device that is already gone is not an error.
    pub async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        match hub.connection_string.as_deref() {
            Some(cs) => self.azure.delete_device(cs, device_id).await,
            None => self
                .store
                .hub_delete_device(&hub.name, device_id)
                .await
                .map_err(store_error),
        }
    }
}

#[allow(clippy::needless_pass_by_value)]
fn store_error(error: crate::store::StoreError) -> HubError {
    tracing::error!(error = %error, "record hub driver: store failure");
    HubError::new(
        None,
        "the record hub driver could not write to the database",
    )
}

/// Normalizes a twin to the parts DPS writes: `tags` and `properties.desired`, each an object.
pub fn managed_twin(twin: Option<&Value>) -> Twin {
    let tags = twin
        .and_then(|t| t.get("tags"))
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    let desired = twin
        .and_then(|t| t.pointer("/properties/desired"))
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    serde_json::json!({ "tags": tags, "properties": { "desired": desired } })
}
