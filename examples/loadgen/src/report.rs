//! Counting the devices' results, and the report (a table, or JSON with --json).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::device::DeviceResult;
use crate::outcome::FailureKind;
use crate::process::ServerFigures;
use crate::service::Verification;

/// The results of the devices, as they finish.
#[derive(Debug, Default)]
pub struct Tally {
    pub finished: u64,
    /// Time to assigned of each assigned device.
    pub latencies: Vec<Duration>,
    /// Device numbers of the assigned devices.
    pub assigned: Vec<u64>,
    /// Count and first message per kind of failure.
    pub failures: BTreeMap<FailureKind, (u64, String)>,
    pub polls: u64,
    pub throttled: u64,
}

impl Tally {
    pub fn add(&mut self, result: DeviceResult) {
        self.finished += 1;
        self.polls += u64::from(result.polls);
        self.throttled += u64::from(result.throttled);
        match result.outcome {
            Ok(latency) => {
                self.latencies.push(latency);
                self.assigned.push(result.index);
            }
            Err(failure) => {
                let entry = self
                    .failures
                    .entry(failure.kind)
                    .or_insert_with(|| (0, failure.message));
                entry.0 += 1;
            }
        }
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().map(|(count, _)| count).sum()
    }
}

/// Time to assigned, milliseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Nearest-rank percentiles of `latencies` (sorted here); `None` when empty.
pub fn percentiles(latencies: &mut [Duration]) -> Option<Percentiles> {
    latencies.sort_unstable();
    let n = latencies.len();
    let max = *latencies.last()?;
    let rank = |p: usize| {
        // ceil(p/100 · n), 1-based.
        let r = (p * n).div_ceil(100).clamp(1, n);
        millis(latencies[r - 1])
    };
    let total: Duration = latencies.iter().sum();
    let mean = total / u32::try_from(n).unwrap_or(u32::MAX);
    Some(Percentiles {
        p50: rank(50),
        p95: rank(95),
        p99: rank(99),
        max: millis(max),
        mean: millis(mean),
    })
}

/// One line of the failure table.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureRow {
    /// `status`, `registration`, `transport` or `timeout`.
    pub category: &'static str,
    pub kind: String,
    pub http_status: Option<u16>,
    pub error_code: Option<i64>,
    pub count: u64,
    pub example: String,
}

/// The settings a run used.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SettingsUsed {
    pub target: String,
    pub mqtt_port: Option<u16>,
    pub amqp_port: Option<u16>,
    pub id_scope: String,
    pub attestation: &'static str,
    pub transport: &'static str,
    pub poll: &'static str,
    pub tls_version: &'static str,
    pub concurrency: u32,
    /// Arrivals per second; `None` is unlimited.
    pub rate: Option<f64>,
    pub prefix: String,
    pub enrollment_group: String,
    pub max_polls: u32,
    pub request_timeout_seconds: u64,
    pub device_timeout_seconds: u64,
    /// How the load generator itself was built: `debug` or `release`.
    pub loadgen_build: &'static str,
}

/// The whole report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub settings: SettingsUsed,
    pub devices: u64,
    pub assigned: u64,
    pub failed: u64,
    pub failures: Vec<FailureRow>,
    /// 429 and 503 answers the devices waited out and retried.
    pub throttled_answers: u64,
    /// Polls sent, and per assigned device.
    pub polls: u64,
    pub polls_per_assigned: Option<f64>,
    /// TLS connections opened during the timed phase.
    pub connections: u64,
    /// From the first device's start to the last device's end.
    pub wall_seconds: f64,
    /// Assigned devices per second of wall time.
    pub registrations_per_second: f64,
    /// Device starts per second achieved.
    pub arrivals_per_second: f64,
    /// From each device's first byte to its assigned answer.
    pub time_to_assigned_ms: Option<Percentiles>,
    pub server: Option<ServerFigures>,
    /// Why server figures are missing, when --server-pid was given but /proc failed.
    pub server_error: Option<String>,
    /// CPU seconds of the load generator itself during the timed phase.
    pub loadgen_cpu_seconds: Option<f64>,
    pub verify: Option<Verification>,
    /// Why --verify could not run.
    pub verify_error: Option<String>,
}

pub fn failure_rows(tally: &Tally) -> Vec<FailureRow> {
    let mut rows: Vec<FailureRow> = tally
        .failures
        .iter()
        .map(|(kind, (count, example))| {
            let (http_status, error_code) = match kind {
                FailureKind::Status { status, error_code } => (Some(*status), *error_code),
                FailureKind::Registration { error_code, .. } => (None, *error_code),
                _ => (None, None),
            };
            FailureRow {
                category: kind.category(),
                kind: kind.to_string(),
                http_status,
                error_code,
                count: *count,
                example: example.clone(),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.kind.cmp(&b.kind)));
    rows
}

fn optional(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}{unit}"))
}

/// The report as a table for people.
pub fn render(report: &Report) -> String {
    let s = &report.settings;
    let mut out = String::new();
    let _ = writeln!(out, "berth-loadgen report");
    let _ = writeln!(
        out,
        "  settings        {} over {} (TLS {}), poll {}, concurrency {}, rate {}, prefix {}, group {}, loadgen {} build",
        s.attestation,
        s.transport,
        s.tls_version,
        s.poll,
        s.concurrency,
        s.rate
            .map_or_else(|| "unlimited".to_owned(), |r| format!("{r}/s")),
        s.prefix,
        s.enrollment_group,
        s.loadgen_build,
    );
    let mut ports = String::new();
    if let Some(port) = s.mqtt_port {
        let _ = write!(ports, ", MQTT port {port}");
    }
    if let Some(port) = s.amqp_port {
        let _ = write!(ports, ", AMQP port {port}");
    }
    let _ = writeln!(
        out,
        "  target          {}{ports} (ID scope {})",
        s.target, s.id_scope
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "  devices         {}", report.devices);
    let _ = writeln!(out, "  assigned        {}", report.assigned);
    let _ = writeln!(out, "  failed          {}", report.failed);
    let _ = writeln!(out, "  wall time       {:.2} s", report.wall_seconds);
    let _ = writeln!(
        out,
        "  registrations/s {:.1}   (arrivals/s {:.1})",
        report.registrations_per_second, report.arrivals_per_second
    );
    match &report.time_to_assigned_ms {
        Some(p) => {
            let _ = writeln!(
                out,
                "  time to assigned (ms)  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}  mean {:.1}",
                p.p50, p.p95, p.p99, p.max, p.mean
            );
        }
        None => {
            let _ = writeln!(out, "  time to assigned       n/a (no device assigned)");
        }
    }
    let _ = writeln!(
        out,
        "  polls           {} ({} per assigned device), throttled answers retried {}",
        report.polls,
        optional(report.polls_per_assigned, ""),
        report.throttled_answers
    );
    let _ = writeln!(out, "  TLS connections {}", report.connections);
    match (&report.server, &report.server_error) {
        (Some(server), _) => {
            let _ = writeln!(
                out,
                "  server (pid {})  CPU {:.2} s, {} per registration, peak RSS {}, RSS {} -> {}",
                server.pid,
                server.cpu_seconds,
                optional(server.cpu_micros_per_registration, " µs"),
                optional(server.peak_rss_mib, " MiB"),
                optional(server.rss_mib_before, " MiB"),
                optional(server.rss_mib_after, " MiB"),
            );
        }
        (None, Some(error)) => {
            let _ = writeln!(out, "  server          {error}");
        }
        (None, None) => {
            let _ = writeln!(out, "  server          (no --server-pid)");
        }
    }
    if let Some(cpu) = report.loadgen_cpu_seconds {
        let _ = writeln!(out, "  loadgen CPU     {cpu:.2} s");
    }
    if !report.failures.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "  failures by kind");
        for row in &report.failures {
            let _ = writeln!(
                out,
                "    {:>8}  {:<12} {:<36} e.g. {}",
                row.count, row.category, row.kind, row.example
            );
        }
    }
    if let Some(verify) = &report.verify {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  verify          {}: {} counted assigned, {} records for this run ({} assigned), \
             {} missing, {} not assigned, {} uncounted",
            if verify.ok { "OK" } else { "MISMATCH" },
            verify.assigned_counted,
            verify.records_for_run,
            verify.assigned_records,
            verify.missing,
            verify.not_assigned,
            verify.uncounted,
        );
        for example in &verify.examples {
            let _ = writeln!(out, "    {example}");
        }
    }
    if let Some(error) = &report.verify_error {
        let _ = writeln!(out, "  verify          could not run: {error}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut latencies: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        latencies.reverse();
        let p = percentiles(&mut latencies).unwrap();
        assert_eq!(
            p,
            Percentiles {
                p50: 50.0,
                p95: 95.0,
                p99: 99.0,
                max: 100.0,
                mean: 50.5
            }
        );
        let mut one = vec![Duration::from_micros(1500)];
        assert!((percentiles(&mut one).unwrap().p99 - 1.5).abs() < 1e-9);
        assert!(percentiles(&mut []).is_none());
    }
}
