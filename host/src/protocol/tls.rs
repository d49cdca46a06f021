//! The server's TLS identity (DESIGN decision 4): an operator-supplied certificate and key,
//! and the request for (not requirement of) a client certificate,
//! or an ECDSA P-256 certificate for `localhost`, `127.0.0.1` and `::1`, signed by a local
//! CA generated on first start, whose PEM is written to the data directory for clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::instance::write_private;

pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot generate the TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the TLS certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the listener serves, and the CA file clients should trust (when generated).
pub struct TlsIdentity {
    pub config: Arc<ServerConfig>,
    pub ca_file: Option<PathBuf>,
}

/// Loads the operator's certificate, or the generated one (creating it on first start).
pub fn load_or_create(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<TlsIdentity, TlsError> {
    let (cert_path, key_path, ca_file) = if let (Some(cert), Some(key)) = (cert, key) {
        (cert.to_path_buf(), key.to_path_buf(), None)
    } else {
        let cert_path = data_dir.join(SERVER_CERT_FILE);
        let key_path = data_dir.join(SERVER_KEY_FILE);
        let ca_path = data_dir.join(CA_FILE);
        if !(cert_path.exists() && key_path.exists() && ca_path.exists()) {
            generate(data_dir)?;
        }
        (cert_path, key_path, Some(ca_path))
    };
    let chain = read_chain(&cert_path)?;
    let private_key = read_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(RequestClientCertificate {
        provider: provider.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Devices connect a few times in their life and the SDKs do not resume TLS 1.3 sessions;
    // tickets would cost every handshake an encryption and a separate write.
    config.send_tls13_tickets = 0;
    Ok(TlsIdentity {
        config: Arc::new(config),
        ca_file,
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let chain = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error(path))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(io_error(path))?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "private key",
        })
}

/// Generates the local CA and the server certificate it signs.
fn generate(data_dir: &Path) -> Result<(), TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Berth local CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "Berth");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(3650);
    let ca = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(825);
    let server = params.signed_by(&server_key, &ca, &ca_key)?;

    let write = |name: &str, contents: &str| {
        let path = data_dir.join(name);
        write_private(&path, contents.as_bytes()).map_err(io_error(&path))
    };
    write(CA_KEY_FILE, &ca_key.serialize_pem())?;
    write(SERVER_KEY_FILE, &server_key.serialize_pem())?;
    write(SERVER_CERT_FILE, &server.pem())?;
    // Written last: its presence means the set is complete. Public, so readable by all.
    let ca_path = data_dir.join(CA_FILE);
    std::fs::write(&ca_path, ca.pem()).map_err(io_error(&ca_path))?;
    Ok(())
}

/// Requests a client certificate without requiring one, with an empty list of acceptable CA
/// names (wire-protocol.md §1.3: SAS devices send none, and .NET picks its certificate by
/// those names). Any chain is accepted here; the handshake still proves the client holds the
/// leaf's private key (the signature checks below), and X.509 attestation validates the
/// chain against enrollments and verified CAs itself.
#[derive(Debug)]
struct RequestClientCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for RequestClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Longest time a device may take to finish the TLS handshake on a device port.
const DEVICE_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The chain a client presented in the TLS handshake (its signature already verified).
pub fn peer_chain(connection: &rustls::ServerConnection) -> Option<Arc<Vec<Vec<u8>>>> {
    connection
        .peer_certificates()
        .map(|chain| Arc::new(chain.iter().map(|c| c.to_vec()).collect()))
}

/// Accepts TLS connections on a device port (MQTT 8883, AMQP 5671) until `shutdown`
/// resolves; each finished handshake goes to `serve` with the peer and its certificate chain.
pub async fn serve_device_port<F, Fut>(
    protocol: &'static str,
    listener: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
    serve: F,
) where
    F: Fn(
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            std::net::SocketAddr,
            Option<Arc<Vec<Vec<u8>>>>,
        ) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %error, protocol, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Requests and answers are small writes; Nagle would hold an answer written
                // after a PUBACK until the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let serve = serve.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(DEVICE_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let certificates = peer_chain(stream.get_ref().1);
                            serve(stream, peer, certificates).await;
                        }
                        Ok(Err(error)) => tracing::debug!(error = %error, peer = %peer, protocol, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %peer, protocol, "TLS handshake timed out"),
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
}
