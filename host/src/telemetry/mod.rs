//! Logs and metrics. Logs are `tracing` events in the seed's two categories
//! (`DeviceOperations`, `ServiceOperations`, MON-05/06); metrics are Prometheus series named
//! after the seed's metrics (MON-01..03) plus Berth's own.

pub mod metrics;

use std::net::IpAddr;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with key=value fields.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default level (info). fe2o3-amqp
/// logs every peer's close as an error; Berth logs AMQP connections itself, so it is quiet.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,fe2o3_amqp=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The caller address with its host part masked, as DPS logs `CallerIpAddress` (MON-06).
pub fn masked_address(address: Option<IpAddr>) -> String {
    match address {
        Some(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.XXX")
        }
        Some(IpAddr::V6(v6)) => {
            let segments = v6.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}:XXXX:XXXX:XXXX:XXXX",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_host_part() {
        assert_eq!(
            masked_address(Some("10.1.2.3".parse().unwrap())),
            "10.1.2.XXX"
        );
        assert_eq!(
            masked_address(Some("::1".parse().unwrap())),
            "0:0:0:0:XXXX:XXXX:XXXX:XXXX"
        );
    }
}
