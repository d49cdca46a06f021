//! The device API over HTTPS (wire-protocol.md §3): register, operation status and status
//! lookup, on the same listener as the service API. Only translation lives here; the work is
//! `provisioning`'s.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;

use crate::error::ServiceError;
use crate::provisioning::{
    DeviceCall, DeviceRegistration, Protocol, Provisioning, RETRY_AFTER_SECONDS,
};

/// A device API request.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceRoute {
    Register {
        id_scope: String,
        registration_id: String,
    },
    OperationStatus {
        id_scope: String,
        registration_id: String,
        operation_id: String,
    },
    StatusLookup {
        id_scope: String,
        registration_id: String,
    },
}

/// First path segments that belong to the service API, never to an ID scope.
const SERVICE_ROOTS: [&str; 8] = [
    "certificates",
    "enrollments",
    "enrollmentgroups",
    "registrations",
    "linkedhubs",
    "accesspolicies",
    "policies",
    "lookuptables",
];

/// Recognizes `/{idScope}/registrations/{id}[/register | /operations/{operationId}]`.
/// `None`: not a device path. `Some(Err)`: a device path with the wrong method.
pub fn route(method: &Method, path: &str) -> Option<Result<DeviceRoute, ServiceError>> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let segments: Vec<String> = trimmed
        .split('/')
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(std::borrow::Cow::into_owned)
        })
        .collect::<Option<Vec<_>>>()?;
    if segments.len() < 3
        || !segments[1].eq_ignore_ascii_case("registrations")
        || SERVICE_ROOTS
            .iter()
            .any(|root| segments[0].eq_ignore_ascii_case(root))
        || segments.iter().any(String::is_empty)
    {
        return None;
    }
    let (id_scope, registration_id) = (segments[0].clone(), segments[2].clone());
    let not_allowed = || {
        Some(Err(ServiceError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
        }))
    };
    match segments.len() {
        3 if method == Method::POST => Some(Ok(DeviceRoute::StatusLookup {
            id_scope,
            registration_id,
        })),
        3 => not_allowed(),
        4 if segments[3].eq_ignore_ascii_case("register") => {
            if method == Method::PUT {
                Some(Ok(DeviceRoute::Register {
                    id_scope,
                    registration_id,
                }))
            } else {
                not_allowed()
            }
        }
        5 if segments[3].eq_ignore_ascii_case("operations") => {
            if method == Method::GET {
                Some(Ok(DeviceRoute::OperationStatus {
                    id_scope,
                    registration_id,
                    operation_id: segments[4].clone(),
                }))
            } else {
                not_allowed()
            }
        }
        _ => None,
    }
}

fn api_version(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.eq_ignore_ascii_case("api-version")
            .then(|| percent_decode_str(value).decode_utf8_lossy().into_owned())
    })
}

fn json_response(status: StatusCode, value: &impl serde::Serialize, retry_after: bool) -> Response {
    let mut response = (status, axum::Json(value)).into_response();
    if retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    response
}

/// Serves one device request; errors come back for the caller to turn into the DPS body.
pub async fn handle(
    provisioning: &Arc<Provisioning>,
    route: DeviceRoute,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
    client: Option<IpAddr>,
    certificates: Option<&[Vec<u8>]>,
) -> Result<Response, ServiceError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let version = api_version(query);
    let bytes = crate::service_api::read_body(headers, body).await?;
    crate::service_api::check_content_type(headers, &bytes)?;
    match route {
        DeviceRoute::Register {
            id_scope,
            registration_id,
        } => {
            let registration: DeviceRegistration = if bytes.iter().all(u8::is_ascii_whitespace) {
                DeviceRegistration::default()
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| ServiceError::MalformedBody(e.to_string()))?
            };
            let call = DeviceCall {
                id_scope: &id_scope,
                registration_id: &registration_id,
                authorization,
                protocol: Protocol::Http,
                client,
                api_version: version.as_deref(),
                certificates,
            };
            // A TPM device's first request: its keys and no credential (§7.3).
            if let Some(tpm) = registration.tpm.as_ref().filter(|t| !t.is_null()) {
                if authorization.is_none() && certificates.is_none_or(<[_]>::is_empty) {
                    let presented = crate::provisioning::tpm::Presented::from_body(tpm)?;
                    let blob = provisioning.tpm_challenge(call, &presented).await?;
                    return Ok(json_response(
                        StatusCode::UNAUTHORIZED,
                        &serde_json::json!({
                            "authenticationKey": blob,
                            "keyName": "registration",
                            "message": "Authorization required, resend request using supplied key",
                        }),
                        false,
                    ));
                }
            }
            let status = provisioning.register(call, registration).await?;
            Ok(json_response(StatusCode::ACCEPTED, &status, true))
        }
        DeviceRoute::OperationStatus {
            id_scope,
            registration_id,
            operation_id,
        } => {
            let call = DeviceCall {
                id_scope: &id_scope,
                registration_id: &registration_id,
                authorization,
                protocol: Protocol::Http,
                client,
                api_version: version.as_deref(),
                certificates,
            };
            let status = provisioning.operation_status(call, &operation_id).await?;
            if status.is_assigning() {
                Ok(json_response(StatusCode::ACCEPTED, &status, true))
            } else {
                Ok(json_response(StatusCode::OK, &status, false))
            }
        }
        DeviceRoute::StatusLookup {
            id_scope,
            registration_id,
        } => {
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                let _: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| ServiceError::MalformedBody(e.to_string()))?;
            }
            let call = DeviceCall {
                id_scope: &id_scope,
                registration_id: &registration_id,
                authorization,
                protocol: Protocol::Http,
                client,
                api_version: version.as_deref(),
                certificates,
            };
            let state = provisioning.status_lookup(call).await?;
            Ok(json_response(StatusCode::OK, &state, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_device_paths_and_leaves_service_paths_alone() {
        assert!(matches!(
            route(&Method::PUT, "/0ne00000001/registrations/dev-1/register"),
            Some(Ok(DeviceRoute::Register { id_scope, registration_id })) if id_scope == "0ne00000001" && registration_id == "dev-1"
        ));
        assert!(matches!(
            route(
                &Method::GET,
                "/0ne00000001/registrations/dev-1/operations/4.abc.def"
            ),
            Some(Ok(DeviceRoute::OperationStatus { .. }))
        ));
        assert!(matches!(
            route(&Method::POST, "/0ne00000001/registrations/dev-1"),
            Some(Ok(DeviceRoute::StatusLookup { .. }))
        ));
        assert!(matches!(
            route(&Method::GET, "/0ne00000001/registrations/dev-1/register"),
            Some(Err(_))
        ));
        assert!(route(&Method::POST, "/registrations/group/query").is_none());
        assert!(route(&Method::GET, "/enrollments/x").is_none());
        assert_eq!(
            api_version(Some("api-version=2019-03-31")).as_deref(),
            Some("2019-03-31")
        );
    }
}
