#![allow(clippy::unwrap_used)]
//! The real `berth` binary on loopback with a temporary data directory: first start and
//! restart, port errors, graceful shutdown, and two nodes sharing one `PostgreSQL` database.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    child: Child,
    port: u16,
    data_dir: PathBuf,
    banner: Vec<String>,
    env: Vec<(String, String)>,
}

impl Node {
    fn start(data_dir: &Path, port: u16, env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(BIN);
        command
            .args([
                "serve",
                "--bind",
                "127.0.0.1",
                "--https-port",
                &port.to_string(),
                "--data-dir",
            ])
            .arg(data_dir)
            .args(["--mqtt-port", &free_port().to_string()])
            .args(["--amqp-port", &free_port().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match receiver.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let last = line.starts_with("Next:");
                    banner.push(line);
                    if last {
                        break;
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("berth exited early with {status}; printed {banner:?}");
                    }
                }
            }
        }
        assert!(
            banner.iter().any(|l| l.starts_with("Next:")),
            "no banner: {banner:?}"
        );
        Node {
            child,
            port,
            data_dir: data_dir.to_path_buf(),
            banner,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn banner_value(&self, label: &str) -> String {
        self.banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("{label} not in {:?}", self.banner))
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--https-port", &self.port.to_string()]);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.output().unwrap()
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "berth did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(ca: &Path) -> reqwest::blocking::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn token(connection_string: &str) -> String {
    let field = |name: &str| {
        connection_string
            .split(';')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    };

    let key = base64::engine::general_purpose::STANDARD
        .decode(field("SharedAccessKey"))
        .unwrap();
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    berth::attestation::sas::build_token(
        &field("HostName"),
        &key,
        Some(&field("SharedAccessKeyName")),
        i64::try_from(expiry).unwrap(),
    )
}

#[test]
fn first_start_creates_the_instance_and_a_restart_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = Node::start(dir.path(), port, &[]);
    let scope = node.banner_value("ID scope:");
    assert!(scope.starts_with("0ne") && scope.len() == 11, "{scope}");
    let connection_string = node.banner_value("Connection string:");
    assert!(connection_string.starts_with(&format!(
        "HostName=localhost:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
    )));
    let ca = dir.path().join("ca.pem");
    assert_eq!(
        node.banner_value("Trust this CA:"),
        ca.display().to_string()
    );
    let printed = node.cli(&["connection-string"]);
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        connection_string
    );

    let http = client(&ca);
    let base = format!("https://localhost:{port}");
    assert_eq!(
        http.get(format!("{base}/healthz")).send().unwrap().status(),
        200
    );
    let created = http
        .put(format!("{base}/enrollments/dev-1?api-version=2021-10-01"))
        .header("Authorization", token(&connection_string))
        .json(&json!({"attestation": {"type": "symmetricKey"}}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 200);
    // The TLS certificate also covers 127.0.0.1.
    assert_eq!(
        http.get(format!("https://127.0.0.1:{port}/readyz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert!(node.terminate().success(), "SIGTERM ends berth cleanly");

    let node = Node::start(dir.path(), port, &[]);
    assert_eq!(node.banner_value("ID scope:"), scope);
    assert_eq!(node.banner_value("Connection string:"), connection_string);
    let listed = node.cli(&["enrollment", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed[0]["registrationId"], "dev-1",
        "what was acknowledged survived the restart"
    );
    assert!(node.terminate().success());
}

#[test]
fn a_port_that_cannot_be_bound_is_named_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--https-port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .args(["--mqtt-port", "0", "--amqp-port", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("--https-port"), "{stderr}");
}

#[test]
fn cli_manages_hubs_groups_and_device_keys() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), free_port(), &[]);
    let out = node.cli(&[
        "hub",
        "link",
        "hub1.azure-devices.net",
        "--location",
        "west",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&[
        "enrollment-group",
        "create",
        "contoso",
        "--hub",
        "hub1.azure-devices.net",
        "--allocation-policy",
        "static",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let group: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = Command::new(BIN)
        .args([
            "compute-device-key",
            "--key",
            &key,
            "--registration-id",
            "toaster-1",
        ])
        .output()
        .unwrap();
    let derived = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        derived,
        berth::attestation::sas::derive_device_key(&key, "toaster-1").unwrap()
    );
    let out = node.cli(&[
        "enrollment-group",
        "update",
        "contoso",
        "--enabled",
        "false",
        "--json",
    ]);
    let updated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert_eq!(
        updated["attestation"]["symmetricKey"]["primaryKey"],
        key.as_str(),
        "update keeps the keys"
    );
    let out = node.cli(&["enrollment-group", "create", "bad_", "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["hub", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hub1.azure-devices.net"));
}

#[test]
fn two_nodes_on_one_postgres_see_each_others_writes() {
    let Ok(base) = std::env::var("BERTH_TEST_POSTGRES_URL") else {
        eprintln!(
            "BERTH_TEST_POSTGRES_URL is not set; the PostgreSQL test runs under tests/run.sh"
        );
        return;
    };
    let url = fresh_database(&base);

    let secret = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let env = [
        ("BERTH_DATABASE_URL", url.as_str()),
        ("BERTH_SECRET_KEY", secret.as_str()),
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Node::start(dir_a.path(), free_port(), &env);
    let b = Node::start(dir_b.path(), free_port(), &env);
    assert_eq!(
        a.banner_value("ID scope:"),
        b.banner_value("ID scope:"),
        "one instance identity in the database"
    );
    let out = a.cli(&["enrollment", "create", "shared-dev", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.cli(&["enrollment", "show", "shared-dev", "--json"]);
    assert!(
        out.status.success(),
        "node B sees node A's write at once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.cli(&["enrollment", "delete", "shared-dev"]);
    assert!(out.status.success());
    let out = a.cli(&["enrollment", "show", "shared-dev"]);
    assert!(!out.status.success(), "node A sees node B's delete");

    // A node with another secret key is refused before it serves anything.
    let other = base64::engine::general_purpose::STANDARD.encode([6u8; 32]);
    let dir_c = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--https-port",
            &free_port().to_string(),
            "--data-dir",
        ])
        .arg(dir_c.path())
        .args(["--mqtt-port", "0", "--amqp-port", "0"])
        .env("BERTH_DATABASE_URL", &url)
        .env("BERTH_SECRET_KEY", &other)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("secret key"));
}

fn fresh_database(base: &str) -> String {
    let name = format!("berth_it_{}", std::process::id());
    let (prefix, _) = base.rsplit_once('/').unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(base).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
    });
    format!("{prefix}/{name}")
}

#[test]
fn an_acknowledged_write_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut node = Node::start(dir.path(), port, &[]);
    let out = node.cli(&["enrollment", "create", "durable-1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    drop(node);
    let node = Node::start(dir.path(), port, &[]);
    let out = node.cli(&["enrollment", "show", "durable-1", "--json"]);
    assert!(
        out.status.success(),
        "the acknowledged enrollment is there after a crash"
    );
}

#[test]
fn an_operator_certificate_replaces_the_generated_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.path().join("op.pem"),
        dir.path().join("op-key.pem"),
        dir.path().join("op-ca.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let cert_arg = cert_path.display().to_string();
    let key_arg = key_path.display().to_string();
    let node = Node::start(
        &data,
        port,
        &[
            ("BERTH_TLS_CERT", cert_arg.as_str()),
            ("BERTH_TLS_KEY", key_arg.as_str()),
        ],
    );
    assert!(!data.join("ca.pem").exists(), "no local CA is generated");
    let status = client(&ca_path)
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 200);
    drop(node);
}

#[test]
fn an_assigned_registration_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut node = Node::start(dir.path(), port, &[]);
    assert!(node
        .cli(&["hub", "link", "hub1.example.net"])
        .status
        .success());
    let out = node.cli(&["enrollment", "create", "kept-1", "--json"]);
    let enrollment: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(
            enrollment["attestation"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let scope = String::from_utf8(node.cli(&["id-scope"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = berth::attestation::sas::build_token(
        &format!("{scope}/registrations/kept-1"),
        &key,
        Some("registration"),
        i64::try_from(now).unwrap() + 600,
    );
    let http = client(&dir.path().join("ca.pem"));
    let base = format!("https://localhost:{port}/{scope}/registrations/kept-1");
    let accepted: Value = http
        .put(format!("{base}/register?api-version=2021-06-01"))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "kept-1"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let operation = accepted["operationId"].as_str().unwrap();
    let mut assigned = false;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        let polled: Value = http
            .get(format!(
                "{base}/operations/{operation}?api-version=2021-06-01"
            ))
            .header("Authorization", &token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if polled["status"] == "assigned" {
            assigned = true;
            break;
        }
    }
    assert!(assigned, "the registration was acknowledged as assigned");
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    drop(node);
    let node = Node::start(dir.path(), port, &[]);
    let out = node.cli(&["registration", "show", "kept-1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["assignedHub"], "hub1.example.net");
}

#[test]
fn tls_requests_but_does_not_require_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = Node::start(dir.path(), port, &[]);
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    // A self-signed device certificate, unknown to the server: the handshake accepts it (the
    // chain is judged by X.509 attestation, not by TLS) and proves the key.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device-x509");
    let certificate = params.self_signed(&key).unwrap();
    let identity = reqwest::Identity::from_pem(
        format!("{}{}", certificate.pem(), key.serialize_pem()).as_bytes(),
    )
    .unwrap();
    let with_certificate = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(identity)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/healthz");
    assert_eq!(with_certificate.get(&url).send().unwrap().status(), 200);
    assert_eq!(
        client(&dir.path().join("ca.pem"))
            .get(&url)
            .send()
            .unwrap()
            .status(),
        200,
        "no certificate is fine too"
    );
    drop(node);
}

/// Presents a certificate with whatever key it is given: a device that does not hold the key
/// of the certificate it sends.
#[derive(Debug)]
struct PresentCertificate(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for PresentCertificate {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// One HTTPS request over a raw rustls connection that signs the handshake with `key`;
/// returns the response text, or the error that ended the connection.
fn request_signed_with(
    port: u16,
    ca: &Path,
    certificate: &rcgen::Certificate,
    key: &rcgen::KeyPair,
    request: &str,
) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(der.unwrap()).unwrap();
    }
    let signing = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![certificate.der().clone()], signing);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(std::sync::Arc::new(PresentCertificate(
            std::sync::Arc::new(certified),
        )));
    let mut connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut stream = rustls::Stream::new(&mut connection, &mut socket);
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => Ok(String::from_utf8_lossy(&response).into_owned()),
        Err(e) if !response.is_empty() => {
            Err(format!("{e} after {}", String::from_utf8_lossy(&response)))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn an_x509_device_registers_over_https_and_one_without_its_key_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = Node::start(dir.path(), port, &[]);
    let ca = dir.path().join("ca.pem");
    let connection_string = node.banner_value("Connection string:");
    let id_scope = node.banner_value("ID scope:");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tls-device-1");
    let certificate = params.self_signed(&key).unwrap();
    let service = client(&ca);
    let base = format!("https://localhost:{port}");
    let link = service
        .put(format!(
            "{base}/linkedHubs/hub1.example.net?api-version=2021-10-01"
        ))
        .header("Authorization", token(&connection_string))
        .json(&json!({}))
        .send()
        .unwrap();
    assert!(link.status().is_success(), "{}", link.text().unwrap());
    let enrolled = service
        .put(format!("{base}/enrollments/tls-device-1?api-version=2021-10-01"))
        .header("Authorization", token(&connection_string))
        .json(&json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": certificate.pem()}}}}}))
        .send()
        .unwrap();
    assert!(
        enrolled.status().is_success(),
        "{}",
        enrolled.text().unwrap()
    );

    let payload = r#"{"registrationId": "tls-device-1"}"#;
    let register = format!(
        "PUT /{id_scope}/registrations/tls-device-1/register?api-version=2021-06-01 HTTP/1.1\r\n\
         Host: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{payload}",
        payload.len()
    );
    let accepted = request_signed_with(port, &ca, &certificate, &key, &register).unwrap();
    assert!(accepted.starts_with("HTTP/1.1 202"), "{accepted}");
    let body: Value = serde_json::from_str(accepted.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let operation = body["operationId"].as_str().unwrap();
    let poll = format!(
        "GET /{id_scope}/registrations/tls-device-1/operations/{operation}?api-version=2021-06-01 HTTP/1.1\r\n\
         Host: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut assigned = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(200));
        let polled = request_signed_with(port, &ca, &certificate, &key, &poll).unwrap();
        if polled.starts_with("HTTP/1.1 200") {
            assert!(polled.contains("\"status\":\"assigned\""), "{polled}");
            assigned = true;
            break;
        }
        assert!(polled.starts_with("HTTP/1.1 202"), "{polled}");
    }
    assert!(assigned, "the X.509 registration finished");

    // The same certificate with a key the device does not hold: the server checks the
    // handshake signature and ends the connection before any request is served.
    let other = rcgen::KeyPair::generate().unwrap();
    let refused = request_signed_with(port, &ca, &certificate, &other, &register);
    let error = refused.unwrap_err();
    assert!(error.contains("alert"), "{error}");
    // The server keeps serving.
    let again = request_signed_with(port, &ca, &certificate, &key, &register).unwrap();
    assert!(again.starts_with("HTTP/1.1 202"), "{again}");
    drop(node);
}
