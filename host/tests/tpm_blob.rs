#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Known-answer test of the TPM `authenticationKey` blob (wire-protocol.md §7.5) against real
//! TPM software: Debian's `swtpm` simulator driven by `tpm2-tools`, doing what a device does
//! with the blob (§7.2): `ActivateCredential` under the EK policy, Import under the SRK, Load,
//! then HMAC with the imported key, which must equal HMAC-SHA256(K) computed here.
//!
//! Needs the Debian packages `swtpm swtpm-tools tpm2-tools`; without them the test fails
//! (tests/run.sh installs them). Every wait is bounded.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aes::Aes128;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use berth::attestation::tpm::{build_activation, parse_public};
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PACKAGES: &str = "swtpm swtpm-tools tpm2-tools";
const TOOLS: [&str; 12] = [
    "swtpm",
    "tpm2_createek",
    "tpm2_createprimary",
    "tpm2_evictcontrol",
    "tpm2_flushcontext",
    "tpm2_readpublic",
    "tpm2_startauthsession",
    "tpm2_policysecret",
    "tpm2_activatecredential",
    "tpm2_import",
    "tpm2_load",
    "tpm2_hmac",
];
const START_TIMEOUT: Duration = Duration::from_secs(15);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const EK_HANDLE: &str = "0x81010001";
const SRK_HANDLE: &str = "0x81000001";
const OTHER_SRK_HANDLE: &str = "0x81000002";
const ID_KEY_HANDLE: &str = "0x81000100";
/// The SDKs' SRK template (§7.1): restricted decrypt storage key, AES-128-CFB.
const SRK_ATTRIBUTES: &str =
    "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt";
/// Another storage key: the SRK template without noDA is another template, so another key.
const OTHER_STORAGE_ATTRIBUTES: &str =
    "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt";
/// tpm2-tools' credential file (`tpm2_makecredential -o`, `tpm2_activatecredential -i`):
/// BE32 magic, BE32 version 1, then `TPM2B_ID_OBJECT` ‖ `TPM2B_ENCRYPTED_SECRET`.
const CREDENTIAL_FILE_MAGIC: u32 = 0xBADC_C0DE;
const CREDENTIAL_FILE_VERSION: u32 = 1;

#[test]
fn blob_activates_imports_and_hmacs_in_a_software_tpm() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(dir.path());

    // The device's keys: the default EK and an SRK from the SDKs' template, both persisted
    // where the SDKs keep them.
    tpm.run(&[
        "tpm2_createek",
        "-c",
        EK_HANDLE,
        "-G",
        "rsa",
        "-u",
        "ek.pub",
    ]);
    create_primary(&tpm, SRK_HANDLE, SRK_ATTRIBUTES);
    tpm.run(&[
        "tpm2_readpublic",
        "-c",
        EK_HANDLE,
        "-o",
        "ek.pub",
        "-n",
        "ek.name",
    ]);
    tpm.run(&[
        "tpm2_readpublic",
        "-c",
        SRK_HANDLE,
        "-o",
        "srk.pub",
        "-n",
        "srk.name",
    ]);

    let ek = parse_public(&BASE64.encode(tpm.read("ek.pub"))).unwrap();
    let srk = parse_public(&BASE64.encode(tpm.read("srk.pub"))).unwrap();
    assert_eq!(
        ek.name().as_slice(),
        tpm.read("ek.name"),
        "Name(EK) differs from the TPM's"
    );
    assert_eq!(
        srk.name().as_slice(),
        tpm.read("srk.name"),
        "Name(SRK) differs from the TPM's"
    );

    let uri = b"berth-hub.example.net";
    let activation = build_activation(&ek, &srk, uri, &mut rand::thread_rng()).unwrap();
    let parts = split_blob(&activation.blob);

    // 1. ActivateCredential(activateHandle = SRK, keyHandle = EK) yields innerWrapKey.
    let mut credential_file = Vec::new();
    credential_file.extend_from_slice(&CREDENTIAL_FILE_MAGIC.to_be_bytes());
    credential_file.extend_from_slice(&CREDENTIAL_FILE_VERSION.to_be_bytes());
    credential_file.extend_from_slice(parts.credential_blob);
    credential_file.extend_from_slice(parts.secret);
    tpm.write("credential.bin", &credential_file);
    tpm.activate(SRK_HANDLE, "inner.key")
        .expect("ActivateCredential refused the blob");
    let inner_wrap_key = tpm.read("inner.key");
    assert_eq!(
        inner_wrap_key.len(),
        16,
        "innerWrapKey must be AES-128 (§7.2)"
    );
    // The credential is innerWrapKey: it opens the URI data (§7.5 step 7).
    let mut uri_data = parts.enc_uri.get(2..).unwrap().to_vec();
    let key: [u8; 16] = inner_wrap_key.as_slice().try_into().unwrap();
    cfb_mode::Decryptor::<Aes128>::new(&key.into(), &[0u8; 16].into()).decrypt(&mut uri_data);
    assert_eq!(uri_data, uri);

    // The credential is bound to Name(SRK): another storage key cannot activate it.
    create_primary(&tpm, OTHER_SRK_HANDLE, OTHER_STORAGE_ATTRIBUTES);
    let refused = tpm
        .activate(OTHER_SRK_HANDLE, "other.key")
        .expect_err("ActivateCredential accepted a storage key other than the SRK");
    assert!(refused.contains("integrity check failed"), "{refused}");

    // 2. Import the duplicate under the SRK with the inner wrapper key, then Load.
    tpm.write("id.pub", parts.id_public);
    tpm.write("id.dpriv", parts.duplicate);
    tpm.write("id.seed", parts.in_sym_seed);
    tpm.run(&[
        "tpm2_import",
        "-C",
        SRK_HANDLE,
        "-u",
        "id.pub",
        "-i",
        "id.dpriv",
        "-s",
        "id.seed",
        "-k",
        "inner.key",
        "-r",
        "id.priv",
    ]);
    tpm.run(&[
        "tpm2_load",
        "-C",
        SRK_HANDLE,
        "-u",
        "id.pub",
        "-r",
        "id.priv",
        "-c",
        "id.ctx",
    ]);
    // Persisted where the SDKs keep it (§7.1).
    tpm.run(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "id.ctx",
        ID_KEY_HANDLE,
    ]);
    tpm.run(&["tpm2_flushcontext", "-t"]);

    // 3. The TPM's HMAC with the imported ID key, empty auth, is HMAC-SHA256(K): the
    // device's SAS signatures will verify with K.
    let data = b"0ne00000000%2Fregistrations%2Fdevice-1\n1767225600";
    tpm.write("data.bin", data);
    tpm.run(&[
        "tpm2_hmac",
        "-c",
        ID_KEY_HANDLE,
        "-g",
        "sha256",
        "-o",
        "hmac.bin",
        "data.bin",
    ]);
    let mut mac = Hmac::<Sha256>::new_from_slice(&activation.key).unwrap();
    mac.update(data);
    assert_eq!(tpm.read("hmac.bin"), mac.finalize().into_bytes().as_slice());
}

/// The six TPM2B structures of the blob (§7.2), each with its u16 size.
struct BlobParts<'a> {
    credential_blob: &'a [u8],
    secret: &'a [u8],
    duplicate: &'a [u8],
    in_sym_seed: &'a [u8],
    id_public: &'a [u8],
    enc_uri: &'a [u8],
}

fn split_blob(blob: &[u8]) -> BlobParts<'_> {
    let mut rest = blob;
    let mut next = || {
        let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let (part, tail) = rest.split_at(2 + size);
        rest = tail;
        part
    };
    let parts = BlobParts {
        credential_blob: next(),
        secret: next(),
        duplicate: next(),
        in_sym_seed: next(),
        id_public: next(),
        enc_uri: next(),
    };
    assert!(rest.is_empty(), "{} bytes after the six parts", rest.len());
    parts
}

fn create_primary(tpm: &Swtpm, handle: &str, attributes: &str) {
    tpm.run(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "rsa2048:aes128cfb",
        "-g",
        "sha256",
        "-a",
        attributes,
        "-c",
        "primary.ctx",
    ]);
    tpm.run(&["tpm2_evictcontrol", "-C", "o", "-c", "primary.ctx", handle]);
    // Without a resource manager, transient objects stay loaded until flushed, and the TPM
    // holds only three.
    tpm.run(&["tpm2_flushcontext", "-t"]);
}

fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "missing {}: install the Debian packages {PACKAGES} (apt-get install -y {PACKAGES}; \
         tests/run.sh does this)",
        missing.join(", ")
    );
}

/// A running `swtpm` on loopback ports, killed on drop.
struct Swtpm {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Swtpm {
    fn start(dir: &Path) -> Self {
        let state = dir.join("state");
        fs::create_dir_all(&state).unwrap();
        // Free ports can be taken between the probe and swtpm's bind: retry a few times.
        for attempt in 0..5 {
            let port = free_port_pair();
            let log = File::create(dir.join(format!("swtpm-{attempt}.log"))).unwrap();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--server"])
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // exited, most likely a port clash: try other ports
                }
                if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                    return Self {
                        child,
                        port,
                        dir: dir.to_path_buf(),
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("swtpm did not listen on {address} within {START_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("swtpm exited at start five times; see swtpm-*.log");
    }

    /// Runs a tpm2-tools command in the work directory; panics with its output on failure.
    fn run(&self, args: &[&str]) {
        if let Err(message) = self.try_run(args) {
            panic!("{message}");
        }
    }

    fn try_run(&self, args: &[&str]) -> Result<(), String> {
        let (program, rest) = args.split_first().unwrap();
        let output_path = self.dir.join("command.log");
        let output = File::create(&output_path).unwrap();
        let mut child = Command::new(program)
            .args(rest)
            .current_dir(&self.dir)
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:host=127.0.0.1,port={}", self.port),
            )
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{}` did not finish within {COMMAND_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.success() {
            Ok(())
        } else {
            let log = fs::read_to_string(&output_path).unwrap_or_default();
            Err(format!("`{}` failed ({status}):\n{log}", args.join(" ")))
        }
    }

    /// `ActivateCredential` of `credential.bin` with the EK under its policy,
    /// `PolicySecret(TPM_RH_ENDORSEMENT)`, as the SDKs do; the credential goes to `output`.
    fn activate(&self, activate_handle: &str, output: &str) -> Result<(), String> {
        self.run(&[
            "tpm2_startauthsession",
            "--policy-session",
            "-S",
            "session.ctx",
        ]);
        self.run(&["tpm2_policysecret", "-S", "session.ctx", "-c", "e"]);
        let result = self.try_run(&[
            "tpm2_activatecredential",
            "-c",
            activate_handle,
            "-C",
            EK_HANDLE,
            "-i",
            "credential.bin",
            "-o",
            output,
            "-P",
            "session:session.ctx",
        ]);
        // A failed command leaves the session loaded; a successful one ends it.
        let _ = self.try_run(&["tpm2_flushcontext", "session.ctx"]);
        result
    }

    fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.dir.join(file)).unwrap()
    }

    fn write(&self, file: &str, bytes: &[u8]) {
        fs::write(self.dir.join(file), bytes).unwrap();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port P with P + 1 also free (swtpm's control channel).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no pair of free loopback ports found");
}
