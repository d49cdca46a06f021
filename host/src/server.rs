//! `berth serve`: open the instance, load TLS, bind the HTTPS and MQTT ports, print the
//! banner, serve until SIGINT or SIGTERM.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::allocation::webhook::WebhookClient;
use crate::config::ServeConfig;
use crate::hubs::azure::AzureDriver;
use crate::hubs::driver::{HubDrivers, HubError};
use crate::instance::{Instance, InstanceError};
use crate::model::access::OWNER_POLICY;
use crate::policy::PolicyEngine;
use crate::protocol::{amqp, https, mqtt, tls};
use crate::provisioning::custom::Custom;
use crate::provisioning::{Provisioning, ProvisioningSettings};
use crate::service_api::{app, Audience, ServiceState};
use crate::telemetry::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Bind(#[from] https::BindError),
    #[error("cannot listen on {address} for {protocol}: {source}. Choose another port with --{flag}-port (or BERTH_{env}_PORT), or 0 to turn {protocol} over TLS off")]
    DeviceBind {
        protocol: &'static str,
        flag: &'static str,
        env: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the instance: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot set up the azure hub driver: {0}")]
    HubDriver(#[from] HubError),
    #[error("cannot set up custom allocation: {0}")]
    Custom(String),
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<(), StartError> {
    let instance = Instance::open(&config).await?;
    let identity = tls::load_or_create(
        &instance.data_dir,
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
    )?;
    let listener = https::bind(config.bind, config.https_port).await?;
    let mqtt_listener = bind_device_port(&config, config.mqtt_port, "MQTT").await?;
    let amqp_listener = bind_device_port(&config, config.amqp_port, "AMQP").await?;
    let metrics = Arc::new(Metrics::default());
    let drivers = HubDrivers::new(
        instance.store.clone(),
        AzureDriver::new(config.hub_ca_file.as_deref())?,
    );
    let settings = ProvisioningSettings {
        geo: config.geo.clone(),
        registrations_per_minute: config.registration_rate,
    };
    let engine = PolicyEngine::new(Some(instance.data_dir.join("policy-cache")))
        .map_err(|e| StartError::Custom(e.to_string()))?;
    let webhook = WebhookClient::new(config.webhook.clone(), config.webhook_ca_file.as_deref())
        .map_err(StartError::Custom)?;
    let custom = Arc::new(Custom::new(
        instance.store.clone(),
        engine,
        webhook,
        metrics.clone(),
    ));
    let provisioning = Arc::new(Provisioning::new(
        instance.store.clone(),
        drivers,
        instance.id_scope.clone(),
        settings,
        metrics.clone(),
        custom.clone(),
    ));
    crate::provisioning::spawn_housekeeping(provisioning.clone());
    let state = Arc::new(ServiceState {
        store: instance.store.clone(),
        audience: Audience::new(&instance.host_name, config.https_port),
        metrics,
        provisioning: provisioning.clone(),
        max_ca_certificates: config.max_ca_certificates,
    });
    print_banner(
        &instance,
        identity.ca_file.as_deref(),
        config.mqtt_port,
        config.amqp_port,
    )
    .await?;
    tracing::info!(
        id_scope = instance.id_scope.as_str(),
        https_port = config.https_port,
        mqtt_port = config.mqtt_port,
        amqp_port = config.amqp_port,
        backend = ?instance.store.backend(),
        "berth is serving"
    );
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    // MQTT and AMQP clients may offer ALPN values of their own; answer without ALPN.
    let mut device_tls = (*identity.config).clone();
    device_tls.alpn_protocols.clear();
    let device_tls = Arc::new(device_tls);
    if let Some(mqtt_listener) = mqtt_listener {
        tokio::spawn(mqtt::run_listener(
            mqtt_listener,
            device_tls.clone(),
            provisioning.clone(),
            stopped_signal(stopped.clone()),
        ));
    }
    if let Some(amqp_listener) = amqp_listener {
        tokio::spawn(amqp::run_listener(
            amqp_listener,
            device_tls,
            provisioning,
            stopped_signal(stopped.clone()),
        ));
    }
    https::run(
        listener,
        identity.config,
        app(state),
        stopped_signal(stopped),
        config.shutdown_grace,
    )
    .await;
    instance.store.close().await;
    tracing::info!("berth stopped");
    Ok(())
}

async fn stopped_signal(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

/// Binds a device port (MQTT 8883, AMQP 5671); `None` when the port is 0 (turned off).
async fn bind_device_port(
    config: &ServeConfig,
    port: u16,
    protocol: &'static str,
) -> Result<Option<TcpListener>, StartError> {
    if port == 0 {
        return Ok(None);
    }
    let (flag, env) = if protocol == "MQTT" {
        ("mqtt", "MQTT")
    } else {
        ("amqp", "AMQP")
    };
    let candidates = match config.bind {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ],
    };
    let failed = |address, source| StartError::DeviceBind {
        protocol,
        flag,
        env,
        address,
        source,
    };
    let mut last = None;
    for address in candidates {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(Some(listener)),
            Err(source) => last = Some(failed(address, source)),
        }
    }
    Err(last.unwrap_or_else(|| {
        failed(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            std::io::Error::other("no address to bind"),
        )
    }))
}

async fn print_banner(
    instance: &Instance,
    ca_file: Option<&std::path::Path>,
    mqtt_port: u16,
    amqp_port: u16,
) -> Result<(), StartError> {
    let endpoint = format!("https://{}", instance.service_authority());
    let connection_string = instance
        .connection_string(OWNER_POLICY, false)
        .await?
        .unwrap_or_else(|| {
            format!(
                "(policy {OWNER_POLICY} was removed; see berth connection-string --policy NAME)"
            )
        });
    let mut where_flags = format!("--data-dir {}", instance.data_dir.display());
    if instance.https_port != 443 {
        let _ = write!(where_flags, " --https-port {}", instance.https_port);
    }
    let trust = ca_file.map_or_else(
        || "the operator-supplied certificate's CA".to_owned(),
        |p| p.display().to_string(),
    );
    let mqtt = if mqtt_port == 0 {
        "off".to_owned()
    } else {
        format!(
            "mqtts://{}:{mqtt_port}, and MQTT over WebSocket on the HTTPS port",
            instance.host_name
        )
    };
    let amqp = if amqp_port == 0 {
        "off".to_owned()
    } else {
        format!(
            "amqps://{}:{amqp_port}, and AMQP over WebSocket on the HTTPS port",
            instance.host_name
        )
    };
    println!(
        "Berth {version} is serving.\n\
         \x20 ID scope:           {scope}\n\
         \x20 Device endpoint:    {endpoint}  (the SDKs' provisioning host: {host})\n\
         \x20 MQTT endpoint:      {mqtt}\n\
         \x20 AMQP endpoint:      {amqp}\n\
         \x20 Service endpoint:   {endpoint}\n\
         \x20 Connection string:  {connection_string}\n\
         \x20 Trust this CA:      {trust}\n\
         Next: link a hub with `berth hub link <hub-host-name> {where_flags}`",
        version = env!("CARGO_PKG_VERSION"),
        scope = instance.id_scope,
        host = instance.host_name,
    );
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
