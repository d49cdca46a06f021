//! One allocation, three ways, side by side in one run: the built-in hashed policy, a
//! WebAssembly policy (a fresh instance per call, as registrations run it), and a custom
//! allocation webhook on loopback (an in-process HTTP server answering like an Azure
//! Function, with a kept-alive connection). Reports latency percentiles and process CPU per
//! allocation, and writes them to `docs/benchmarks.md` when `--write` is given.
//!
//!     bash policies/build.sh
//!     cargo run --release -p berth --example allocation_bench -- [--calls N] [--write]
//!
//! A benchmark, not a test: it measures and reports, it never fails on a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use berth::allocation::custom::CustomRequest;
use berth::allocation::webhook::{WebhookClient, WebhookSettings};
use berth::hubs::LinkedHub;
use berth::model::enrollment::{Enrollment, EnrollmentKind};
use berth::policy::request::RequestDoc;
use berth::policy::{CallContext, PolicyEngine};

/// Process CPU time (user + system) from /proc, in microseconds.
fn cpu_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let clock_ticks = 100; // CLK_TCK on Linux
    (ticks(11) + ticks(12)) * 1_000_000 / clock_ticks
}

struct Result {
    name: &'static str,
    calls: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu_per_call: f64,
}

fn summarize(name: &'static str, mut samples: Vec<Duration>, cpu: u64) -> Result {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Result {
        name,
        calls: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: *samples.last().unwrap(),
        cpu_per_call: cpu as f64 / samples.len() as f64,
    }
}

fn hubs() -> Vec<LinkedHub> {
    [
        "contoso-toasters-hub-1098.azure-devices.net",
        "contoso-heatpumps-hub-1098.azure-devices.net",
        "contoso-spare-hub.azure-devices.net",
    ]
    .iter()
    .map(|name| LinkedHub {
        name: (*name).to_owned(),
        connection_string: None,
        allocation_weight: 1,
        apply_allocation_policy: true,
        location: None,
    })
    .collect()
}

fn request(i: usize) -> CustomRequest {
    let mut enrollment = Enrollment {
        enrollment_group_id: Some("contoso-custom-allocated-devices".into()),
        ..Enrollment::default()
    };
    enrollment.iot_hubs = Some(hubs().into_iter().map(|h| h.name).collect());
    CustomRequest {
        kind: EnrollmentKind::Group,
        enrollment,
        registration_id: format!("breakroom{i}-contoso-tstrsd-007"),
        payload: Some(serde_json::json!({"firmwareVersion": "1.2.3"})),
        current_hub: None,
        current_device_id: None,
        protocol: "Mqtt".into(),
        certificate: None,
        client_address: Some("127.0.0.1".into()),
        linked_hubs: hubs(),
    }
}

async fn webhook_server() -> String {
    use axum::routing::post;
    use axum::Json;
    let app = axum::Router::new().route(
        "/api/allocate",
        post(|Json(body): Json<serde_json::Value>| async move {
            let id = body["deviceRuntimeContext"]["registrationId"].as_str().unwrap_or_default().to_owned();
            let hub = if id.contains("-contoso-tstrsd-007") {
                "contoso-toasters-hub-1098.azure-devices.net"
            } else {
                "contoso-heatpumps-hub-1098.azure-devices.net"
            };
            Json(serde_json::json!({"iotHubHostName": hub, "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready"}}}, "payload": {"division": "toasters"}}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}/api/allocate?code=benchmark")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000usize);
    let write = args.iter().any(|a| a == "--write");
    let linked = hubs();
    let refs: Vec<&LinkedHub> = linked.iter().collect();
    let mut results = Vec::new();

    // Built-in hashed allocation.
    let cpu = cpu_micros();
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let id = format!("breakroom{i}-contoso-tstrsd-007");
        let started = Instant::now();
        std::hint::black_box(berth::allocation::hashed(&id, &refs));
        samples.push(started.elapsed());
    }
    results.push(summarize("built-in hashed", samples, cpu_micros() - cpu));

    // WebAssembly policy: a fresh instance per call, as a registration runs it.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/dist/contoso-divisions.wasm");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run bash policies/build.sh", path.display()));
    let engine = PolicyEngine::new(None).unwrap();
    let (_, prepared) = engine.validate(&bytes).unwrap();
    let context = CallContext::default();
    for i in 0..100 {
        let (wit, size) = RequestDoc::from_custom(&request(i)).to_wit().unwrap();
        let _ = engine.allocate(&prepared, &wit, size, &context);
    }
    let cpu = cpu_micros();
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        let (wit, size) = RequestDoc::from_custom(&request(i)).to_wit().unwrap();
        let (outcome, _) = engine.allocate(&prepared, &wit, size, &context);
        let decision = berth::provisioning::custom::interpret("contoso-divisions", outcome);
        std::hint::black_box(decision.unwrap());
        samples.push(started.elapsed());
    }
    results.push(summarize(
        "WebAssembly policy (fresh instance)",
        samples,
        cpu_micros() - cpu,
    ));

    if std::env::var_os("BERTH_BENCH_PARTS").is_some() {
        let started = Instant::now();
        for i in 0..calls {
            std::hint::black_box(RequestDoc::from_custom(&request(i)).to_wit().unwrap());
        }
        println!(
            "request conversion: {:.1} µs per call",
            started.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
        let (wit, size) = RequestDoc::from_custom(&request(0)).to_wit().unwrap();
        let started = Instant::now();
        for _ in 0..calls {
            let _ = std::hint::black_box(engine.allocate(&prepared, &wit, size, &context));
        }
        println!(
            "policy call alone: {:.1} µs per call",
            started.elapsed().as_secs_f64() * 1e6 / calls as f64
        );
    }

    // Webhook on loopback, kept-alive connection; its server runs in this process, so its
    // CPU counts too (a real Azure Function costs more).
    let url = webhook_server().await;
    let client = WebhookClient::new(
        WebhookSettings {
            attempts: 1,
            ..WebhookSettings::default()
        },
        None,
    )
    .unwrap();
    for i in 0..100 {
        client
            .allocate(&url, "2021-10-01", &request(i))
            .await
            .unwrap();
    }
    let cpu = cpu_micros();
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        let decision = client.allocate(&url, "2021-10-01", &request(i)).await;
        std::hint::black_box(decision.unwrap());
        samples.push(started.elapsed());
    }
    results.push(summarize(
        "webhook on loopback (keep-alive)",
        samples,
        cpu_micros() - cpu,
    ));

    let mut table = String::from("| Allocation | Calls | p50 | p99 | max | CPU per allocation |\n|---|---:|---:|---:|---:|---:|\n");
    for r in &results {
        let _ = writeln!(
            table,
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
            r.name,
            r.calls,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.max.as_secs_f64() * 1e6,
            r.cpu_per_call
        );
    }
    let wasm = &results[1];
    let hook = &results[2];
    let summary = format!(
        "WebAssembly p99: {:.1} µs (goal ≤ 100 µs). CPU per allocation, webhook ÷ WebAssembly: {:.1}× (goal ≥ 5×).",
        wasm.p99.as_secs_f64() * 1e6,
        hook.cpu_per_call / wasm.cpu_per_call.max(0.001)
    );
    println!("{table}\n{summary}");
    if write {
        let machine = format!(
            "{} cores, {}",
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(
                    |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                        .split(':')
                        .nth(1)
                        .unwrap_or("")
                        .trim()
                        .to_owned())
                )
                .unwrap_or_default()
        );
        let doc = format!(
            "# Benchmarks\n\n## One allocation, three ways\n\nCommand: `bash policies/build.sh && cargo run --release -p berth --example allocation_bench -- --calls {calls} --write`\n\n\
             Machine: {machine}. Run: {}.\n\n{table}\n{summary}\n\n\
             Method: each row makes {calls} allocations for the seed's Contoso toaster devices after 100 warm-up calls, one at a time. \
             Latency is wall time per call; CPU is the process's user + system time (from /proc, 10 ms resolution) over the run divided by the calls. \
             The WebAssembly row runs `policies/contoso-divisions` on a fresh instance per call (pooling allocator, `InstancePre`), including the request's conversion and the result's checks. \
             The webhook row calls an in-process axum server on 127.0.0.1 over a kept-alive HTTP/1.1 connection with the real webhook client; the server's own work is in the CPU figure, and a real Azure Function adds network and cold starts on top.\n",
            berth::clock::now_utc()
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
        std::fs::write(&path, doc).unwrap();
        println!("wrote {}", path.display());
    }
}
