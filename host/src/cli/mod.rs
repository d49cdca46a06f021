//! The `berth` command line: `serve`, instance helpers, and management commands that go
//! through the service API (given a connection string, or the local data directory).

mod client;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Map, Value};

pub use client::{Client, ClientError, Target};

use crate::config::{InstanceArgs, ServeArgs, ServeConfig};
use crate::instance::Instance;
use crate::model::access::OWNER_POLICY;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "A self-hosted device provisioning service that speaks the Azure IoT Hub DPS protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the provisioning service.
    Serve(ServeArgs),
    /// Print a service connection string for the Azure service SDKs.
    ConnectionString {
        #[command(flatten)]
        instance: InstanceArgs,
        /// Shared access policy to print.
        #[arg(long, default_value = OWNER_POLICY)]
        policy: String,
        /// Use the policy's secondary key.
        #[arg(long)]
        secondary: bool,
    },
    /// Print the instance's ID scope (devices need it with the endpoint).
    IdScope {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// Derive a group member's device key from the group key.
    ComputeDeviceKey {
        /// The enrollment group's primary or secondary key (Base64).
        #[arg(long)]
        key: String,
        /// The device's registration ID.
        #[arg(long)]
        registration_id: String,
    },
    /// Manage individual enrollments.
    Enrollment {
        #[command(subcommand)]
        action: EnrollmentAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage enrollment groups.
    EnrollmentGroup {
        #[command(subcommand)]
        action: EnrollmentAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read and delete device registration records.
    Registration {
        #[command(subcommand)]
        action: RegistrationAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage WebAssembly policies (allocation policies and reprovisioning rules).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage lookup tables that policies may read.
    LookupTable {
        #[command(subcommand)]
        action: TableAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage CA certificates (upload, verify by proof of possession).
    CaCertificate {
        #[command(subcommand)]
        action: CertificateAction,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage linked IoT hubs.
    Hub {
        #[command(subcommand)]
        action: HubAction,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How management commands reach the service.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Service connection string; without it, the local instance in --data-dir is used.
    #[arg(
        long,
        env = "BERTH_CONNECTION_STRING",
        global = true,
        hide_env_values = true
    )]
    pub connection_string: Option<String>,
    /// CA certificate (PEM) to trust (default with a local instance: its ca.pem).
    #[arg(long, env = "BERTH_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Shared access policy to use with a local instance.
    #[arg(long, global = true, default_value = OWNER_POLICY)]
    pub policy: String,
    /// Print JSON for scripts instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub instance: InstanceArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AttestationArg {
    SymmetricKey,
    X509,
    Tpm,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReprovisionArg {
    /// Re-evaluate the hub and migrate the device's data (the default).
    UpdateAndMigrate,
    /// Re-evaluate the hub and reset the device to the initial twin.
    UpdateAndReset,
    /// Never re-provision: keep the current hub.
    Never,
}

/// Fields of an enrollment or group that the commands can set.
#[derive(Debug, Clone, Default, Args)]
pub struct EnrollmentFields {
    /// Attestation mechanism (create only; default symmetric-key).
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationArg>,
    /// Symmetric primary key (Base64 of 16 to 64 bytes; generated when omitted).
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Symmetric secondary key.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// X.509 certificate file (PEM or DER): the device's (individual) or the signing CA's (group).
    #[arg(long)]
    pub certificate: Option<PathBuf>,
    /// Secondary X.509 certificate file, for rolling.
    #[arg(long)]
    pub secondary_certificate: Option<PathBuf>,
    /// Name of a verified CA certificate to accept instead of a certificate file.
    #[arg(long)]
    pub ca_reference: Option<String>,
    /// TPM endorsement key (Base64 `TPM2B_PUBLIC`), individual enrollments only.
    #[arg(long)]
    pub endorsement_key: Option<String>,
    /// IoT Hub device ID (individual enrollments only; default: the registration ID).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Hub the device may be assigned to (repeatable).
    #[arg(long = "hub")]
    pub hubs: Vec<String>,
    /// Allocation policy: hashed, geoLatency, static or custom.
    #[arg(long)]
    pub allocation_policy: Option<String>,
    /// Custom allocation: webhook URL (http, https or wasm:).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Custom allocation: API version sent to the webhook.
    #[arg(long, default_value = "2021-10-01")]
    pub webhook_api_version: String,
    /// Initial twin as JSON text, or @FILE.
    #[arg(long)]
    pub initial_twin: Option<String>,
    /// Mark the devices as IoT Edge devices.
    #[arg(long)]
    pub iot_edge: Option<bool>,
    /// Enable or disable the entry.
    #[arg(long)]
    pub enabled: Option<bool>,
    /// Reprovisioning policy.
    #[arg(long, value_enum)]
    pub reprovision: Option<ReprovisionArg>,
    /// The whole JSON body from a file; the flags above are applied on top.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentAction {
    /// List all entries.
    List,
    /// Show one entry.
    Show { id: String },
    /// Create an entry (or replace one).
    Create {
        id: String,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Change some fields of an existing entry (conditional on its etag).
    Update {
        id: String,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Show the attestation mechanism, with keys.
    Keys { id: String },
    /// Delete an entry.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Upload a component as the next version of policy NAME.
    Upload {
        name: String,
        file: PathBuf,
        /// Wall-time deadline of one call, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Memory one call may use, in bytes.
        #[arg(long)]
        memory_bytes: Option<u64>,
    },
    /// List policies (latest versions).
    List,
    /// Show a policy: versions, world, limits, the enrollments that use it.
    Show { name: String },
    /// Download a version's component.
    Download {
        name: String,
        #[arg(long)]
        version: Option<i64>,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Delete a policy (refused while an enrollment uses it).
    Delete { name: String },
    /// Run an uploaded allocation policy on a request, without touching any device.
    DryRun {
        name: String,
        /// The allocation request (JSON, camelCase, as in docs/policy-authoring.md).
        #[arg(long)]
        request: PathBuf,
        #[arg(long)]
        version: Option<i64>,
    },
    /// Run a policy component offline, without a server (for authors and their CI).
    Test {
        file: PathBuf,
        #[arg(long)]
        request: PathBuf,
        /// The binding's configuration (JSON text, or @FILE).
        #[arg(long = "policy-config", id = "policy_config")]
        config: Option<String>,
        /// A lookup table: NAME=FILE.json (repeatable).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Wall-time deadline, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertificateAction {
    /// Upload (or replace) a CA certificate by name, PEM or DER.
    Upload {
        name: String,
        file: PathBuf,
        /// Mark it verified without proof of possession.
        #[arg(long)]
        verified: bool,
    },
    /// List CA certificates.
    List,
    /// Show one CA certificate.
    Show { name: String },
    /// Generate a verification code: sign a certificate with CN = the code using the CA's key.
    VerificationCode { name: String },
    /// Verify a CA with the certificate signed for the verification code.
    Verify { name: String, file: PathBuf },
    /// Delete a CA certificate.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TableAction {
    /// Upload a JSON object (key → value) as the next version of table NAME.
    Put { name: String, file: PathBuf },
    /// List tables.
    List,
    /// Show a table's entries and users.
    Show { name: String },
    /// Delete a table (refused while an enrollment grants it).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RegistrationAction {
    /// Show a device's registration record.
    Show { id: String },
    /// Delete a device's registration record (the hub device stays).
    Delete { id: String },
    /// List the records of the devices of an enrollment group.
    List {
        #[arg(long)]
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum HubAction {
    /// List linked hubs.
    List,
    /// Show one linked hub.
    Show { name: String },
    /// Link a hub by host name, or by its connection string.
    Link {
        name: String,
        #[command(flatten)]
        fields: HubFields,
    },
    /// Change a linked hub's settings.
    Update {
        name: String,
        #[command(flatten)]
        fields: HubFields,
    },
    /// Unlink a hub.
    Unlink { name: String },
    /// Show a device as the `record` driver wrote it to a hub (identity and twin).
    Device { name: String, device_id: String },
}

#[derive(Debug, Clone, Default, Args)]
pub struct HubFields {
    /// The hub's connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`).
    #[arg(long)]
    pub hub_connection_string: Option<String>,
    /// Weight in weighted hashing (1 to 1000).
    #[arg(long)]
    pub weight: Option<i64>,
    /// Whether allocation policies may choose this hub.
    #[arg(long)]
    pub apply_allocation_policy: Option<bool>,
    /// A location label, for geoLatency allocation.
    #[arg(long)]
    pub location: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Usage(String),
}

/// Runs a command other than `serve`; returns what to print.
pub async fn run(command: Command) -> Result<String, CliError> {
    match command {
        Command::Serve(_) => Err(CliError::Usage("serve is run by main".to_owned())),
        Command::ConnectionString {
            instance,
            policy,
            secondary,
        } => {
            let instance = open_existing(&instance).await?;
            instance
                .connection_string(&policy, secondary)
                .await?
                .ok_or_else(|| {
                    CliError::Usage(format!("there is no shared access policy '{policy}'"))
                })
        }
        Command::IdScope { instance } => Ok(open_existing(&instance).await?.id_scope),
        Command::ComputeDeviceKey {
            key,
            registration_id,
        } => {
            crate::model::names::check_registration_id("registration ID", &registration_id)
                .map_err(CliError::Usage)?;
            crate::attestation::sas::derive_device_key(&key, &registration_id)
                .map_err(|_| CliError::Usage("--key must be the group's Base64 key".to_owned()))
        }
        Command::Enrollment { action, client } => {
            enrollments(action, &client, "enrollments", "registrationId").await
        }
        Command::EnrollmentGroup { action, client } => {
            enrollments(action, &client, "enrollmentGroups", "enrollmentGroupId").await
        }
        Command::Registration { action, client } => registrations(action, &client).await,
        Command::Hub { action, client } => hubs(action, &client).await,
        Command::Policy {
            action:
                PolicyAction::Test {
                    file,
                    request,
                    config,
                    tables,
                    timeout_ms,
                },
            ..
        } => policy_test(&file, &request, config.as_deref(), &tables, timeout_ms).await,
        Command::Policy { action, client } => policies(action, &client).await,
        Command::LookupTable { action, client } => lookup_tables(action, &client).await,
        Command::CaCertificate { action, client } => ca_certificates(action, &client).await,
    }
}

/// Opens an instance that must already exist (commands never create one by accident).
async fn open_existing(args: &InstanceArgs) -> Result<Instance, CliError> {
    let config = ServeConfig::for_instance(args)?;
    if config.database_url.is_none() && !config.data_dir.join("berth.db").exists() {
        return Err(CliError::Usage(format!(
            "there is no Berth instance in {}: start one with `berth serve`, or pass --data-dir or --connection-string",
            config.data_dir.display()
        )));
    }
    Ok(Instance::open(&config).await?)
}

async fn connect(args: &ClientArgs) -> Result<Client, CliError> {
    let target = if let Some(text) = &args.connection_string {
        Target::from_connection_string(text, args.ca_file.clone())?
    } else {
        let instance = open_existing(&args.instance).await?;
        let policy = instance
            .store
            .access_policy(&args.policy)
            .await?
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "there is no shared access policy '{}'",
                    args.policy
                ))
            })?;
        let key = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &policy.policy.primary_key,
        )
        .map_err(|_| CliError::Usage("the policy key is not Base64".to_owned()))?;
        let port = instance.https_port;
        Target {
            authority: instance.service_authority(),
            key_name: policy.policy.name,
            key,
            ca_file: args.ca_file.clone().or_else(|| Some(instance.ca_path())),
            connect_to: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        }
    };
    Ok(Client::new(target)?)
}

fn encode_segment(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// `key: value` lines of the scalar fields, nested objects flattened with dots.
fn describe(value: &Value) -> String {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, child, out);
                }
            }
            Value::Array(items) => {
                let text: Vec<String> = items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect();
                out.push(format!("{prefix}: {}", text.join(", ")));
            }
            Value::String(text) => out.push(format!("{prefix}: {text}")),
            Value::Null => {}
            other => out.push(format!("{prefix}: {other}")),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out.join("\n")
}

fn table(rows: &[Vec<String>], header: &[&str]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

fn field(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn read_file(path: &PathBuf) -> Result<String, CliError> {
    std::fs::read(path)
        .map(|bytes| {
            if bytes.starts_with(b"-----") || bytes.iter().all(u8::is_ascii) {
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(bytes)
            }
        })
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// Applies the flags onto an enrollment document (a new one, or one read back).
fn apply_fields(
    doc: &mut Map<String, Value>,
    fields: &EnrollmentFields,
    group: bool,
    creating: bool,
) -> Result<(), CliError> {
    let usage = |m: &str| CliError::Usage(m.to_owned());
    if let Some(path) = &fields.from_file {
        let text = read_file(path)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        let Value::Object(map) = value else {
            return Err(usage("--from-file must hold a JSON object"));
        };
        doc.extend(map);
    }
    let attestation_kind = fields.attestation.or_else(|| {
        if fields.certificate.is_some() || fields.ca_reference.is_some() {
            Some(AttestationArg::X509)
        } else if fields.endorsement_key.is_some() {
            Some(AttestationArg::Tpm)
        } else if fields.primary_key.is_some()
            || fields.secondary_key.is_some()
            || (creating && !doc.contains_key("attestation"))
        {
            Some(AttestationArg::SymmetricKey)
        } else {
            None
        }
    });
    if let Some(kind) = attestation_kind {
        let attestation = match kind {
            AttestationArg::SymmetricKey => {
                let mut keys = Map::new();
                if let Some(k) = &fields.primary_key {
                    keys.insert("primaryKey".into(), json!(k));
                }
                if let Some(k) = &fields.secondary_key {
                    keys.insert("secondaryKey".into(), json!(k));
                }
                json!({"type": "symmetricKey", "symmetricKey": keys})
            }
            AttestationArg::X509 => {
                let slot = if group {
                    "signingCertificates"
                } else {
                    "clientCertificates"
                };
                if let Some(reference) = &fields.ca_reference {
                    json!({"type": "x509", "x509": {"caReferences": {"primary": reference}}})
                } else {
                    let primary = fields
                        .certificate
                        .as_ref()
                        .ok_or_else(|| usage("x509 needs --certificate or --ca-reference"))?;
                    let mut certificates = json!({"primary": {"certificate": read_file(primary)?}});
                    if let Some(secondary) = &fields.secondary_certificate {
                        certificates["secondary"] = json!({"certificate": read_file(secondary)?});
                    }
                    json!({"type": "x509", "x509": {slot: certificates}})
                }
            }
            AttestationArg::Tpm => {
                let ek = fields
                    .endorsement_key
                    .as_ref()
                    .ok_or_else(|| usage("tpm needs --endorsement-key"))?;
                json!({"type": "tpm", "tpm": {"endorsementKey": ek}})
            }
        };
        doc.insert("attestation".into(), attestation);
    }
    if let Some(id) = &fields.device_id {
        doc.insert("deviceId".into(), json!(id));
    }
    if !fields.hubs.is_empty() {
        doc.insert("iotHubs".into(), json!(fields.hubs));
    }
    if let Some(policy) = &fields.allocation_policy {
        doc.insert("allocationPolicy".into(), json!(policy));
    }
    if let Some(url) = &fields.webhook_url {
        doc.insert(
            "customAllocationDefinition".into(),
            json!({"webhookUrl": url, "apiVersion": fields.webhook_api_version}),
        );
    }
    if let Some(twin) = &fields.initial_twin {
        let text = match twin.strip_prefix('@') {
            Some(path) => read_file(&PathBuf::from(path))?,
            None => twin.clone(),
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("--initial-twin: {e}")))?;
        doc.insert("initialTwin".into(), value);
    }
    if let Some(edge) = fields.iot_edge {
        doc.insert("capabilities".into(), json!({"iotEdge": edge}));
    }
    if let Some(enabled) = fields.enabled {
        doc.insert(
            "provisioningStatus".into(),
            json!(if enabled { "enabled" } else { "disabled" }),
        );
    }
    if let Some(policy) = fields.reprovision {
        let (update, migrate) = match policy {
            ReprovisionArg::UpdateAndMigrate => (true, true),
            ReprovisionArg::UpdateAndReset => (true, false),
            ReprovisionArg::Never => (false, false),
        };
        doc.insert(
            "reprovisionPolicy".into(),
            json!({"updateHubAssignment": update, "migrateDeviceData": migrate}),
        );
    }
    Ok(())
}

async fn enrollments(
    action: EnrollmentAction,
    args: &ClientArgs,
    collection: &str,
    id_field: &str,
) -> Result<String, CliError> {
    let client = connect(args).await?;
    let group = collection == "enrollmentGroups";
    let show = |value: &Value| {
        if args.json {
            pretty(value)
        } else {
            describe(value)
        }
    };
    match action {
        EnrollmentAction::List => {
            let query = json!({"query": format!("SELECT * FROM {collection}")});
            let items = client
                .query_all(&format!("/{collection}/query"), Some(&query))
                .await?;
            if args.json {
                return Ok(pretty(&Value::Array(items)));
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    vec![
                        field(i, &format!("/{id_field}")),
                        field(i, "/attestation/type"),
                        field(i, "/provisioningStatus"),
                        field(i, "/allocationPolicy"),
                        field(i, "/iotHubs"),
                    ]
                })
                .collect();
            Ok(table(
                &rows,
                &["ID", "ATTESTATION", "STATUS", "ALLOCATION", "HUBS"],
            ))
        }
        EnrollmentAction::Show { id } => {
            let (value, _) = client
                .call(
                    Method::GET,
                    &format!("/{collection}/{}", encode_segment(&id)),
                    None,
                    &[],
                )
                .await?;
            Ok(show(&value))
        }
        EnrollmentAction::Keys { id } => {
            let path = format!("/{collection}/{}/attestationmechanism", encode_segment(&id));
            let (value, _) = client.call(Method::POST, &path, None, &[]).await?;
            Ok(show(&value))
        }
        EnrollmentAction::Create { id, fields } => {
            let mut doc = Map::new();
            doc.insert(id_field.into(), json!(id));
            apply_fields(&mut doc, &fields, group, true)?;
            let path = format!("/{collection}/{}", encode_segment(&id));
            let (value, _) = client
                .call(Method::PUT, &path, Some(&Value::Object(doc)), &[])
                .await?;
            Ok(show(&value))
        }
        EnrollmentAction::Update { id, fields } => {
            let path = format!("/{collection}/{}", encode_segment(&id));
            let (current, _) = client.call(Method::GET, &path, None, &[]).await?;
            let Value::Object(mut doc) = current else {
                return Err(CliError::Usage("unexpected answer".to_owned()));
            };
            let etag = doc
                .get("etag")
                .and_then(Value::as_str)
                .unwrap_or("*")
                .to_owned();
            doc.remove("registrationState");
            apply_fields(&mut doc, &fields, group, false)?;
            let (value, _) = client
                .call(
                    Method::PUT,
                    &path,
                    Some(&Value::Object(doc)),
                    &[("If-Match", etag)],
                )
                .await?;
            Ok(show(&value))
        }
        EnrollmentAction::Delete { id } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/{collection}/{}", encode_segment(&id)),
                    None,
                    &[],
                )
                .await?;
            Ok(format!("deleted {id}"))
        }
    }
}

async fn registrations(action: RegistrationAction, args: &ClientArgs) -> Result<String, CliError> {
    let client = connect(args).await?;
    match action {
        RegistrationAction::Show { id } => {
            let (value, _) = client
                .call(
                    Method::GET,
                    &format!("/registrations/{}", encode_segment(&id)),
                    None,
                    &[],
                )
                .await?;
            Ok(if args.json {
                pretty(&value)
            } else {
                describe(&value)
            })
        }
        RegistrationAction::Delete { id } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/registrations/{}", encode_segment(&id)),
                    None,
                    &[],
                )
                .await?;
            Ok(format!("deleted the registration record of {id}"))
        }
        RegistrationAction::List { group } => {
            let items = client
                .query_all(
                    &format!("/registrations/{}/query", encode_segment(&group)),
                    None,
                )
                .await?;
            if args.json {
                return Ok(pretty(&Value::Array(items)));
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    vec![
                        field(i, "/registrationId"),
                        field(i, "/status"),
                        field(i, "/assignedHub"),
                        field(i, "/deviceId"),
                        field(i, "/lastUpdatedDateTimeUtc"),
                    ]
                })
                .collect();
            Ok(table(
                &rows,
                &["REGISTRATION ID", "STATUS", "HUB", "DEVICE ID", "UPDATED"],
            ))
        }
    }
}

async fn hubs(action: HubAction, args: &ClientArgs) -> Result<String, CliError> {
    let client = connect(args).await?;
    let show = |value: &Value| {
        if args.json {
            pretty(value)
        } else {
            describe(value)
        }
    };
    let body = |fields: &HubFields| {
        let mut doc = Map::new();
        if let Some(cs) = &fields.hub_connection_string {
            doc.insert("connectionString".into(), json!(cs));
        }
        if let Some(weight) = fields.weight {
            doc.insert("allocationWeight".into(), json!(weight));
        }
        if let Some(apply) = fields.apply_allocation_policy {
            doc.insert("applyAllocationPolicy".into(), json!(apply));
        }
        if let Some(location) = &fields.location {
            doc.insert("location".into(), json!(location));
        }
        Value::Object(doc)
    };
    match action {
        HubAction::List => {
            let (value, _) = client.call(Method::GET, "/linkedHubs", None, &[]).await?;
            if args.json {
                return Ok(pretty(&value));
            }
            let rows: Vec<Vec<String>> = value
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .map(|i| {
                            vec![
                                field(i, "/name"),
                                field(i, "/driver"),
                                field(i, "/allocationWeight"),
                                field(i, "/applyAllocationPolicy"),
                                field(i, "/location"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(table(
                &rows,
                &["NAME", "DRIVER", "WEIGHT", "APPLY POLICY", "LOCATION"],
            ))
        }
        HubAction::Show { name } => {
            let (value, _) = client
                .call(
                    Method::GET,
                    &format!("/linkedHubs/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(show(&value))
        }
        HubAction::Link { name, fields } => {
            let path = format!("/linkedHubs/{}", encode_segment(&name));
            let (value, _) = client
                .call(Method::PUT, &path, Some(&body(&fields)), &[])
                .await?;
            Ok(show(&value))
        }
        HubAction::Update { name, fields } => {
            let path = format!("/linkedHubs/{}", encode_segment(&name));
            let (current, _) = client.call(Method::GET, &path, None, &[]).await?;
            let etag = current
                .get("etag")
                .and_then(Value::as_str)
                .unwrap_or("*")
                .to_owned();
            let (value, _) = client
                .call(
                    Method::PUT,
                    &path,
                    Some(&body(&fields)),
                    &[("If-Match", etag)],
                )
                .await?;
            Ok(show(&value))
        }
        HubAction::Device { name, device_id } => {
            let path = format!(
                "/linkedHubs/{}/devices/{}",
                encode_segment(&name),
                encode_segment(&device_id)
            );
            let (value, _) = client.call(Method::GET, &path, None, &[]).await?;
            Ok(show(&value))
        }
        HubAction::Unlink { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/linkedHubs/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(format!("unlinked {name}"))
        }
    }
}

async fn policies(action: PolicyAction, args: &ClientArgs) -> Result<String, CliError> {
    let client = connect(args).await?;
    let show = |value: &Value| {
        if args.json {
            pretty(value)
        } else {
            describe(value)
        }
    };
    match action {
        PolicyAction::Upload {
            name,
            file,
            timeout_ms,
            memory_bytes,
        } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let mut query = Vec::new();
            if let Some(ms) = timeout_ms {
                query.push(format!("timeoutMs={ms}"));
            }
            if let Some(bytes) = memory_bytes {
                query.push(format!("memoryBytes={bytes}"));
            }
            let path = format!("/policies/{}", encode_segment(&name));
            let value = client
                .upload(&path, &query.join("&"), bytes, "application/wasm")
                .await?;
            Ok(show(&value))
        }
        PolicyAction::List => {
            let (value, _) = client.call(Method::GET, "/policies", None, &[]).await?;
            if args.json {
                return Ok(pretty(&value));
            }
            let rows: Vec<Vec<String>> = value
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .map(|i| {
                            vec![
                                field(i, "/name"),
                                field(i, "/version"),
                                field(i, "/world"),
                                field(i, "/size"),
                                field(i, "/createdDateTimeUtc"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(table(
                &rows,
                &["NAME", "VERSION", "WORLD", "SIZE", "UPLOADED"],
            ))
        }
        PolicyAction::Show { name } => {
            let (value, _) = client
                .call(
                    Method::GET,
                    &format!("/policies/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(show(&value))
        }
        PolicyAction::Download {
            name,
            version,
            output,
        } => {
            let query = version.map(|v| format!("version={v}")).unwrap_or_default();
            let bytes = client
                .download(
                    &format!("/policies/{}/content", encode_segment(&name)),
                    &query,
                )
                .await?;
            std::fs::write(&output, &bytes)
                .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", output.display())))?;
            Ok(format!(
                "wrote {} bytes to {}",
                bytes.len(),
                output.display()
            ))
        }
        PolicyAction::Delete { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/policies/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(format!("deleted policy {name}"))
        }
        PolicyAction::DryRun {
            name,
            request,
            version,
        } => {
            let text = read_file(&request)?;
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", request.display())))?;
            let mut path = format!("/policies/{}/dryRun", encode_segment(&name));
            if let Some(v) = version {
                path = format!("{path}?version={v}");
            }
            let (value, _) = client
                .call_raw_path(Method::POST, &path, Some(&body))
                .await?;
            Ok(pretty(&value))
        }
        PolicyAction::Test { .. } => Err(CliError::Usage("policy test runs offline".to_owned())),
    }
}

async fn lookup_tables(action: TableAction, args: &ClientArgs) -> Result<String, CliError> {
    let client = connect(args).await?;
    let show = |value: &Value| {
        if args.json {
            pretty(value)
        } else {
            describe(value)
        }
    };
    match action {
        TableAction::Put { name, file } => {
            let text = read_file(&file)?;
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let (value, _) = client
                .call(
                    Method::PUT,
                    &format!("/lookupTables/{}", encode_segment(&name)),
                    Some(&body),
                    &[],
                )
                .await?;
            Ok(show(&value))
        }
        TableAction::List => {
            let (value, _) = client.call(Method::GET, "/lookupTables", None, &[]).await?;
            Ok(if args.json {
                pretty(&value)
            } else {
                describe(&value)
            })
        }
        TableAction::Show { name } => {
            let (value, _) = client
                .call(
                    Method::GET,
                    &format!("/lookupTables/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(pretty(&value))
        }
        TableAction::Delete { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/lookupTables/{}", encode_segment(&name)),
                    None,
                    &[],
                )
                .await?;
            Ok(format!("deleted lookup table {name}"))
        }
    }
}

/// `berth policy test`: validates and runs a component offline, as the server would.
async fn policy_test(
    file: &PathBuf,
    request: &PathBuf,
    config: Option<&str>,
    tables: &[String],
    timeout_ms: Option<u64>,
) -> Result<String, CliError> {
    use crate::policy::{CallContext, Limits, PolicyEngine, World};
    let bytes = std::fs::read(file)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let text = read_file(request)?;
    let doc: crate::policy::request::RequestDoc = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", request.display())))?;
    let config = match config {
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(path) => read_file(&PathBuf::from(path))?,
                None => text.to_owned(),
            };
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("--config: {e}")))?;
            Some(value.to_string())
        }
        None => None,
    };
    let mut loaded = std::collections::BTreeMap::new();
    for entry in tables {
        let (name, path) = entry
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--table '{entry}' is not NAME=FILE")))?;
        let content = read_file(&PathBuf::from(path))?;
        let map: serde_json::Map<String, Value> =
            serde_json::from_str(&content).map_err(|e| CliError::Usage(format!("{path}: {e}")))?;
        loaded.insert(
            name.to_ascii_lowercase(),
            map.into_iter().map(|(k, v)| (k, v.to_string())).collect(),
        );
    }
    let mut limits = Limits::default();
    if let Some(ms) = timeout_ms {
        limits.timeout_ms = ms;
    }
    limits.validate().map_err(CliError::Usage)?;
    let (wit, size) = doc.to_wit().map_err(CliError::Usage)?;
    let hubs: Vec<String> = doc.linked_hubs.iter().map(|h| h.name.clone()).collect();
    let label = file
        .file_name()
        .map_or_else(|| "policy".to_owned(), |n| n.to_string_lossy().into_owned());
    let body = tokio::task::spawn_blocking(move || {
        let engine = PolicyEngine::new(None).map_err(|e| CliError::Usage(e.to_string()))?;
        let (world, prepared) = engine
            .validate(&bytes)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        if world != World::AllocationPolicy {
            return Err(CliError::Usage(
                "this component is a reprovisioning rule; `policy test` runs allocation policies"
                    .to_owned(),
            ));
        }
        let context = CallContext {
            limits,
            config,
            tables: std::sync::Arc::new(loaded),
        };
        let (outcome, report) = engine.allocate(&prepared, &wit, size, &context);
        Ok(crate::service_api::policies::dry_run_body(
            &label, outcome, &report, &hubs,
        ))
    })
    .await
    .map_err(|e| CliError::Usage(format!("the policy host stopped: {e}")))??;
    Ok(pretty(&body))
}

async fn ca_certificates(action: CertificateAction, args: &ClientArgs) -> Result<String, CliError> {
    let client = connect(args).await?;
    let show = |value: &Value| {
        if args.json {
            pretty(value)
        } else {
            describe(value)
        }
    };
    let path = |name: &str| format!("/certificates/{}", encode_segment(name));
    match action {
        CertificateAction::Upload {
            name,
            file,
            verified,
        } => {
            let certificate = read_file(&file)?;
            let body = json!({"certificate": certificate, "isVerified": verified});
            let (value, _) = client
                .call(Method::PUT, &path(&name), Some(&body), &[])
                .await?;
            Ok(show(&value))
        }
        CertificateAction::List => {
            let (value, _) = client.call(Method::GET, "/certificates", None, &[]).await?;
            if args.json {
                return Ok(pretty(&value));
            }
            let rows: Vec<Vec<String>> = value["value"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .map(|i| {
                            vec![
                                field(i, "/name"),
                                field(i, "/properties/subject"),
                                field(i, "/properties/isVerified"),
                                field(i, "/properties/expiry"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(table(&rows, &["NAME", "SUBJECT", "VERIFIED", "EXPIRES"]))
        }
        CertificateAction::Show { name } => {
            let (value, _) = client.call(Method::GET, &path(&name), None, &[]).await?;
            Ok(show(&value))
        }
        CertificateAction::VerificationCode { name } => {
            let (value, _) = client
                .call(
                    Method::POST,
                    &format!("{}/generateVerificationCode", path(&name)),
                    None,
                    &[],
                )
                .await?;
            if args.json {
                return Ok(pretty(&value));
            }
            Ok(field(&value, "/properties/verificationCode"))
        }
        CertificateAction::Verify { name, file } => {
            let certificate = read_file(&file)?;
            let body = json!({"certificate": certificate});
            let (value, _) = client
                .call(
                    Method::POST,
                    &format!("{}/verify", path(&name)),
                    Some(&body),
                    &[],
                )
                .await?;
            Ok(show(&value))
        }
        CertificateAction::Delete { name } => {
            client.call(Method::DELETE, &path(&name), None, &[]).await?;
            Ok(format!("deleted CA certificate {name}"))
        }
    }
}
