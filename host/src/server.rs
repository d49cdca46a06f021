//! `berth serve`: open the instance, load TLS, bind, print the banner, serve until a signal.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::ServeConfig;
use crate::instance::{Instance, InstanceError};
use crate::model::access::OWNER_POLICY;
use crate::protocol::{https, tls};
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
    #[error("cannot read the instance: {0}")]
    Store(#[from] crate::store::StoreError),
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
    let state = Arc::new(ServiceState {
        store: instance.store.clone(),
        audience: Audience::new(&instance.host_name, config.https_port),
        metrics: Arc::new(Metrics::default()),
    });
    print_banner(&instance, identity.ca_file.as_deref()).await?;
    tracing::info!(
        id_scope = instance.id_scope.as_str(),
        https_port = config.https_port,
        backend = ?instance.store.backend(),
        "berth is serving"
    );
    https::run(
        listener,
        identity.config,
        app(state),
        shutdown_signal(),
        config.shutdown_grace,
    )
    .await;
    instance.store.close().await;
    tracing::info!("berth stopped");
    Ok(())
}

async fn print_banner(
    instance: &Instance,
    ca_file: Option<&std::path::Path>,
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
    println!(
        "Berth {version} is serving.\n\
         \x20 ID scope:           {scope}\n\
         \x20 Device endpoint:    {endpoint}  (the SDKs' provisioning host: {host})\n\
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
