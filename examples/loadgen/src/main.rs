//! `berth-loadgen`: simulates devices registering with Berth and reports what the server
//! sustained. See README.md in this folder for the flags and how to read the report.
//!
//! A run has three phases: setup (service API: a linked hub if none, an enrollment group for
//! the run, and for X.509 a verified CA and every device certificate), the timed phase
//! (devices register and poll, within --concurrency and --rate), and the report (with
//! --verify, the registration records are compared with what was counted).

#![forbid(unsafe_code)]

mod amqp;
mod certs;
mod cli;
mod device;
mod http;
mod mqtt;
mod net;
mod outcome;
mod process;
mod report;
mod sas;
mod service;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::Parser as _;
use ring::rand::SecureRandom as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::certs::DeviceCa;
use crate::cli::{Args, Attestation, Settings, Transport};
use crate::device::{Context, Credentials, DeviceResult};
use crate::http::{Endpoint, Pool};
use crate::net::Tls;
use crate::outcome::{Failure, FailureKind};
use crate::process::ServerFigures;
use crate::report::{Report, SettingsUsed, Tally};
use crate::sas::ConnectionString;
use crate::service::{Service, ServiceError};

/// How often progress goes to stderr during the timed phase.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Usage(String),
    #[error("setup: {0}")]
    Service(#[from] ServiceError),
    #[error("device certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("berth-loadgen: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("berth-loadgen: {error}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, RunError> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|_| RunError::Usage(format!("{} is not text", path.display())))
}

fn random_key() -> Result<[u8; 64], RunError> {
    let mut key = [0u8; 64];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| RunError::Usage("the system random source failed".to_owned()))?;
    Ok(key)
}

/// Creates (or, with --setup false, takes from the flags) what devices need to attest.
async fn setup(
    args: &Args,
    settings: &Settings,
    service: &Service,
    group: &str,
) -> Result<Credentials, RunError> {
    let usage = |text: &str| RunError::Usage(text.to_owned());
    if args.setup {
        if args.group_key.is_some() || args.device_ca_cert.is_some() || args.device_ca_key.is_some()
        {
            return Err(usage(
                "--group-key, --device-ca-cert and --device-ca-key go with --setup false",
            ));
        }
        if let Some(hub) = service.ensure_linked_hub().await? {
            eprintln!("setup: linked hub {hub} (a record hub inside Berth)");
        }
    }
    match (settings.attestation, args.setup) {
        (Attestation::SymmetricKey, true) => {
            let (primary, secondary) = (random_key()?, random_key()?);
            service
                .put_symmetric_group(group, &BASE64.encode(primary), &BASE64.encode(secondary))
                .await?;
            eprintln!("setup: symmetric-key enrollment group {group}");
            Ok(Credentials::Symmetric {
                group_key: primary.to_vec(),
            })
        }
        (Attestation::SymmetricKey, false) => {
            let key = args.group_key.as_deref().ok_or_else(|| {
                usage("--setup false with symmetric keys needs --enrollment-group and --group-key")
            })?;
            let group_key = BASE64
                .decode(key.trim())
                .map_err(|_| usage("--group-key is not Base64"))?;
            Ok(Credentials::Symmetric { group_key })
        }
        (Attestation::X509, setup) => {
            let ca = if setup {
                let ca = DeviceCa::generate(&format!("{} berth-loadgen CA", settings.prefix))?;
                let name = format!("{}-ca", settings.prefix);
                service.put_verified_ca(&name, &ca.pem).await?;
                service.put_x509_group(group, &name).await?;
                eprintln!("setup: verified CA certificate {name}, X.509 enrollment group {group}");
                ca
            } else {
                let (Some(cert), Some(key)) = (&args.device_ca_cert, &args.device_ca_key) else {
                    return Err(usage(
                        "--setup false with X.509 needs --enrollment-group, --device-ca-cert and --device-ca-key",
                    ));
                };
                DeviceCa::load(&read_text(cert)?, &read_text(key)?).map_err(RunError::Usage)?
            };
            let ids: Vec<String> = (0..settings.devices)
                .map(|i| settings.registration_id(i))
                .collect();
            let started = Instant::now();
            let ca = Arc::new(ca);
            let issuer = Arc::clone(&ca);
            let devices = tokio::task::spawn_blocking(move || issuer.issue_all(&ids))
                .await
                .map_err(|e| usage(&format!("issuing device certificates: {e}")))??;
            eprintln!(
                "setup: issued {} device certificates in {:.1} s (not timed)",
                devices.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(Credentials::X509 {
                ca: ca.der.clone(),
                devices,
            })
        }
    }
}

fn check_group_id(group: &str) -> Result<(), RunError> {
    let valid = !group.is_empty()
        && group.len() <= 128
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
        && !group.ends_with(['.', '_', ':']);
    if valid {
        Ok(())
    } else {
        Err(RunError::Usage(format!(
            "--enrollment-group '{group}' must be 1 to 128 letters, digits or - . _ :"
        )))
    }
}

/// The timed phase: starts every device within --rate and --concurrency, collects results.
/// Returns the tally, the wall time and the time the last device started.
async fn drive(context: Arc<Context>) -> (Tally, Duration, Duration) {
    let settings = &context.settings;
    let slots = Arc::new(Semaphore::new(
        usize::try_from(settings.concurrency).unwrap_or(1),
    ));
    let mut tasks: JoinSet<DeviceResult> = JoinSet::new();
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut last_progress = started;
    let collect = |tally: &mut Tally, joined: Result<DeviceResult, tokio::task::JoinError>| {
        tally.add(joined.unwrap_or_else(|error| DeviceResult {
            index: u64::MAX,
            outcome: Err(Failure::new(FailureKind::Internal, error.to_string())),
            polls: 0,
            throttled: 0,
        }));
    };
    let progress = |tally: &Tally, in_flight: usize, last: &mut Instant| {
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            eprintln!(
                "[{:>7.1} s] {}/{} finished, {} assigned, {} failed, {} in flight",
                started.elapsed().as_secs_f64(),
                tally.finished,
                settings.devices,
                tally.assigned.len(),
                tally.failed(),
                in_flight
            );
        }
    };
    for index in 0..settings.devices {
        if let Some(rate) = settings.rate {
            #[allow(clippy::cast_precision_loss)] // at most a million devices
            let due = started + Duration::from_secs_f64(index as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break; // the semaphore is never closed
        };
        let context = Arc::clone(&context);
        tasks.spawn(async move {
            let result = device::run(context, index).await;
            drop(permit);
            result
        });
        while let Some(joined) = tasks.try_join_next() {
            collect(&mut tally, joined);
        }
        progress(&tally, tasks.len(), &mut last_progress);
    }
    let last_start = started.elapsed();
    // Every device ends within --device-timeout (plus a close of at most 2 s).
    while !tasks.is_empty() {
        if let Ok(joined) = tokio::time::timeout(Duration::from_secs(1), tasks.join_next()).await {
            match joined {
                Some(joined) => collect(&mut tally, joined),
                None => break,
            }
        }
        progress(&tally, tasks.len(), &mut last_progress);
    }
    (tally, started.elapsed(), last_start)
}

#[allow(clippy::cast_precision_loss)] // counts stay far below 2^52
fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64().max(0.001);
    ((count as f64 / seconds) * 10.0).round() / 10.0
}

async fn run(args: Args) -> Result<ExitCode, RunError> {
    let default_prefix = format!("lg-{:x}", sas::unix_now());
    let settings = Settings::from_args(&args, default_prefix).map_err(RunError::Usage)?;
    let connection = ConnectionString::parse(&args.connection_string).map_err(RunError::Usage)?;
    let tls = Tls::new(&read(&args.ca)?, &settings.target, settings.tls_version)
        .map_err(RunError::Usage)?;
    let endpoint = Endpoint {
        target: settings.target.clone(),
        tls,
        timeout: settings.request_timeout,
    };
    let group = args
        .enrollment_group
        .clone()
        .unwrap_or_else(|| format!("{}-group", settings.prefix));
    check_group_id(&group)?;
    if !args.setup && args.enrollment_group.is_none() {
        return Err(RunError::Usage(
            "--setup false needs --enrollment-group".to_owned(),
        ));
    }
    let service = Service::new(endpoint.clone(), connection);
    let credentials = setup(&args, &settings, &service, &group).await?;

    let server_pid = args.server_pid;
    let server_before = server_pid.map(|pid| process::sample(&pid.to_string()));
    let self_before = process::sample("self").ok();
    net::CONNECTIONS.store(0, Ordering::Relaxed);
    let context = Arc::new(Context {
        pool: (settings.transport == Transport::HttpsKeepalive)
            .then(|| Pool::new(endpoint.clone())),
        settings: settings.clone(),
        endpoint,
        credentials,
    });
    eprintln!(
        "running {} {} devices over {} (concurrency {}, poll {})…",
        settings.devices,
        settings.attestation.as_str(),
        settings.transport.as_str(),
        settings.concurrency,
        settings.poll.as_str()
    );
    let (mut tally, wall, last_start) = drive(Arc::clone(&context)).await;
    let connections = net::CONNECTIONS.load(Ordering::Relaxed);
    let server_after = server_pid.map(|pid| process::sample(&pid.to_string()));
    let self_after = process::sample("self").ok();
    drop(context);

    let assigned = tally.assigned.len() as u64;
    let (server, server_error) = match (server_pid, server_before, server_after) {
        (Some(pid), Some(Ok(before)), Some(Ok(after))) => {
            let cpu_seconds = process::cpu_seconds(&before, &after);
            #[allow(clippy::cast_precision_loss)]
            let per_registration = (assigned > 0)
                .then(|| ((cpu_seconds * 1e6 / assigned as f64) * 10.0).round() / 10.0);
            (
                Some(ServerFigures {
                    pid,
                    cpu_seconds,
                    cpu_micros_per_registration: per_registration,
                    peak_rss_mib: process::mib(after.peak_rss_kib),
                    rss_mib_before: process::mib(before.rss_kib),
                    rss_mib_after: process::mib(after.rss_kib),
                }),
                None,
            )
        }
        (Some(_), Some(Err(error)), _) | (Some(_), _, Some(Err(error))) => (None, Some(error)),
        _ => (None, None),
    };
    let loadgen_cpu_seconds = match (self_before, self_after) {
        (Some(before), Some(after)) => Some(process::cpu_seconds(&before, &after)),
        _ => None,
    };

    let (verify, verify_error) = if args.verify {
        let prefix = format!("{}-", settings.prefix);
        match service
            .group_records(&group, &prefix, settings.devices)
            .await
        {
            Ok(records) => {
                let counted: Vec<String> = tally
                    .assigned
                    .iter()
                    .map(|i| settings.registration_id(*i))
                    .collect();
                (Some(service::compare(&group, &counted, &records)), None)
            }
            Err(error) => (None, Some(error.to_string())),
        }
    } else {
        (None, None)
    };

    let failed = tally.failed();
    #[allow(clippy::cast_precision_loss)]
    let polls_per_assigned =
        (assigned > 0).then(|| ((tally.polls as f64 / assigned as f64) * 100.0).round() / 100.0);
    let report = Report {
        settings: SettingsUsed {
            target: args.target.clone(),
            mqtt_port: args.mqtt_port,
            amqp_port: args.amqp_port,
            id_scope: settings.id_scope.clone(),
            attestation: settings.attestation.as_str(),
            transport: settings.transport.as_str(),
            poll: settings.poll.as_str(),
            tls_version: settings.tls_version.as_str(),
            concurrency: settings.concurrency,
            rate: settings.rate,
            prefix: settings.prefix.clone(),
            enrollment_group: group.clone(),
            max_polls: settings.max_polls,
            request_timeout_seconds: settings.request_timeout.as_secs(),
            device_timeout_seconds: settings.device_timeout.as_secs(),
            loadgen_build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        devices: settings.devices,
        assigned,
        failed,
        failures: report::failure_rows(&tally),
        throttled_answers: tally.throttled,
        polls: tally.polls,
        polls_per_assigned,
        connections,
        wall_seconds: (wall.as_secs_f64() * 1000.0).round() / 1000.0,
        registrations_per_second: per_second(assigned, wall),
        arrivals_per_second: per_second(settings.devices, last_start),
        time_to_assigned_ms: report::percentiles(&mut tally.latencies),
        server,
        server_error,
        loadgen_cpu_seconds,
        verify,
        verify_error,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report).map(|mut text| {
            text.push('\n');
            text
        })
    } else {
        Ok(report::render(&report))
    };
    match text {
        // A closed stdout (`| head`) is not worth a panic.
        Ok(text) => {
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
        }
        Err(error) => eprintln!("berth-loadgen: cannot write the JSON report: {error}"),
    }
    let verified = report.verify_error.is_none() && report.verify.as_ref().is_none_or(|v| v.ok);
    Ok(if failed == 0 && verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
