//! Configuration: flags, then `BERTH_*` environment variables, then an optional TOML file
//! (`--config`, or `berth.toml` in the working directory), then defaults.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::telemetry::LogFormat;

/// Where the instance lives; shared by `serve` and the commands that read the instance.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InstanceArgs {
    /// Data directory: database (SQLite), secret key, TLS certificate and CA.
    #[arg(long, global = true, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: `sqlite://PATH` or `postgres://USER@HOST/DB` (default: SQLite in the data directory).
    #[arg(long, global = true, env = "BERTH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Host name devices and service clients use to reach this instance.
    #[arg(long, global = true, env = "BERTH_HOST_NAME")]
    pub host_name: Option<String>,
    /// HTTPS port of the device and service APIs (the SDKs expect 443).
    #[arg(long, global = true, env = "BERTH_HTTPS_PORT")]
    pub https_port: Option<u16>,
    /// Base64 of the 32-byte key that encrypts secrets at rest (default: `secret.key` in the
    /// data directory, created on first start). Nodes sharing a database need the same key.
    #[arg(long, global = true, env = "BERTH_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// TOML configuration file (default: `berth.toml` in the working directory, if present).
    #[arg(long, global = true, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Flags of `berth serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Address to listen on (default: all interfaces, IPv6 and IPv4).
    #[arg(long, env = "BERTH_BIND")]
    pub bind: Option<IpAddr>,
    /// PEM certificate chain to serve instead of the generated one (needs --tls-key).
    #[arg(long, env = "BERTH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BERTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM.
    #[arg(long, env = "BERTH_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// MQTT-over-TLS port for devices (the SDKs expect 8883; 0 turns MQTT over TLS off).
    #[arg(long, env = "BERTH_MQTT_PORT")]
    pub mqtt_port: Option<u16>,
    /// AMQP-over-TLS port for devices (the SDKs expect 5671; 0 turns AMQP over TLS off).
    #[arg(long, env = "BERTH_AMQP_PORT")]
    pub amqp_port: Option<u16>,
    /// Service-wide device registrations per minute (default: unlimited).
    #[arg(long, env = "BERTH_REGISTRATION_RATE")]
    pub registration_rate: Option<u32>,
    /// geoLatency: client address range to hub location, `CIDR=LOCATION` (repeatable).
    #[arg(long = "geo", env = "BERTH_GEO", value_delimiter = ',')]
    pub geo: Vec<String>,
    /// PEM CA to trust for hubs of the azure driver, in addition to the system roots.
    #[arg(long, env = "BERTH_HUB_CA_FILE")]
    pub hub_ca_file: Option<PathBuf>,
    /// PEM CA to trust for custom allocation webhooks, in addition to the system roots.
    #[arg(long, env = "BERTH_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<PathBuf>,
    /// Seconds one webhook call may take.
    #[arg(long, env = "BERTH_WEBHOOK_TIMEOUT")]
    pub webhook_timeout: Option<u64>,
    /// Webhook attempts for 429 and 5xx answers (the seed: 10).
    #[arg(long, env = "BERTH_WEBHOOK_ATTEMPTS")]
    pub webhook_attempts: Option<u32>,
    /// Milliseconds before the second webhook attempt (the seed: 1000).
    #[arg(long, env = "BERTH_WEBHOOK_INITIAL_INTERVAL_MS")]
    pub webhook_initial_interval_ms: Option<u64>,
    /// Milliseconds added to the wait before each further attempt (the seed: 9000).
    #[arg(long, env = "BERTH_WEBHOOK_INTERVAL_STEP_MS")]
    pub webhook_interval_step_ms: Option<u64>,
    /// How many CA certificates may be uploaded (the seed's limit: 25).
    #[arg(long, env = "BERTH_MAX_CA_CERTIFICATES")]
    pub max_ca_certificates: Option<usize>,
}

/// The TOML file: the same settings, in snake case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    host_name: Option<String>,
    https_port: Option<u16>,
    secret_key: Option<String>,
    bind: Option<IpAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    log_format: Option<LogFormat>,
    shutdown_grace: Option<u64>,
    mqtt_port: Option<u16>,
    amqp_port: Option<u16>,
    registration_rate: Option<u32>,
    #[serde(default)]
    geo: Vec<String>,
    hub_ca_file: Option<PathBuf>,
    webhook_ca_file: Option<PathBuf>,
    webhook_timeout: Option<u64>,
    webhook_attempts: Option<u32>,
    webhook_initial_interval_ms: Option<u64>,
    webhook_interval_step_ms: Option<u64>,
    max_ca_certificates: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything `berth serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub host_name: Option<String>,
    pub https_port: u16,
    pub secret_key: Option<String>,
    pub bind: Option<IpAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    /// 0: MQTT over TLS is off.
    pub mqtt_port: u16,
    /// 0: AMQP over TLS is off.
    pub amqp_port: u16,
    pub registration_rate: Option<u32>,
    pub geo: crate::allocation::GeoMap,
    pub hub_ca_file: Option<PathBuf>,
    pub webhook_ca_file: Option<PathBuf>,
    pub webhook: crate::allocation::webhook::WebhookSettings,
    pub max_ca_certificates: usize,
}

pub const DEFAULT_DATA_DIR: &str = "berth-data";

fn load_file(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let path = if let Some(path) = explicit {
        path.to_path_buf()
    } else {
        let default = PathBuf::from("berth.toml");
        if !default.exists() {
            return Ok(FileConfig::default());
        }
        default
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
}

impl ServeConfig {
    /// Resolves flags and environment (already merged by clap) over the TOML file and defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = load_file(args.instance.config.as_deref())?;
        let i = &args.instance;
        let config = Self {
            data_dir: i
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            database_url: i.database_url.clone().or(file.database_url),
            host_name: i.host_name.clone().or(file.host_name),
            https_port: i.https_port.or(file.https_port).unwrap_or(443),
            secret_key: i.secret_key.clone().or(file.secret_key),
            bind: args.bind.or(file.bind),
            tls_cert: args.tls_cert.clone().or(file.tls_cert),
            tls_key: args.tls_key.clone().or(file.tls_key),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            shutdown_grace: Duration::from_secs(
                args.shutdown_grace.or(file.shutdown_grace).unwrap_or(30),
            ),
            mqtt_port: args.mqtt_port.or(file.mqtt_port).unwrap_or(8883),
            amqp_port: args.amqp_port.or(file.amqp_port).unwrap_or(5671),
            registration_rate: args
                .registration_rate
                .or(file.registration_rate)
                .filter(|r| *r > 0),
            geo: crate::allocation::GeoMap::parse(
                if args.geo.is_empty() {
                    &file.geo
                } else {
                    &args.geo
                }
                .iter()
                .map(String::as_str),
            )
            .map_err(ConfigError::Invalid)?,
            hub_ca_file: args.hub_ca_file.clone().or(file.hub_ca_file),
            webhook_ca_file: args.webhook_ca_file.clone().or(file.webhook_ca_file),
            max_ca_certificates: args
                .max_ca_certificates
                .or(file.max_ca_certificates)
                .unwrap_or(25),
            webhook: {
                let defaults = crate::allocation::webhook::WebhookSettings::default();
                crate::allocation::webhook::WebhookSettings {
                    timeout: args
                        .webhook_timeout
                        .or(file.webhook_timeout)
                        .map_or(defaults.timeout, Duration::from_secs),
                    attempts: args
                        .webhook_attempts
                        .or(file.webhook_attempts)
                        .unwrap_or(defaults.attempts)
                        .max(1),
                    initial_interval: args
                        .webhook_initial_interval_ms
                        .or(file.webhook_initial_interval_ms)
                        .map_or(defaults.initial_interval, Duration::from_millis),
                    interval_step: args
                        .webhook_interval_step_ms
                        .or(file.webhook_interval_step_ms)
                        .map_or(defaults.interval_step, Duration::from_millis),
                }
            },
        };
        if config.https_port == 0 {
            return Err(ConfigError::Invalid("https_port must not be 0".to_owned()));
        }
        if config.tls_cert.is_some() != config.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together".to_owned(),
            ));
        }
        if let Some(host) = &config.host_name {
            crate::model::names::check_host_name("host_name", host)
                .map_err(ConfigError::Invalid)?;
        }
        Ok(config)
    }

    /// For commands that only open the instance (no listener).
    pub fn for_instance(args: &InstanceArgs) -> Result<Self, ConfigError> {
        Self::resolve(&ServeArgs {
            instance: args.clone(),
            ..ServeArgs::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("berth.toml");
        std::fs::write(
            &file,
            "https_port = 9443\nhost_name = \"dps.example.net\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            instance: InstanceArgs {
                config: Some(file.clone()),
                https_port: Some(8443),
                ..InstanceArgs::default()
            },
            ..ServeArgs::default()
        };
        let config = ServeConfig::resolve(&args).unwrap();
        assert_eq!(config.https_port, 8443);
        assert_eq!(config.host_name.as_deref(), Some("dps.example.net"));
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("berth.toml");
        std::fs::write(&file, "http_port = 1\n").unwrap();
        let args = ServeArgs {
            instance: InstanceArgs {
                config: Some(file),
                ..InstanceArgs::default()
            },
            ..ServeArgs::default()
        };
        assert!(matches!(
            ServeConfig::resolve(&args),
            Err(ConfigError::Parse { .. })
        ));
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_sample_configuration_parses() {
        let file: super::FileConfig =
            toml::from_str(include_str!("../../examples/berth.toml")).unwrap();
        assert_eq!(file.https_port, Some(8443));
    }
}
