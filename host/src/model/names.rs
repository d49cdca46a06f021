//! Naming rules from the seed: registration IDs and enrollment group names (ENR-06, LIM-08),
//! IoT Hub device IDs (ENR-08) and hub host names.

/// Registration IDs and group names: alphanumerics plus `- . _ :`, at most 128 characters,
/// the last alphanumeric or `-`. Compared case-insensitively.
pub fn check_registration_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is required"));
    }
    if id.len() > 128 {
        return Err(format!("{what} is longer than 128 characters"));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._:".contains(*c)))
    {
        return Err(format!(
            "{what} '{id}' contains '{bad}': only alphanumerics and '-', '.', '_', ':' are allowed"
        ));
    }
    if id.ends_with(['.', '_', ':']) {
        return Err(format!(
            "{what} '{id}' must end with an alphanumeric character or '-'"
        ));
    }
    Ok(())
}

/// IoT Hub device IDs: up to 128 ASCII characters, alphanumerics plus `- . + % _ # * ? ! ( ) , : = @ $ '`.
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("deviceId must be 1 to 128 characters long".to_owned());
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.+%_#*?!(),:=@$'".contains(*c)))
    {
        return Err(format!(
            "deviceId '{id}' contains '{bad}', which IoT Hub does not allow"
        ));
    }
    Ok(())
}

/// A hub host name such as `hub1.azure-devices.net` (DNS labels, optional `:port`).
pub fn check_host_name(what: &str, name: &str) -> Result<(), String> {
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{what} '{name}' has an invalid port"));
        }
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
        return Err(format!("{what} '{name}' is not a valid host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules_follow_the_seed() {
        assert!(check_registration_id("id", "symm-key-device-007").is_ok());
        assert!(check_registration_id("id", "a:b.c_d-").is_ok());
        assert!(check_registration_id("id", "ends.").is_err());
        assert!(check_registration_id("id", "has space").is_err());
        assert!(check_registration_id("id", "slash/").is_err());
        assert!(check_registration_id("id", &"a".repeat(128)).is_ok());
        assert!(check_registration_id("id", &"a".repeat(129)).is_err());
        assert!(check_registration_id("id", "").is_err());
    }

    #[test]
    fn host_names() {
        assert!(check_host_name("hub", "hub1.azure-devices.net").is_ok());
        assert!(check_host_name("hub", "localhost:8443").is_ok());
        assert!(check_host_name("hub", "bad_host").is_err());
        assert!(check_host_name("hub", "-a.b").is_err());
        assert!(check_host_name("hub", "a..b").is_err());
    }
}
