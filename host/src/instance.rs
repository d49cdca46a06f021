//! The instance: data directory, secret key, database, ID scope, service host name and the
//! default shared access policy, created on first start and reused afterwards.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore as _;

use crate::config::ServeConfig;
use crate::model::access::{generate_policy_key, AccessPolicy, Rights, OWNER_POLICY};
use crate::store::{Sealer, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret key {0}")]
    SecretKey(String),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("this node's secret key does not match the database: every node that shares a database needs the same key (copy secret.key from the first node, or set BERTH_SECRET_KEY)")]
    WrongSecretKey,
}

/// An opened instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub data_dir: PathBuf,
    pub store: Store,
    /// `0ne` + 8 hex digits, the tenant selector of the device API.
    pub id_scope: String,
    /// The host name clients use (without port).
    pub host_name: String,
    pub https_port: u16,
}

impl Instance {
    /// Opens the instance, creating whatever does not exist yet.
    pub async fn open(config: &ServeConfig) -> Result<Self, InstanceError> {
        let data_dir = config.data_dir.clone();
        create_private_dir(&data_dir)?;
        let key = secret_key(&data_dir, config.secret_key.as_deref())?;
        let url = config.database_url.clone().unwrap_or_else(|| {
            format!("sqlite://{}?mode=rwc", data_dir.join("berth.db").display())
        });
        let store = Store::open(&url, Sealer::new(&key)).await?;
        match store.check_sealing_key().await {
            Err(StoreError::Sealed(_)) => return Err(InstanceError::WrongSecretKey),
            other => other?,
        }
        let id_scope = store.setting_or_init("id_scope", new_id_scope).await?;
        let stored_host = store
            .setting_or_init("service_host_name", || {
                config
                    .host_name
                    .clone()
                    .unwrap_or_else(|| "localhost".to_owned())
            })
            .await?;
        let host_name = config.host_name.clone().unwrap_or(stored_host);
        // The owner policy is created once per database, not re-created if an operator
        // removed it later (a flag records that bootstrap happened).
        let bootstrapped = store
            .setting_or_init("owner_policy_bootstrap", || "pending".to_owned())
            .await?;
        if bootstrapped == "pending" {
            store
                .insert_access_policy(&AccessPolicy {
                    name: OWNER_POLICY.to_owned(),
                    rights: Rights::owner(),
                    primary_key: generate_policy_key(),
                    secondary_key: generate_policy_key(),
                })
                .await?;
            store.set_setting("owner_policy_bootstrap", "done").await?;
        }
        Ok(Self {
            data_dir,
            store,
            id_scope,
            host_name,
            https_port: config.https_port,
        })
    }

    /// The host name with the port when it is not 443, as connection strings carry it.
    pub fn service_authority(&self) -> String {
        if self.https_port == 443 {
            self.host_name.clone()
        } else {
            format!("{}:{}", self.host_name, self.https_port)
        }
    }

    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` for `policy`.
    pub async fn connection_string(
        &self,
        policy: &str,
        secondary: bool,
    ) -> Result<Option<String>, StoreError> {
        Ok(self.store.access_policy(policy).await?.map(|row| {
            let key = if secondary {
                row.policy.secondary_key
            } else {
                row.policy.primary_key
            };
            format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                self.service_authority(),
                row.policy.name,
                key
            )
        }))
    }

    /// Where the generated CA certificate is written for clients to trust.
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join(crate::protocol::tls::CA_FILE)
    }
}

/// `0ne` followed by 8 upper-case hex digits, like `0ne00002193`.
fn new_id_scope() -> String {
    format!("0ne{:08X}", rand::thread_rng().next_u32())
}

fn create_private_dir(path: &Path) -> Result<(), InstanceError> {
    let error = |source| InstanceError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    }
    Ok(())
}

/// Writes `contents` to a new file readable only by this user.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn secret_key(data_dir: &Path, explicit: Option<&str>) -> Result<[u8; 32], InstanceError> {
    let decode = |text: &str, origin: &str| -> Result<[u8; 32], InstanceError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| InstanceError::SecretKey(format!("from {origin} is not Base64")))?;
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            InstanceError::SecretKey(format!(
                "from {origin} must be 32 bytes, found {}",
                bytes.len()
            ))
        })
    };
    if let Some(text) = explicit {
        return decode(text, "BERTH_SECRET_KEY");
    }
    let path = data_dir.join("secret.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => decode(&text, &path.display().to_string()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            write_private(&path, format!("{}\n", BASE64.encode(key)).as_bytes()).map_err(
                |source| InstanceError::DataDir {
                    path: path.clone(),
                    source,
                },
            )?;
            Ok(key)
        }
        Err(source) => Err(InstanceError::DataDir { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_scopes_have_the_dps_shape() {
        let scope = new_id_scope();
        assert_eq!(scope.len(), 11);
        assert!(scope.starts_with("0ne"));
        assert!(scope[3..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
