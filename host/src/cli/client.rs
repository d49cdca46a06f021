//! A small client of Berth's service API for the management commands: it signs requests
//! with a service SAS token, as the Azure service SDKs do, and trusts the instance's CA.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::attestation::sas::build_token;
use crate::clock::unix_now;
use crate::hubs::HubConnectionString;

/// Where to send requests and with which key.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host` or `host:port`, as in the connection string.
    pub authority: String,
    pub key_name: String,
    pub key: Vec<u8>,
    pub ca_file: Option<PathBuf>,
    /// Connect here instead of resolving the host (local data-directory mode).
    pub connect_to: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach {0}: {1}")]
    Transport(String, reqwest::Error),
    #[error("the service answered {status}: {message}")]
    Service {
        status: StatusCode,
        code: Option<i64>,
        message: String,
    },
}

impl Target {
    /// From a service connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`).
    pub fn from_connection_string(
        text: &str,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, ClientError> {
        let parsed = HubConnectionString::parse(text)
            .map_err(|why| ClientError::Setup(format!("connection string: {why}")))?;
        let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &parsed.key)
            .map_err(|_| {
            ClientError::Setup("the connection string key is not Base64".to_owned())
        })?;
        Ok(Self {
            authority: parsed.host_name,
            key_name: parsed.key_name,
            key,
            ca_file,
            connect_to: None,
        })
    }
}

/// A connected client.
pub struct Client {
    target: Target,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: Target) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .use_rustls_tls();
        if let Some(ca) = &target.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Setup(format!("cannot read {}: {e}", ca.display())))?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ClientError::Setup(format!("{} is not a PEM certificate: {e}", ca.display()))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        if let Some(address) = target.connect_to {
            let host = target
                .authority
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            builder = builder.resolve(&host, address);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Setup(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { target, http })
    }

    /// Sends one request; returns the JSON body (Null for 204) and the response headers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(Value, reqwest::header::HeaderMap), ClientError> {
        let url = format!(
            "https://{}{path}?api-version={}",
            self.target.authority,
            crate::service_api::API_VERSION
        );
        let token = build_token(
            &self.target.authority,
            &self.target.key,
            Some(&self.target.key_name),
            unix_now() + 3600,
        );
        let mut request = self
            .http
            .request(method, &url)
            .header("Authorization", token);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))?;
        let status = response.status();
        let response_headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            return Err(ClientError::Service {
                status,
                code: value.get("errorCode").and_then(Value::as_i64),
                message: value.get("message").and_then(Value::as_str).map_or_else(
                    || String::from_utf8_lossy(&bytes).into_owned(),
                    str::to_owned,
                ),
            });
        }
        Ok((value, response_headers))
    }

    /// PUTs raw bytes (policy uploads); `query` is appended after `api-version`.
    pub async fn upload(
        &self,
        path: &str,
        query: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<Value, ClientError> {
        let mut url = format!(
            "https://{}{path}?api-version={}",
            self.target.authority,
            crate::service_api::API_VERSION
        );
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        let response = self
            .http
            .put(&url)
            .header("Authorization", self.token())
            .header("Content-Type", content_type)
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))?;
        Self::json_or_error(response, &self.target.authority).await
    }

    /// GETs raw bytes (policy downloads).
    pub async fn download(&self, path: &str, query: &str) -> Result<Vec<u8>, ClientError> {
        let mut url = format!(
            "https://{}{path}?api-version={}",
            self.target.authority,
            crate::service_api::API_VERSION
        );
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        let response = self
            .http
            .get(&url)
            .header("Authorization", self.token())
            .send()
            .await
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))?;
        if !response.status().is_success() {
            return Self::json_or_error(response, &self.target.authority)
                .await
                .map(|_| Vec::new());
        }
        response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))
    }

    /// Like `call`, for a path that already carries a query string.
    pub async fn call_raw_path(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<(Value, reqwest::header::HeaderMap), ClientError> {
        let separator = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "https://{}{path_and_query}{separator}api-version={}",
            self.target.authority,
            crate::service_api::API_VERSION
        );
        let mut request = self
            .http
            .request(method, &url)
            .header("Authorization", self.token());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Transport(self.target.authority.clone(), e))?;
        let headers = response.headers().clone();
        Ok((
            Self::json_or_error(response, &self.target.authority).await?,
            headers,
        ))
    }

    fn token(&self) -> String {
        build_token(
            &self.target.authority,
            &self.target.key,
            Some(&self.target.key_name),
            unix_now() + 3600,
        )
    }

    async fn json_or_error(
        response: reqwest::Response,
        authority: &str,
    ) -> Result<Value, ClientError> {
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(authority.to_owned(), e))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            return Err(ClientError::Service {
                status,
                code: value.get("errorCode").and_then(Value::as_i64),
                message: value.get("message").and_then(Value::as_str).map_or_else(
                    || String::from_utf8_lossy(&bytes).into_owned(),
                    str::to_owned,
                ),
            });
        }
        Ok(value)
    }

    /// Runs a query to the end, following `x-ms-continuation`.
    pub async fn query_all(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        // Bounded: a misbehaving server cannot keep the CLI looping forever.
        for _ in 0..100_000 {
            let mut headers = vec![("x-ms-max-item-count", "1000".to_owned())];
            if let Some(token) = &continuation {
                headers.push(("x-ms-continuation", token.clone()));
            }
            let (page, response_headers) = self.call(Method::POST, path, body, &headers).await?;
            if let Value::Array(page) = page {
                items.extend(page);
            }
            continuation = response_headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if continuation.is_none() {
                break;
            }
        }
        Ok(items)
    }
}
