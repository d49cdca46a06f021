//! HTTP/1.1 over the TLS stream with hyper's connection-level client: one `Sender` is one TLS
//! connection, so "a fresh connection per device" and "kept-alive connections" are exactly
//! what the run asks for, with no hidden pool.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use crate::cli::Target;
use crate::net::{self, Tls};
use crate::outcome::{Failure, FailureKind};

/// Longest answer body read (a page of 1000 registration records fits).
const MAX_BODY: usize = 8 * 1024 * 1024;

pub type Sender = SendRequest<Full<Bytes>>;

/// An answer: status, headers, the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `retry-after` header in whole seconds, when it is one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Where requests go and how the connection is secured.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub target: Target,
    pub tls: Tls,
    pub timeout: Duration,
}

/// Opens a TLS connection and an HTTP/1.1 client on it; the connection's driver runs as a
/// task that ends when the sender is dropped or the server closes.
pub async fn open(endpoint: &Endpoint, config: Arc<ClientConfig>) -> Result<Sender, Failure> {
    let stream = net::connect(
        endpoint.target.https(),
        config,
        endpoint.tls.server_name.clone(),
        endpoint.timeout,
    )
    .await?;
    let (sender, connection) =
        tokio::time::timeout(endpoint.timeout, http1::handshake(TokioIo::new(stream)))
            .await
            .map_err(|_| Failure::timeout("tls", endpoint.timeout))?
            .map_err(|e| Failure::new(FailureKind::Io, e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A request with the headers the SDKs send (wire-protocol.md §3.2).
pub fn request(
    method: Method,
    target: &Target,
    path_and_query: &str,
    authorization: Option<&str>,
    body: Option<Vec<u8>>,
    extra: &[(&'static str, String)],
) -> Result<Request<Full<Bytes>>, Failure> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, target.authority())
        .header(hyper::header::ACCEPT, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("berth-loadgen/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(token) = authorization {
        builder = builder.header(hyper::header::AUTHORIZATION, token);
    }
    if body.is_some() {
        builder = builder.header(
            hyper::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
    }
    for (name, value) in extra {
        let value = HeaderValue::from_str(value)
            .map_err(|e| Failure::protocol(format!("header {name}: {e}")))?;
        builder = builder.header(HeaderName::from_static(name), value);
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Failure::protocol(e.to_string()))
}

/// Why an exchange failed, and whether it failed because a kept-alive connection had been
/// closed before the request went out (then one retry on a new connection is safe).
struct ExchangeError {
    failure: Failure,
    stale: bool,
}

async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Reply, ExchangeError> {
    let work = async {
        sender.ready().await.map_err(|e| ExchangeError {
            stale: true,
            failure: Failure::new(FailureKind::Io, e.to_string()),
        })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ExchangeError {
                stale: e.is_canceled() || e.is_incomplete_message(),
                failure: Failure::new(FailureKind::Io, e.to_string()),
            })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ExchangeError {
                stale: false,
                failure: Failure::new(FailureKind::Io, format!("reading the body: {e}")),
            })?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(ExchangeError {
                stale: false,
                failure: Failure::timeout("answer", timeout),
            })
        })
}

/// A device's own connection: opened at its first request, kept for its polls, reopened
/// (at most once per request) if the server closed it in between.
pub struct Dedicated<'a> {
    endpoint: &'a Endpoint,
    config: Arc<ClientConfig>,
    sender: Option<Sender>,
}

impl<'a> Dedicated<'a> {
    pub fn new(endpoint: &'a Endpoint, config: Arc<ClientConfig>) -> Self {
        Self {
            endpoint,
            config,
            sender: None,
        }
    }

    pub async fn send(
        &mut self,
        make: impl Fn() -> Result<Request<Full<Bytes>>, Failure>,
    ) -> Result<Reply, Failure> {
        let reused = self.sender.take().filter(|s| !s.is_closed());
        let was_reused = reused.is_some();
        let mut sender = match reused {
            Some(sender) => sender,
            None => open(self.endpoint, Arc::clone(&self.config)).await?,
        };
        match exchange(&mut sender, make()?, self.endpoint.timeout).await {
            Ok(reply) => {
                self.sender = Some(sender);
                Ok(reply)
            }
            Err(error) if error.stale && was_reused => {
                let mut sender = open(self.endpoint, Arc::clone(&self.config)).await?;
                let reply = exchange(&mut sender, make()?, self.endpoint.timeout)
                    .await
                    .map_err(|e| e.failure)?;
                self.sender = Some(sender);
                Ok(reply)
            }
            Err(error) => Err(error.failure),
        }
    }
}

/// Kept-alive connections shared by all devices: a request takes an idle one or opens one,
/// and gives it back after the answer. At most one connection per request in flight.
pub struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Vec<Sender>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Option<Sender> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: Sender) {
        if !sender.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(sender);
        }
    }

    pub async fn send(
        &self,
        make: impl Fn() -> Result<Request<Full<Bytes>>, Failure>,
    ) -> Result<Reply, Failure> {
        let config = Arc::clone(&self.endpoint.tls.anonymous);
        let (mut sender, reused) = match self.take() {
            Some(sender) => (sender, true),
            None => (open(&self.endpoint, Arc::clone(&config)).await?, false),
        };
        match exchange(&mut sender, make()?, self.endpoint.timeout).await {
            Ok(reply) => {
                self.give_back(sender);
                Ok(reply)
            }
            Err(error) if error.stale && reused => {
                let mut sender = open(&self.endpoint, config).await?;
                let reply = exchange(&mut sender, make()?, self.endpoint.timeout)
                    .await
                    .map_err(|e| e.failure)?;
                self.give_back(sender);
                Ok(reply)
            }
            Err(error) => Err(error.failure),
        }
    }
}
