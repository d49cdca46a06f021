//! The command line, and the checks that keep a run on loopback and bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use serde::Serialize;

/// The most devices one run may simulate.
pub const MAX_DEVICES: u64 = 1_000_000;
/// The most devices in flight at once.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Simulates devices registering with Berth (Azure DPS wire protocol) and reports
/// registrations per second, time to assigned, errors by kind and the server's CPU and memory.
///
/// Everything it sends goes to loopback: --target must be 127.0.0.0/8, `::1` or localhost.
#[derive(Debug, Parser)]
#[command(name = "berth-loadgen", version)]
pub struct Args {
    /// Berth's HTTPS endpoint: `https://127.0.0.1:PORT`, `https://localhost:PORT` or
    /// `https://[::1]:PORT`.
    #[arg(long)]
    pub target: String,

    /// Berth's MQTT-over-TLS port on the target's host (needed by --transport mqtt).
    #[arg(long)]
    pub mqtt_port: Option<u16>,

    /// Berth's AMQP-over-TLS port on the target's host (needed by --transport amqp).
    #[arg(long)]
    pub amqp_port: Option<u16>,

    /// The ID scope devices register in (`berth id-scope --data-dir D`, or the "ID scope:"
    /// line of `berth serve`).
    #[arg(long)]
    pub id_scope: String,

    /// The service connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`),
    /// for the setup and for --verify.
    #[arg(long)]
    pub connection_string: String,

    /// PEM file of the CA that signed Berth's TLS certificate (the "Trust this CA:" file).
    #[arg(long)]
    pub ca: PathBuf,

    /// Devices to simulate, 1 to 1,000,000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_DEVICES))]
    pub devices: u64,

    /// How devices prove who they are.
    #[arg(long, value_enum, default_value_t = Attestation::SymmetricKey)]
    pub attestation: Attestation,

    /// How devices reach Berth.
    #[arg(long, value_enum, default_value_t = Transport::Https)]
    pub transport: Transport,

    /// Devices in flight at once, 1 to 10,000.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONCURRENCY)))]
    pub concurrency: u32,

    /// Device arrivals per second (a device starts when its arrival time has come and a
    /// concurrency slot is free). Default: unlimited.
    #[arg(long)]
    pub rate: Option<f64>,

    /// When a device polls after the 202: at once (server capacity) or after retry-after
    /// (what a device sees).
    #[arg(long, value_enum, default_value_t = Poll::Immediate)]
    pub poll: Poll,

    /// Process ID of the `berth` server, for its CPU time and peak memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// After the run, check through the service API that every device counted as assigned
    /// has an assigned registration record, and that the group's record count for this run
    /// equals the assigned count.
    #[arg(long)]
    pub verify: bool,

    /// Registration ID prefix: devices are `{prefix}-0000000`, `{prefix}-0000001`, … Lower-case
    /// letters, digits and '-', at most 40 characters. Default: `lg-` and the start time.
    #[arg(long)]
    pub prefix: Option<String>,

    /// Create what the run needs: a linked hub if there is none, and an enrollment group for
    /// this run (symmetric keys, or a verified CA and an X.509 group). `--setup false` uses
    /// --enrollment-group with --group-key or --device-ca-cert/--device-ca-key instead.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub setup: bool,

    /// The enrollment group devices belong to. Default with --setup: `{prefix}-group`.
    #[arg(long)]
    pub enrollment_group: Option<String>,

    /// With --setup false and symmetric keys: the group's primary key (Base64).
    #[arg(long)]
    pub group_key: Option<String>,

    /// With --setup false and X.509: the PEM of the verified CA the group references.
    #[arg(long)]
    pub device_ca_cert: Option<PathBuf>,

    /// With --setup false and X.509: the PEM private key of --device-ca-cert.
    #[arg(long)]
    pub device_ca_key: Option<PathBuf>,

    /// Polls per device before it gives up (429 answers count), 1 to 1000.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_polls: u32,

    /// TLS versions devices offer: both (the server picks 1.3), or only 1.2 (as the Python
    /// SDK) or only 1.3.
    #[arg(long, value_enum, default_value_t = TlsVersion::Any)]
    pub tls_version: TlsVersion,

    /// Seconds to wait for one answer (and for a TCP connect or a TLS handshake), 1 to 600.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub request_timeout: u64,

    /// Seconds one device may take from its first byte to its final answer, 1 to 3600.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub device_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attestation {
    /// Group-derived symmetric keys (SAS tokens).
    SymmetricKey,
    /// A device certificate per device, signed by a CA the group references.
    X509,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// A fresh TLS connection per device, used for its register and its polls.
    Https,
    /// Kept-alive TLS connections shared by all devices (symmetric keys only).
    HttpsKeepalive,
    /// MQTT 3.1.1 over TLS, a connection per device.
    Mqtt,
    /// AMQP 1.0 over TLS, a connection per device.
    Amqp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Poll {
    /// Poll at once after the 202, then back off from 10 ms (doubling, at most 1 s).
    Immediate,
    /// Wait the retry-after the server sent (2 s when it sent none), as the SDKs do.
    RetryAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[value(name = "any")]
    Any,
    #[value(name = "1.2")]
    V1_2,
    #[value(name = "1.3")]
    V1_3,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::V1_2 => "1.2",
            Self::V1_3 => "1.3",
        }
    }
}

impl Attestation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SymmetricKey => "symmetric-key",
            Self::X509 => "x509",
        }
    }
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::HttpsKeepalive => "https-keepalive",
            Self::Mqtt => "mqtt",
            Self::Amqp => "amqp",
        }
    }
}

impl Poll {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::RetryAfter => "retry-after",
        }
    }
}

/// Where the load goes: a loopback address, and the name its TLS certificate is checked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `localhost`, or the IP literal.
    pub host: String,
    pub ip: IpAddr,
    pub port: u16,
}

impl Target {
    pub fn https(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// The `Host` header: as written in --target.
    pub fn authority(&self) -> String {
        match self.ip {
            IpAddr::V6(_) if self.host != "localhost" => format!("[{}]:{}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Parses --target and refuses anything that is not loopback. `localhost` is not resolved:
/// it means 127.0.0.1, so no resolver can send the load elsewhere.
pub fn parse_target(text: &str) -> Result<Target, String> {
    let rest = text
        .get(..8)
        .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
        .and_then(|_| text.get(8..))
        .ok_or_else(|| format!("--target '{text}' must start with https://"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "--target '{text}' must be https://HOST[:PORT] with no path"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("--target '{text}' has an unclosed '['"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("--target '{text}' is malformed after ']'"))?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 443,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("--target '{text}' has an invalid port '{port}'"))?,
    };
    let refuse = || {
        format!(
            "refusing --target '{text}': the load generator only sends to loopback \
             (127.0.0.0/8, ::1 or localhost)"
        )
    };
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(Target {
            host: "localhost".to_owned(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
        });
    }
    let ip: IpAddr = host.parse().map_err(|_| refuse())?;
    if !ip.is_loopback() {
        return Err(refuse());
    }
    Ok(Target {
        host: ip.to_string(),
        ip,
        port,
    })
}

/// Checks a registration ID prefix: lower-case letters, digits and '-', 1 to 40 characters,
/// starting with a letter or digit (the CA name `{prefix}-ca` must stay within 64).
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let valid = !prefix.is_empty()
        && prefix.len() <= 40
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !prefix.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--prefix '{prefix}' must be 1 to 40 lower-case letters, digits or '-', not starting with '-'"
        ))
    }
}

/// The settings of a run, checked, in the units the run uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub mqtt: Option<SocketAddr>,
    pub amqp: Option<SocketAddr>,
    pub id_scope: String,
    pub devices: u64,
    pub attestation: Attestation,
    pub transport: Transport,
    pub concurrency: u32,
    pub rate: Option<f64>,
    pub poll: Poll,
    pub tls_version: TlsVersion,
    pub prefix: String,
    pub max_polls: u32,
    pub request_timeout: Duration,
    pub device_timeout: Duration,
}

impl Settings {
    /// Checks what clap cannot: loopback, combinations, the rate and the prefix.
    pub fn from_args(args: &Args, default_prefix: String) -> Result<Self, String> {
        let target = parse_target(&args.target)?;
        let mqtt = match (args.transport, args.mqtt_port) {
            (Transport::Mqtt, None) => {
                return Err("--transport mqtt needs --mqtt-port".to_owned());
            }
            (_, Some(0)) => return Err("--mqtt-port must not be 0".to_owned()),
            (_, Some(port)) => Some(SocketAddr::new(target.ip, port)),
            (_, None) => None,
        };
        let amqp = match (args.transport, args.amqp_port) {
            (Transport::Amqp, None) => {
                return Err("--transport amqp needs --amqp-port".to_owned());
            }
            (_, Some(0)) => return Err("--amqp-port must not be 0".to_owned()),
            (_, Some(port)) => Some(SocketAddr::new(target.ip, port)),
            (_, None) => None,
        };
        if args.attestation == Attestation::X509 && args.transport == Transport::HttpsKeepalive {
            return Err(
                "--transport https-keepalive shares connections among devices, which X.509 \
                 devices cannot do: their TLS client certificate is their identity. Use \
                 --transport https (a connection per device), mqtt or amqp"
                    .to_owned(),
            );
        }
        if let Some(rate) = args.rate {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
                return Err(format!(
                    "--rate {rate} must be a number of arrivals per second above 0 and at most 1000000"
                ));
            }
        }
        let id_scope = args.id_scope.trim().to_owned();
        if id_scope.is_empty()
            || id_scope.len() > 64
            || !id_scope.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!(
                "--id-scope '{}' must be 1 to 64 letters or digits",
                args.id_scope
            ));
        }
        let prefix = args.prefix.clone().unwrap_or(default_prefix);
        check_prefix(&prefix)?;
        Ok(Self {
            target,
            mqtt,
            amqp,
            id_scope,
            devices: args.devices,
            attestation: args.attestation,
            transport: args.transport,
            concurrency: args.concurrency,
            rate: args.rate,
            poll: args.poll,
            tls_version: args.tls_version,
            prefix,
            max_polls: args.max_polls,
            request_timeout: Duration::from_secs(args.request_timeout),
            device_timeout: Duration::from_secs(args.device_timeout),
        })
    }

    /// The registration ID of device `index`.
    pub fn registration_id(&self, index: u64) -> String {
        format!("{}-{index:07}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        let target = parse_target("https://127.0.0.1:8443").unwrap();
        assert_eq!(target.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(target.port, 8443);
        assert_eq!(target.authority(), "127.0.0.1:8443");
        let target = parse_target("HTTPS://localhost:9000/").unwrap();
        assert_eq!(target.host, "localhost");
        assert_eq!(target.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(parse_target("https://127.8.9.10").unwrap().port, 443);
        let target = parse_target("https://[::1]:8443").unwrap();
        assert!(target.ip.is_ipv6());
        assert_eq!(target.authority(), "[::1]:8443");
    }

    #[test]
    fn anything_beyond_loopback_is_refused() {
        for text in [
            "https://10.0.0.1:443",
            "https://128.0.0.1",
            "https://example.com:443",
            "https://localhost.example.com",
            "https://[::2]:443",
            "https://[::ffff:10.0.0.1]:443",
            "https://0.0.0.0:443",
        ] {
            let error = parse_target(text).unwrap_err();
            assert!(error.contains("only sends to loopback"), "{text}: {error}");
        }
        assert!(parse_target("http://127.0.0.1:80").is_err());
        assert!(parse_target("https://127.0.0.1:0").is_err());
        assert!(parse_target("https://127.0.0.1:8443/x").is_err());
        assert!(parse_target("https://user@127.0.0.1:8443").is_err());
    }

    #[test]
    fn amqp_needs_its_port_and_takes_both_attestations() {
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "berth-loadgen",
                "--target",
                "https://127.0.0.1:8443",
                "--id-scope",
                "0ne00000001",
                "--connection-string",
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=AA==",
                "--ca",
                "ca.pem",
                "--transport",
                "amqp",
            ];
            argv.extend_from_slice(extra);
            Settings::from_args(&Args::try_parse_from(argv).unwrap(), "p".to_owned())
        };
        assert!(parse(&[]).unwrap_err().contains("--amqp-port"));
        assert!(parse(&["--amqp-port", "0"]).is_err());
        let settings = parse(&["--amqp-port", "8672", "--attestation", "x509"]).unwrap();
        assert_eq!(
            settings.amqp,
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8672))
        );
        assert_eq!(settings.transport.as_str(), "amqp");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("lg-1a2b").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("Upper").is_err());
        assert!(check_prefix("-x").is_err());
        assert!(check_prefix("a_b").is_err());
        assert!(check_prefix(&"a".repeat(41)).is_err());
    }
}
