//! The HTTPS listener (port 443 by default): TLS by rustls, HTTP/1.1 and HTTP/2 by hyper,
//! requests handed to the axum application with the peer address attached. Shutdown stops
//! accepting, then lets in-flight requests finish within a grace period.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::service_api::{ClientAddr, ClientCertificates};

/// Longest time a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a client may take to send request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for HTTPS: {source}. {hint}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: std::io::Error,
    hint: String,
}

/// Binds the HTTPS port: on `bind`, or on all interfaces (IPv6 with IPv4, else IPv4 only).
pub async fn bind(bind: Option<IpAddr>, port: u16) -> Result<TcpListener, BindError> {
    let candidates: Vec<SocketAddr> = match bind {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ],
    };
    let mut last = None;
    for address in candidates {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(source) => last = Some((address, source)),
        }
    }
    let (address, source) = last.unwrap_or_else(|| {
        (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            std::io::Error::other("no address to bind"),
        )
    });
    let mut hint =
        format!(
        "Choose another port with --https-port (or BERTH_HTTPS_PORT), for example --https-port {}",
        if port == 443 { 8443 } else { port.saturating_add(1) }
    );
    if source.kind() == std::io::ErrorKind::PermissionDenied && port < 1024 {
        hint.push_str("; ports below 1024 need root or CAP_NET_BIND_SERVICE");
    }
    if source.kind() == std::io::ErrorKind::AddrInUse {
        hint.push_str("; another process already uses this port");
    }
    Err(BindError {
        address,
        source,
        hint,
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains for at most `grace`.
pub async fn run(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Requests and answers are small writes; Nagle would hold an answer written
                // after a PUBACK or TLS tickets until the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(error = %error, peer = %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certificates = crate::protocol::tls::peer_chain(stream.get_ref().1).map(ClientCertificates);
                    let service = app.map_request(move |mut request: hyper::Request<Incoming>| {
                        request.extensions_mut().insert(ClientAddr(peer));
                        if let Some(certificates) = &certificates {
                            request.extensions_mut().insert(certificates.clone());
                        }
                        request
                    });
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
                        .into_owned();
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(error = %error, peer = %peer, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_seconds = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}
