#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The load generator's own counting, on small runs against the real `berth` binary: every
//! device it reports assigned has an assigned registration record, checked by its --verify
//! and, independently, by this test through the service API. Not a timing test.
//!
//! The server binary is `$BERTH_BIN`, else `<workspace>/target/debug/berth` (build it with
//! `cargo build -p berth`); the test fails, not skips, without it.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_berth-loadgen");
const DEVICES: u64 = 30;

fn berth_binary() -> PathBuf {
    let path = std::env::var_os("BERTH_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/berth"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "the berth server binary is not at {}: build it with `cargo build -p berth` (from the \
         workspace root) or point BERTH_BIN at one",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `berth serve` on loopback with a temporary data directory.
struct Server {
    child: Child,
    port: u16,
    mqtt_port: u16,
    /// The AMQP-over-TLS port, for builds that serve AMQP.
    amqp_port: Option<u16>,
    id_scope: String,
    connection_string: String,
    ca: PathBuf,
    _data_dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let binary = berth_binary();
        let data_dir = tempfile::tempdir().unwrap();
        let (port, mqtt_port) = (free_port(), free_port());
        let mut command = Command::new(&binary);
        command
            .args(["serve", "--bind", "127.0.0.1", "--https-port"])
            .arg(port.to_string())
            .arg("--mqtt-port")
            .arg(mqtt_port.to_string())
            .arg("--data-dir")
            .arg(data_dir.path());
        // Builds that serve AMQP listen on 5671 by default: give them a free port instead.
        let help = Command::new(&binary)
            .args(["serve", "--help"])
            .output()
            .unwrap();
        let amqp_port = String::from_utf8_lossy(&help.stdout)
            .contains("--amqp-port")
            .then(free_port);
        if let Some(port) = amqp_port {
            command.arg("--amqp-port").arg(port.to_string());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !banner.iter().any(|l| l.starts_with("Next:")) {
            assert!(
                Instant::now() < deadline,
                "no banner from berth: {banner:?}"
            );
            match receiver.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => banner.push(line),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("berth exited early with {status}; printed {banner:?}");
                    }
                }
            }
        }
        let value = |label: &str| {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("{label} not in {banner:?}"))
        };
        Server {
            port,
            mqtt_port,
            amqp_port,
            id_scope: value("ID scope:"),
            connection_string: value("Connection string:"),
            ca: PathBuf::from(value("Trust this CA:")),
            child,
            _data_dir: data_dir,
        }
    }

    /// Runs the load generator with --verify --json; its report and exit code.
    fn load(&self, prefix: &str, mode: &[&str]) -> (Value, Option<i32>) {
        let mut command = Command::new(LOADGEN);
        if let Some(port) = self.amqp_port {
            command.arg("--amqp-port").arg(port.to_string());
        }
        let output = command
            .arg("--target")
            .arg(format!("https://127.0.0.1:{}", self.port))
            .arg("--mqtt-port")
            .arg(self.mqtt_port.to_string())
            .args(["--id-scope", &self.id_scope])
            .args(["--connection-string", &self.connection_string])
            .arg("--ca")
            .arg(&self.ca)
            .args(["--devices", &DEVICES.to_string(), "--concurrency", "4"])
            .args(["--prefix", prefix, "--verify", "--json"])
            .arg("--server-pid")
            .arg(self.child.id().to_string())
            .args(mode)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); exit {:?}\nstdout: {}\nstderr: {stderr}",
                output.status,
                String::from_utf8_lossy(&output.stdout)
            )
        });
        (report, output.status.code())
    }

    fn service_token(&self) -> String {
        let field = |name: &str| {
            self.connection_string
                .split(';')
                .find_map(|p| p.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_owned()
        };
        let key = BASE64.decode(field("SharedAccessKey")).unwrap();
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let sr = utf8_percent_encode(&field("HostName"), NON_ALPHANUMERIC).to_string();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let signature = BASE64.encode(ring::hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes()));
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
            utf8_percent_encode(&signature, NON_ALPHANUMERIC),
            field("SharedAccessKeyName")
        )
    }

    /// The status of a registration record read through the service API, `None` on 404.
    fn record_status(&self, client: &reqwest::blocking::Client, id: &str) -> Option<String> {
        let response = client
            .get(format!(
                "https://127.0.0.1:{}/registrations/{id}?api-version=2021-10-01",
                self.port
            ))
            .header("Authorization", self.service_token())
            .send()
            .unwrap();
        if response.status() == 404 {
            return None;
        }
        assert_eq!(response.status(), 200, "GET /registrations/{id}");
        let record: Value = response.json().unwrap();
        assert_eq!(record["registrationId"], id);
        record["status"].as_str().map(str::to_owned)
    }

    fn client(&self) -> reqwest::blocking::Client {
        let pem = std::fs::read(&self.ca).unwrap();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mode` and checks the counting three ways: the report's own figures, its --verify,
/// and a registration record per reported device read here.
fn every_reported_device_has_a_record(prefix: &str, mode: &[&str]) {
    let server = Server::start();
    assert!(
        server.amqp_port.is_some() || !mode.contains(&"amqp"),
        "this berth build has no --amqp-port"
    );
    let (report, exit) = server.load(prefix, mode);
    assert_eq!(exit, Some(0), "{report:#}");
    assert_eq!(report["devices"], DEVICES, "{report:#}");
    assert_eq!(report["assigned"], DEVICES, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["failures"], Value::Array(Vec::new()), "{report:#}");
    assert!(
        report["server"]["cpuSeconds"].is_number(),
        "server figures from /proc: {report:#}"
    );

    let verify = &report["verify"];
    assert_eq!(verify["ok"], true, "{report:#}");
    assert_eq!(verify["assignedCounted"], DEVICES);
    assert_eq!(verify["recordsForRun"], DEVICES);
    assert_eq!(verify["assignedRecords"], DEVICES);
    for mismatch in ["missing", "notAssigned", "uncounted"] {
        assert_eq!(verify[mismatch], 0, "{mismatch}: {report:#}");
    }

    // Independently of --verify: the devices are `{prefix}-0000000` … and all were reported
    // assigned, so every one of them must have an assigned record.
    let client = server.client();
    for index in 0..DEVICES {
        let id = format!("{prefix}-{index:07}");
        assert_eq!(
            server.record_status(&client, &id).as_deref(),
            Some("assigned"),
            "the record of {id}"
        );
    }
    // And a device the run never simulated has none.
    assert_eq!(
        server.record_status(&client, &format!("{prefix}-{DEVICES:07}")),
        None
    );
}

#[test]
fn symmetric_key_over_https_with_a_connection_per_device() {
    every_reported_device_has_a_record(
        "sym-https",
        &["--attestation", "symmetric-key", "--transport", "https"],
    );
}

#[test]
fn symmetric_key_over_kept_alive_https() {
    every_reported_device_has_a_record(
        "sym-keepalive",
        &[
            "--attestation",
            "symmetric-key",
            "--transport",
            "https-keepalive",
        ],
    );
}

#[test]
fn symmetric_key_over_mqtt_honouring_retry_after() {
    every_reported_device_has_a_record(
        "sym-mqtt",
        &[
            "--attestation",
            "symmetric-key",
            "--transport",
            "mqtt",
            "--poll",
            "retry-after",
        ],
    );
}

#[test]
fn x509_over_https() {
    every_reported_device_has_a_record(
        "x509-https",
        &["--attestation", "x509", "--transport", "https"],
    );
}

#[test]
fn symmetric_key_over_amqp() {
    every_reported_device_has_a_record(
        "sym-amqp",
        &["--attestation", "symmetric-key", "--transport", "amqp"],
    );
}

#[test]
fn x509_over_amqp() {
    every_reported_device_has_a_record(
        "x509-amqp",
        &["--attestation", "x509", "--transport", "amqp"],
    );
}

#[test]
fn refused_devices_are_counted_failed_by_kind_and_have_no_record() {
    let server = Server::start();
    // A group key that no enrollment holds: every device is refused at register.
    let (report, exit) = server.load(
        "refused",
        &[
            "--setup",
            "false",
            "--enrollment-group",
            "nobody",
            "--group-key",
            "AAAAAAAAAAAAAAAAAAAAAA==",
        ],
    );
    assert_eq!(exit, Some(1), "failures make the exit code 1: {report:#}");
    assert_eq!(report["assigned"], 0, "{report:#}");
    assert_eq!(report["failed"], DEVICES, "{report:#}");
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{report:#}");
    assert_eq!(failures[0]["category"], "status");
    assert_eq!(failures[0]["httpStatus"], 401);
    assert_eq!(failures[0]["errorCode"], 401_002);
    assert_eq!(failures[0]["count"], DEVICES);
    assert_eq!(report["verify"]["ok"], true, "{report:#}");
    assert_eq!(report["verify"]["recordsForRun"], 0);
    let client = server.client();
    assert_eq!(server.record_status(&client, "refused-0000000"), None);
}

#[test]
fn amqp_devices_refused_in_sasl_are_counted_by_kind_and_have_no_record() {
    let server = Server::start();
    assert!(
        server.amqp_port.is_some(),
        "this berth build has no --amqp-port"
    );
    let (report, exit) = server.load(
        "refused-amqp",
        &[
            "--transport",
            "amqp",
            "--setup",
            "false",
            "--enrollment-group",
            "nobody",
            "--group-key",
            "AAAAAAAAAAAAAAAAAAAAAA==",
        ],
    );
    assert_eq!(exit, Some(1), "failures make the exit code 1: {report:#}");
    assert_eq!(report["assigned"], 0, "{report:#}");
    assert_eq!(report["failed"], DEVICES, "{report:#}");
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{report:#}");
    assert_eq!(failures[0]["category"], "transport");
    assert_eq!(
        failures[0]["kind"],
        "SASL authentication refused (outcome auth)"
    );
    assert_eq!(failures[0]["count"], DEVICES);
    assert_eq!(report["verify"]["ok"], true, "{report:#}");
    assert_eq!(report["verify"]["recordsForRun"], 0);
    let client = server.client();
    assert_eq!(server.record_status(&client, "refused-amqp-0000000"), None);
}

#[test]
fn a_target_beyond_loopback_is_refused_before_anything_is_sent() {
    let output = Command::new(LOADGEN)
        .args([
            "--target",
            "https://192.0.2.1:443",
            "--id-scope",
            "0ne00000001",
        ])
        .args([
            "--connection-string",
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=AA==",
        ])
        .args(["--ca", "/nonexistent.pem"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only sends to loopback"), "{stderr}");
}
