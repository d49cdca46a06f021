//! The initial twin a policy hands to the hub: tags and desired properties, the counterpart of
//! the DPS webhook samples' `TwinState(tags, desiredProperties)`.

use serde_json::{Map, Value};

use crate::Enrollment;

/// An initial device twin: `{"tags": {…}, "properties": {"desired": {…}}}`.
///
/// ```
/// use berth_policy_sdk::Twin;
///
/// let twin = Twin::new()
///     .tag("deviceType", "toaster")
///     .desired("state", "ready")
///     .desired("darknessSetting", "medium");
/// assert_eq!(
///     twin.to_json(),
///     r#"{"properties":{"desired":{"darknessSetting":"medium","state":"ready"}},"tags":{"deviceType":"toaster"}}"#
/// );
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Twin {
    tags: Map<String, Value>,
    desired: Map<String, Value>,
}

impl Twin {
    /// An empty twin.
    pub fn new() -> Self {
        Self::default()
    }

    /// The enrollment's initial twin, or an empty twin when it has none (or an unreadable one).
    /// Start from it to add to the operator's twin instead of replacing it: an allocation's
    /// twin replaces the enrollment's.
    pub fn of_enrollment(enrollment: &Enrollment) -> Self {
        enrollment
            .initial_twin
            .as_deref()
            .and_then(|text| Self::from_json(text).ok())
            .unwrap_or_default()
    }

    /// Parses `{"tags": {…}, "properties": {"desired": {…}}}`; either part may be absent.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let value: Value = serde_json::from_str(text)?;
        let not_an_object = || <serde_json::Error as serde::de::Error>::custom("not a twin object");
        let Value::Object(mut twin) = value else {
            return Err(not_an_object());
        };
        let tags = match twin.remove("tags") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(tags)) => tags,
            Some(_) => return Err(not_an_object()),
        };
        let desired = match twin.remove("properties") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(mut properties)) => match properties.remove("desired") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(desired)) => desired,
                Some(_) => return Err(not_an_object()),
            },
            Some(_) => return Err(not_an_object()),
        };
        Ok(Self { tags, desired })
    }

    /// Adds (or replaces) the tag `name`.
    #[must_use]
    pub fn tag(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set_tag(name, value);
        self
    }

    /// Adds (or replaces) the desired property `name`.
    #[must_use]
    pub fn desired(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set_desired(name, value);
        self
    }

    /// Sets the tag `name` in place.
    pub fn set_tag(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.tags.insert(name.into(), value.into());
    }

    /// Sets the desired property `name` in place.
    pub fn set_desired(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.desired.insert(name.into(), value.into());
    }

    /// The tags.
    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// The desired properties.
    pub fn desired_properties(&self) -> &Map<String, Value> {
        &self.desired
    }

    /// True when the twin has neither tags nor desired properties.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.desired.is_empty()
    }

    /// The twin as the JSON value the interface carries.
    pub fn to_value(&self) -> Value {
        self.clone().into_value()
    }

    /// The twin as the JSON text the interface carries.
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    pub(crate) fn into_value(self) -> Value {
        let mut properties = Map::new();
        properties.insert("desired".to_owned(), Value::Object(self.desired));
        let mut twin = Map::new();
        twin.insert("tags".to_owned(), Value::Object(self.tags));
        twin.insert("properties".to_owned(), Value::Object(properties));
        Value::Object(twin)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Twin;

    #[test]
    fn twin_round_trips_through_json() {
        let twin = Twin::new()
            .tag("deviceType", "heatpump")
            .desired("temperatureSetting", "65");
        assert_eq!(Twin::from_json(&twin.to_json()).unwrap(), twin);
        assert_eq!(
            twin.to_value(),
            json!({"tags": {"deviceType": "heatpump"}, "properties": {"desired": {"temperatureSetting": "65"}}})
        );
    }

    #[test]
    fn twin_parts_may_be_absent_or_null() {
        assert!(Twin::from_json("{}").unwrap().is_empty());
        assert!(Twin::from_json(r#"{"tags": null, "properties": {}}"#)
            .unwrap()
            .is_empty());
        let only_desired = Twin::from_json(r#"{"properties": {"desired": {"a": 1}}}"#).unwrap();
        assert_eq!(only_desired.desired_properties()["a"], json!(1));
    }

    #[test]
    fn twin_rejects_other_shapes() {
        assert!(Twin::from_json("[]").is_err());
        assert!(Twin::from_json(r#"{"tags": []}"#).is_err());
        assert!(Twin::from_json(r#"{"properties": {"desired": 3}}"#).is_err());
        assert!(Twin::from_json("not json").is_err());
    }
}
