//! Service SAS authentication (wire-protocol.md §2.3, seed SVC-03..08): the token names a
//! shared access policy (`skn`), its `sr` is this service's host name, optionally followed by
//! a path that must be a segment prefix of the request path, and it is signed with one of the
//! policy's keys. Rights are checked by the caller.

use crate::attestation::sas::SasToken;
use crate::clock::unix_now;
use crate::error::ServiceError;
use crate::model::access::AccessPolicy;
use crate::store::Store;

/// Who may call: the host names a token's `sr` may name.
#[derive(Debug, Clone)]
pub struct Audience {
    /// Lower-cased host names, with and without the port.
    pub hosts: Vec<String>,
}

impl Audience {
    /// `host_name` as clients use it; `port` when it is not 443 (then `host:port` is what the
    /// connection string carries, and what the SDKs put into `sr`).
    pub fn new(host_name: &str, port: u16) -> Self {
        let host = host_name.to_ascii_lowercase();
        let with_port = format!("{host}:{port}");
        Self {
            hosts: vec![host, with_port],
        }
    }
}

/// Checks the `Authorization` header of a request to `path`; returns the policy it proves.
pub async fn authenticate(
    store: &Store,
    audience: &Audience,
    authorization: Option<&str>,
    path: &str,
) -> Result<AccessPolicy, ServiceError> {
    let unauthorized = |why: String| ServiceError::Unauthorized(why);
    let header = authorization
        .ok_or_else(|| unauthorized("the Authorization header is missing".to_owned()))?;
    let token = SasToken::parse(header).map_err(|error| unauthorized(error.to_string()))?;
    let key_name = token.key_name.clone().ok_or_else(|| {
        unauthorized("the SAS token names no shared access policy (skn)".to_owned())
    })?;
    check_resource(&token.resource, audience, path)?;
    let policy = store.access_policy(&key_name).await?;
    let signed = policy.as_ref().is_some_and(|p| {
        [&p.policy.primary_key, &p.policy.secondary_key]
            .into_iter()
            .any(|key| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(key)
                    .is_ok_and(|bytes| token.signed_with(&bytes))
            })
    });
    // Unknown policy and wrong key get the same answer, so that policy names do not leak.
    let Some(policy) = policy.filter(|_| signed) else {
        return Err(unauthorized(format!(
            "the SAS token signature does not match any key of policy '{key_name}'"
        )));
    };
    token
        .check_expiry(unix_now())
        .map_err(|error| unauthorized(error.to_string()))?;
    Ok(policy.policy)
}

fn check_resource(resource: &str, audience: &Audience, path: &str) -> Result<(), ServiceError> {
    let resource = resource.to_ascii_lowercase();
    let resource = resource
        .strip_prefix("https://")
        .or_else(|| resource.strip_prefix("http://"))
        .unwrap_or(&resource);
    let (host, scope) = match resource.split_once('/') {
        Some((host, scope)) => (host, scope.trim_end_matches('/')),
        None => (resource, ""),
    };
    if !audience.hosts.iter().any(|h| h == host) {
        return Err(ServiceError::Unauthorized(format!(
            "the SAS token is for '{host}', not for this service ({})",
            audience.hosts.first().map_or("", String::as_str)
        )));
    }
    // Segment prefix, not character prefix: `/a/b` covers `/a/b/c` but not `/a/bc` (SVC-08).
    if !scope.is_empty() {
        let wanted: Vec<&str> = scope.split('/').collect();
        let lower_path = percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .to_ascii_lowercase();
        let actual: Vec<&str> = lower_path.trim_matches('/').split('/').collect();
        if actual.len() < wanted.len() || actual.iter().zip(&wanted).any(|(a, w)| a != w) {
            return Err(ServiceError::Unauthorized(format!(
                "the SAS token is limited to '/{scope}'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_match_by_segment() {
        let audience = Audience::new("Localhost", 8443);
        assert!(check_resource("localhost:8443", &audience, "/enrollments/a").is_ok());
        assert!(check_resource("localhost", &audience, "/enrollments/a").is_ok());
        assert!(check_resource(
            "https://localhost:8443/enrollments",
            &audience,
            "/enrollments/a"
        )
        .is_ok());
        assert!(check_resource(
            "localhost:8443/enrollments",
            &audience,
            "/enrollmentGroups/a"
        )
        .is_err());
        assert!(check_resource("localhost:8443/enroll", &audience, "/enrollments/a").is_err());
        assert!(check_resource("other.example", &audience, "/enrollments").is_err());
    }
}
