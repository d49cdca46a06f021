//! TCP and TLS to loopback: client configurations (trusting only --ca, no session resumption,
//! so every connection pays the handshake a new device pays) and a connect with timeouts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::cli::{Target, TlsVersion};
use crate::outcome::{Failure, FailureKind};

/// Connections opened during the run (every one a full TLS handshake).
pub static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// What every connection needs: the trusted roots and the name the server must prove.
#[derive(Debug, Clone)]
pub struct Tls {
    roots: Arc<RootCertStore>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    pub server_name: ServerName<'static>,
    /// Without a client certificate (symmetric-key devices, the service API).
    pub anonymous: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Trusts the certificates of the PEM `ca` (Berth's "Trust this CA:" file) and nothing else.
    pub fn new(ca_pem: &[u8], target: &Target, version: TlsVersion) -> Result<Self, String> {
        let versions = match version {
            TlsVersion::Any => rustls::DEFAULT_VERSIONS,
            TlsVersion::V1_2 => TLS12,
            TlsVersion::V1_3 => TLS13,
        };
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            let certificate =
                certificate.map_err(|e| format!("--ca is not a PEM certificate file: {e}"))?;
            roots
                .add(certificate)
                .map_err(|e| format!("--ca holds a certificate rustls refuses: {e}"))?;
        }
        if roots.is_empty() {
            return Err("--ca holds no certificate".to_owned());
        }
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| format!("'{}' is not a TLS server name: {e}", target.host))?;
        let roots = Arc::new(roots);
        let anonymous = Self::config(&roots, versions, None).map_err(|e| e.to_string())?;
        Ok(Self {
            roots,
            versions,
            server_name,
            anonymous,
        })
    }

    fn config(
        roots: &Arc<RootCertStore>,
        versions: &[&'static rustls::SupportedProtocolVersion],
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_root_certificates(Arc::clone(roots));
        let mut config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A configuration that presents `chain` (leaf first) with the leaf's `key`.
    pub fn with_client_certificate(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        Self::config(&self.roots, self.versions, Some((chain, key)))
    }
}

/// Opens TCP (no Nagle delay) and TLS to `address`, which must be loopback.
pub async fn connect(
    address: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, Failure> {
    // --target was checked already; this keeps any other path from leaving loopback.
    if !address.ip().is_loopback() {
        return Err(Failure::new(
            FailureKind::Connect,
            format!("{address} is not loopback"),
        ));
    }
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| Failure::timeout("connect", timeout))?
        .map_err(|e| Failure::new(FailureKind::Connect, format!("{address}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    tokio::time::timeout(
        timeout,
        TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| Failure::timeout("tls", timeout))?
    .map_err(|e| Failure::new(FailureKind::Tls, e.to_string()))
}
