//! A fake custom allocation webhook: a test double that answers from a script and records what
//! it received, over plain HTTP or HTTPS (a fresh test CA) on `127.0.0.1`.
//!
//! The script is a list of [`Reply`]s, one per request; the last one repeats once the list is
//! spent. Each request is recorded with its arrival time so a test can measure retry waits.
//!
//! Include it from a test file with `mod fake_webhook;`. It runs on the test's Tokio runtime
//! (tests are `#[tokio::test]`) and stops when the [`FakeWebhook`] is dropped.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use serde_json::Value;

/// The function key every fake webhook URL carries, as Azure Functions do (`?code=…`).
pub const FUNCTION_KEY: &str = "fAkEfUnCtIoNkEy0123456789==";
/// The path of the fake function.
pub const PATH: &str = "/api/HttpTrigger1";

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: Option<&'static str>,
    /// Extra headers, e.g. `Location`.
    pub headers: Vec<(&'static str, String)>,
    /// How long to wait before answering.
    pub delay: Duration,
    /// Send the body in 8 KiB chunks without a `Content-Length`.
    pub chunked: bool,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            body: serde_json::to_vec(body).unwrap(),
            content_type: Some("application/json; charset=utf-8"),
            headers: Vec::new(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    /// A status with an empty body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: Vec::new(),
            content_type: None,
            headers: Vec::new(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    /// Raw bytes with a content type.
    pub fn raw(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: Some(content_type),
            headers: Vec::new(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    /// The raw body, to check nothing secret is in it.
    pub raw_body: String,
    /// The body, when it parsed as JSON.
    pub body: Option<Value>,
}

/// A running fake webhook. Dropping it stops the server.
pub struct FakeWebhook {
    shared: Arc<Shared>,
    base: String,
    ca_pem_path: Option<PathBuf>,
    /// Holds the CA file of an HTTPS webhook for as long as it runs.
    dir: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Shared {
    script: Mutex<Script>,
}

struct Script {
    replies: VecDeque<Reply>,
    last: Reply,
    received: Vec<Received>,
}

impl FakeWebhook {
    /// A plain-HTTP webhook answering `replies` in order, the last one repeated.
    pub async fn start(replies: Vec<Reply>) -> Self {
        Self::start_with(replies, None).await
    }

    /// An HTTPS webhook with a certificate for `localhost` and `127.0.0.1` from a fresh CA
    /// ([`FakeWebhook::ca_pem_path`]).
    pub async fn start_https(replies: Vec<Reply>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (tls, ca_pem) = tls_identity();
        let path = dir.path().join("fake-webhook-ca.pem");
        std::fs::write(&path, ca_pem).unwrap();
        let mut webhook = Self::start_with(replies, Some(tls)).await;
        webhook.ca_pem_path = Some(path);
        webhook.dir = Some(dir);
        webhook
    }

    async fn start_with(replies: Vec<Reply>, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let replies = VecDeque::from(replies);
        let last = replies
            .back()
            .cloned()
            .unwrap_or_else(|| Reply::status(500));
        let shared = Arc::new(Shared {
            script: Mutex::new(Script {
                replies,
                last,
                received: Vec::new(),
            }),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(listener, tls, app, stopped));
        Self {
            shared,
            base: format!("{scheme}://127.0.0.1:{port}"),
            ca_pem_path: None,
            dir: None,
            shutdown: Some(shutdown),
        }
    }

    /// `http://127.0.0.1:PORT/api/HttpTrigger1?code=FUNCTION_KEY`.
    pub fn url(&self) -> String {
        format!("{}{PATH}?code={FUNCTION_KEY}", self.base)
    }

    /// The URL as DPS shows it: `…/api/HttpTrigger1?****`.
    pub fn masked_url(&self) -> String {
        format!("{}{PATH}?****", self.base)
    }

    pub fn ca_pem_path(&self) -> &Path {
        self.ca_pem_path.as_deref().unwrap()
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.script().received.clone()
    }

    /// The one request received; panics unless there was exactly one.
    pub fn only_request(&self) -> Received {
        let received = self.received();
        assert_eq!(received.len(), 1, "expected one request: {received:#?}");
        received.into_iter().next().unwrap()
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.shared.script.lock().unwrap()
    }
}

impl Drop for FakeWebhook {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut script = shared.script.lock().unwrap();
        script.received.push(Received {
            at: Instant::now(),
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            raw_body: String::from_utf8_lossy(&body).into_owned(),
            body: serde_json::from_slice(&body).ok(),
        });
        let next = script.replies.pop_front();
        next.unwrap_or_else(|| script.last.clone())
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body = if reply.chunked {
        let chunks: Vec<Result<Bytes, Infallible>> = reply
            .body
            .chunks(8 * 1024)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    } else {
        Body::from(reply.body)
    };
    let mut response = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
    if let Some(content_type) = reply.content_type {
        response = response.header(header::CONTENT_TYPE, content_type);
    }
    for (name, value) in reply.headers {
        response = response.header(name, value);
    }
    response.body(body).unwrap()
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let builder = Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            _ = &mut stopped => break,
        }
    }
}

/// A CA and a `localhost` / `127.0.0.1` server certificate it signs; returns the server
/// config and the CA's PEM.
fn tls_identity() -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Fake webhook test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (Arc::new(config), ca.pem())
}
