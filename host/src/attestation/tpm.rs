//! TPM 2.0 attestation (wire-protocol.md §7): the keys a device sends, the registration ID
//! derived from its endorsement key, and the `authenticationKey` blob built in software.
//!
//! The blob hands the device a fresh HMAC key K in a form that only the TPM holding both the
//! endorsement key (EK) and the storage root key (SRK) can unwrap: a credential to the EK
//! bound to `Name(SRK)` carries the inner wrapper key, and a duplicate of an HMAC key object,
//! wrapped to the SRK, carries K (§7.5 "Binding"). The server keeps K and verifies the
//! device's SAS tokens with it.
//!
//! Pure code: no I/O, and all randomness comes from the caller's RNG so tests are
//! deterministic. Structures use TPM 2.0 canonical marshalling: big-endian, `TPM2B_*` = u16
//! size ‖ bytes.

use std::fmt;

use aes::Aes128;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_HMAC: u16 = 0x0005;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_KEYEDHASH: u16 = 0x0008;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_CFB: u16 = 0x0043;

const ATTR_USER_WITH_AUTH: u32 = 1 << 6;
const ATTR_NO_DA: u32 = 1 << 10;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_DECRYPT: u32 = 1 << 17;
const ATTR_SIGN: u32 = 1 << 18;

/// SHA-256, the nameAlg of every key in the flow.
const DIGEST_LEN: usize = 32;
/// Name = u16 nameAlg ‖ digest.
const NAME_LEN: usize = 2 + DIGEST_LEN;
const RSA_KEY_BITS: u16 = 2048;
const RSA_MODULUS_LEN: usize = 256;
/// TPM exponent 0 means the default, 65537.
const RSA_DEFAULT_EXPONENT: u32 = 65_537;

/// Largest decoded `TPM2B_PUBLIC` accepted. An RSA-2048 key with a SHA-256 policy is 316 bytes;
/// the cap bounds the allocation before the structure is checked.
pub const MAX_PUBLIC_LEN: usize = 1024;
/// Longest URI data: Java decrypts it inside the TPM and fails past `TPM_PT_INPUT_BUFFER`,
/// typically 1024 bytes (§7.2 step 5).
pub const MAX_URI_LEN: usize = 1024;

/// Standard alphabet; padding optional, since the Base64 text of a key may differ between
/// clients while the bytes are the same (§7.1 "Enrollment match").
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a TPM key was refused or a blob could not be built. Display is safe to show to the
/// device: it names the field, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("the TPM public key is not valid Base64")]
    Base64,
    #[error("the TPM public key is longer than {MAX_PUBLIC_LEN} bytes")]
    TooLong,
    #[error("the TPM public key ends inside {0}")]
    Truncated(&'static str),
    #[error("the TPM public key has {0} unexpected bytes after {1}")]
    TrailingBytes(usize, &'static str),
    #[error("the TPM key type 0x{0:04x} is not RSA")]
    UnsupportedType(u16),
    #[error("the TPM key name algorithm 0x{0:04x} is not SHA-256")]
    UnsupportedNameAlg(u16),
    #[error("the TPM key is not a restricted decryption key (attributes 0x{0:08x})")]
    NotStorageKey(u32),
    #[error("the TPM key authPolicy is {0} bytes, not 0 or 32")]
    BadPolicySize(usize),
    #[error(
        "the TPM key symmetric algorithm is not AES-128-CFB \
         (algorithm 0x{algorithm:04x}, {key_bits} bits, mode 0x{mode:04x})"
    )]
    UnsupportedSymmetric {
        algorithm: u16,
        key_bits: u16,
        mode: u16,
    },
    #[error("the TPM key scheme 0x{0:04x} is not NULL")]
    UnsupportedScheme(u16),
    #[error("the TPM key is RSA-{0}, not RSA-2048")]
    UnsupportedKeyBits(u16),
    #[error("the TPM key modulus is {0} bytes, not 256")]
    BadModulusSize(usize),
    #[error("the TPM key is not a usable RSA public key")]
    InvalidRsaKey,
    #[error("the URI data is {0} bytes; it must be 1 to {MAX_URI_LEN}")]
    UriLength(usize),
    #[error("RSA-OAEP encryption to the TPM key failed")]
    Oaep,
}

/// An RSA-2048 storage-type public key (the EK or the SRK) as the device sent it.
///
/// Only what the SDK templates produce is accepted (§7.1): RSA-2048, nameAlg SHA-256,
/// restricted decrypt, AES-128-CFB, scheme NULL. Anything else could not complete
/// `ActivateCredential` or Import with the blob built here, so it is refused up front.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// The marshalled `TPMT_PUBLIC` (the TPM2B without its size); what `Name()` hashes.
    public_area: Vec<u8>,
    rsa: RsaPublicKey,
}

impl TpmPublic {
    /// The marshalled `TPMT_PUBLIC`. Two keys are the same key when these bytes are equal,
    /// whatever Base64 text carried them.
    pub fn public_area(&self) -> &[u8] {
        &self.public_area
    }

    /// The `TPM2B_PUBLIC`: u16 size ‖ `TPMT_PUBLIC`, the bytes the device sent.
    pub fn to_tpm2b(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.public_area.len());
        push_tpm2b(&mut out, &self.public_area);
        out
    }

    /// `Name()`: nameAlg (SHA-256) ‖ SHA-256(`TPMT_PUBLIC`). `ActivateCredential` checks the
    /// credential against the SRK's Name, and wrappers bind to the duplicated key's Name.
    pub fn name(&self) -> [u8; NAME_LEN] {
        name_of(&self.public_area)
    }

    /// The default registration ID of a TPM device (§7.1): lowercase RFC 4648 Base32,
    /// unpadded, of SHA-256 over the whole EK `TPM2B_PUBLIC`, size prefix included.
    pub fn registration_id(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(tpm2b_size(&self.public_area));
        hasher.update(&self.public_area);
        base32_lower(&hasher.finalize())
    }
}

impl fmt::Debug for TpmPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmPublic")
            .field("name", &hex::encode(self.name()))
            .finish_non_exhaustive()
    }
}

/// Parses the Base64 of a `TPM2B_PUBLIC`, as `endorsementKey` and `storageRootKey` arrive in
/// JSON bodies and in enrollments.
pub fn parse_public(base64: &str) -> Result<TpmPublic, TpmError> {
    // Base64 grows 3 bytes to 4 characters; refuse before allocating for an oversized text.
    if base64.len() > MAX_PUBLIC_LEN.div_ceil(3) * 4 {
        return Err(TpmError::TooLong);
    }
    let bytes = BASE64.decode(base64).map_err(|_| TpmError::Base64)?;
    parse_public_tpm2b(&bytes)
}

/// Parses a raw `TPM2B_PUBLIC`, as the AMQP SASL "TPM" mechanism carries it (§6.3).
pub fn parse_public_tpm2b(bytes: &[u8]) -> Result<TpmPublic, TpmError> {
    if bytes.len() > MAX_PUBLIC_LEN {
        return Err(TpmError::TooLong);
    }
    let mut outer = Reader::new(bytes);
    let public_area = outer.tpm2b("TPM2B_PUBLIC")?;
    outer.finish("TPM2B_PUBLIC")?;

    let mut area = Reader::new(public_area);
    let key_type = area.u16("type")?;
    if key_type != TPM_ALG_RSA {
        return Err(TpmError::UnsupportedType(key_type));
    }
    let name_alg = area.u16("nameAlg")?;
    if name_alg != TPM_ALG_SHA256 {
        return Err(TpmError::UnsupportedNameAlg(name_alg));
    }
    let attributes = area.u32("objectAttributes")?;
    if attributes & (ATTR_RESTRICTED | ATTR_DECRYPT) != ATTR_RESTRICTED | ATTR_DECRYPT {
        return Err(TpmError::NotStorageKey(attributes));
    }
    let policy = area.tpm2b("authPolicy")?;
    if !policy.is_empty() && policy.len() != DIGEST_LEN {
        return Err(TpmError::BadPolicySize(policy.len()));
    }
    // TPMT_SYM_DEF_OBJECT: keyBits and mode are absent when the algorithm is NULL.
    let algorithm = area.u16("symmetric.algorithm")?;
    let (key_bits, mode) = if algorithm == TPM_ALG_NULL {
        (0, 0)
    } else {
        (area.u16("symmetric.keyBits")?, area.u16("symmetric.mode")?)
    };
    if (algorithm, key_bits, mode) != (TPM_ALG_AES, 128, TPM_ALG_CFB) {
        return Err(TpmError::UnsupportedSymmetric {
            algorithm,
            key_bits,
            mode,
        });
    }
    let scheme = area.u16("scheme")?;
    if scheme != TPM_ALG_NULL {
        return Err(TpmError::UnsupportedScheme(scheme));
    }
    let key_bits = area.u16("keyBits")?;
    if key_bits != RSA_KEY_BITS {
        return Err(TpmError::UnsupportedKeyBits(key_bits));
    }
    let exponent = match area.u32("exponent")? {
        0 => RSA_DEFAULT_EXPONENT,
        e => e,
    };
    let modulus = area.tpm2b("unique.rsa")?;
    if modulus.len() != RSA_MODULUS_LEN {
        return Err(TpmError::BadModulusSize(modulus.len()));
    }
    area.finish("TPMT_PUBLIC")?;

    let rsa = RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from(u64::from(exponent)),
    )
    .map_err(|_| TpmError::InvalidRsaKey)?;
    Ok(TpmPublic {
        public_area: public_area.to_vec(),
        rsa,
    })
}

/// The challenge for one registration: the blob and the key it delivers. No `PartialEq`, so
/// K is never compared by accident in variable time.
#[derive(Clone)]
pub struct Activation {
    /// The `authenticationKey` blob (§7.2), before Base64.
    pub blob: Vec<u8>,
    /// K: the device's HMAC key. The server verifies the device's SAS tokens with it, and its
    /// Base64 is the hub device's primary key (§7.6).
    pub key: [u8; 32],
}

impl Activation {
    /// The blob as it goes into `authenticationKey`.
    pub fn blob_base64(&self) -> String {
        BASE64.encode(&self.blob)
    }
}

impl fmt::Debug for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activation")
            .field("blob_len", &self.blob.len())
            .finish_non_exhaustive()
    }
}

/// Builds the `authenticationKey` blob for a device whose TPM holds `ek` and `srk`
/// (§7.5, steps 1 to 8), delivering a fresh key K.
///
/// `uri` is the "encrypted URI data" (§7.2 #6): opaque to every SDK, but it must be 1 to
/// [`MAX_URI_LEN`] bytes. The blob is `766 + uri.len()` bytes.
pub fn build_activation<R: RngCore + CryptoRng>(
    ek: &TpmPublic,
    srk: &TpmPublic,
    uri: &[u8],
    rng: &mut R,
) -> Result<Activation, TpmError> {
    if uri.is_empty() || uri.len() > MAX_URI_LEN {
        return Err(TpmError::UriLength(uri.len()));
    }
    // 1. The HMAC key.
    let key: [u8; 32] = random(rng);
    // 2–3. The ID key, public and sensitive. seedValue obfuscates K in `unique`.
    let seed_value: [u8; DIGEST_LEN] = random(rng);
    let id_public = id_key_public(&seed_value, &key);
    let id_name = name_of(&id_public);
    let sensitive = id_key_sensitive(&seed_value, &key);
    // 4. Inner wrapper. 16 bytes because C and C# import with AES-128 whatever its size.
    let inner_wrap_key: [u8; 16] = random(rng);
    let enc_inner = inner_wrap(&inner_wrap_key, &sensitive, &id_name);
    // 5. Outer wrapper to the SRK. A digest-sized seed, as a TPM's own Duplicate makes.
    let duplication_seed: [u8; DIGEST_LEN] = random(rng);
    let in_sym_seed = oaep_encrypt(srk, &duplication_seed, "DUPLICATE", rng)?;
    let duplicate = outer_wrap(&duplication_seed, &enc_inner, &id_name);
    // 6. Credential to the EK, bound to Name(SRK).
    let credential_seed: [u8; DIGEST_LEN] = random(rng);
    let secret = oaep_encrypt(ek, &credential_seed, "IDENTITY", rng)?;
    let credential_blob = make_credential(&credential_seed, &inner_wrap_key, &srk.name());
    // 7. URI data.
    let mut enc_uri = uri.to_vec();
    aes128_cfb_encrypt(&inner_wrap_key, &mut enc_uri);

    // 8. The blob, in the order every SDK parses it (§7.2).
    let mut blob = Vec::with_capacity(766 + uri.len());
    blob.extend_from_slice(&credential_blob);
    push_tpm2b(&mut blob, &secret);
    blob.extend_from_slice(&duplicate);
    push_tpm2b(&mut blob, &in_sym_seed);
    push_tpm2b(&mut blob, &id_public);
    push_tpm2b(&mut blob, &enc_uri);
    Ok(Activation { blob, key })
}

/// The ID key's `TPMT_PUBLIC` (§7.5 step 2): a KEYEDHASH HMAC-SHA256 key with empty auth
/// (the device signs with an empty authValue), sign + noDA + userWithAuth, and none of
/// fixedTPM, fixedParent or sensitiveDataOrigin, since Import only takes duplicable objects.
/// `unique` = SHA-256(seedValue ‖ K), which the TPM recomputes on Load.
fn id_key_public(seed_value: &[u8; DIGEST_LEN], key: &[u8; 32]) -> Vec<u8> {
    let unique: [u8; DIGEST_LEN] = Sha256::new()
        .chain_update(seed_value)
        .chain_update(key)
        .finalize()
        .into();
    let mut out = Vec::with_capacity(48);
    out.extend_from_slice(&TPM_ALG_KEYEDHASH.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    out.extend_from_slice(&(ATTR_SIGN | ATTR_NO_DA | ATTR_USER_WITH_AUTH).to_be_bytes());
    push_tpm2b(&mut out, &[]); // authPolicy
    out.extend_from_slice(&TPM_ALG_HMAC.to_be_bytes()); // scheme
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes()); // details.hashAlg
    push_tpm2b(&mut out, &unique);
    out
}

/// The ID key's `TPM2B_SENSITIVE` (§7.5 step 3): the 72-byte `TPMT_SENSITIVE` with its size.
fn id_key_sensitive(seed_value: &[u8; DIGEST_LEN], key: &[u8; 32]) -> Vec<u8> {
    let mut area = Vec::with_capacity(72);
    area.extend_from_slice(&TPM_ALG_KEYEDHASH.to_be_bytes());
    push_tpm2b(&mut area, &[]); // authValue
    push_tpm2b(&mut area, seed_value);
    push_tpm2b(&mut area, key);
    let mut out = Vec::with_capacity(74);
    push_tpm2b(&mut out, &area);
    out
}

/// encInner (§7.5 step 4): AES-CFB(innerWrapKey, TPM2B(H(sens ‖ Name)) ‖ sens).
fn inner_wrap(inner_wrap_key: &[u8; 16], sensitive: &[u8], id_name: &[u8]) -> Vec<u8> {
    let integrity = Sha256::new()
        .chain_update(sensitive)
        .chain_update(id_name)
        .finalize();
    let mut out = Vec::with_capacity(2 + DIGEST_LEN + sensitive.len());
    push_tpm2b(&mut out, &integrity);
    out.extend_from_slice(sensitive);
    aes128_cfb_encrypt(inner_wrap_key, &mut out);
    out
}

/// The duplicate's `TPM2B_PRIVATE` (§7.5 step 5): `TPM2B(outerHMAC)` ‖ dupSensitive, where the
/// STORAGE key and INTEGRITY key come from the seed that only the SRK can decrypt.
fn outer_wrap(seed: &[u8; DIGEST_LEN], enc_inner: &[u8], id_name: &[u8]) -> Vec<u8> {
    let sym_key: [u8; 16] = kdfa(seed, b"STORAGE", id_name, &[]);
    let mut dup_sensitive = enc_inner.to_vec();
    aes128_cfb_encrypt(&sym_key, &mut dup_sensitive);
    let hmac_key: [u8; DIGEST_LEN] = kdfa(seed, b"INTEGRITY", &[], &[]);
    let outer_hmac = hmac_sha256(&hmac_key, &[&dup_sensitive, id_name]);
    tpm2b_of_pair(&outer_hmac, &dup_sensitive)
}

/// The `TPM2B_ID_OBJECT` (§7.5 step 6), as `TPM2_MakeCredential` makes it: the credential is the
/// inner wrapper key, and the HMAC over `Name(SRK)` makes `ActivateCredential` refuse any other
/// SRK.
fn make_credential(seed: &[u8; DIGEST_LEN], credential: &[u8; 16], srk_name: &[u8]) -> Vec<u8> {
    let sym_key: [u8; 16] = kdfa(seed, b"STORAGE", srk_name, &[]);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    push_tpm2b(&mut enc_identity, credential);
    aes128_cfb_encrypt(&sym_key, &mut enc_identity);
    let hmac_key: [u8; DIGEST_LEN] = kdfa(seed, b"INTEGRITY", &[], &[]);
    let integrity_hmac = hmac_sha256(&hmac_key, &[&enc_identity, srk_name]);
    tpm2b_of_pair(&integrity_hmac, &enc_identity)
}

/// u16 size ‖ `TPM2B(digest)` ‖ rest: the shape of both `TPM2B_PRIVATE` and `TPM2B_ID_OBJECT`.
fn tpm2b_of_pair(digest: &[u8; DIGEST_LEN], rest: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(2 + DIGEST_LEN + rest.len());
    push_tpm2b(&mut inner, digest);
    inner.extend_from_slice(rest);
    let mut out = Vec::with_capacity(2 + inner.len());
    push_tpm2b(&mut out, &inner);
    out
}

/// RSAES-OAEP with SHA-256 and MGF1-SHA-256 (the key's nameAlg). The TPM's label is the
/// ASCII string with its terminating zero byte (§7.5 `OAEP`; TSS `Crypto.java`).
fn oaep_encrypt<R: RngCore + CryptoRng>(
    key: &TpmPublic,
    data: &[u8],
    label: &str,
    rng: &mut R,
) -> Result<Vec<u8>, TpmError> {
    let padding = Oaep::new_with_label::<Sha256, _>(format!("{label}\0"));
    key.rsa
        .encrypt(rng, padding, data)
        .map_err(|_| TpmError::Oaep)
}

/// `KDFa` with HMAC-SHA256 (TPM 2.0 Part 1 §11.4.10.2), producing `N` bytes: the counter-mode
/// concatenation of HMAC(key, BE32(i) ‖ label ‖ 0x00 ‖ contextU ‖ contextV ‖ BE32(N × 8)).
/// The size in bits is taken from the output type, so the two cannot disagree.
fn kdfa<const N: usize>(
    key: &[u8; DIGEST_LEN],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
) -> [u8; N] {
    let bits = u32::try_from(N * 8).unwrap_or(u32::MAX).to_be_bytes();
    let mut out = [0u8; N];
    for (chunk, counter) in out.chunks_mut(DIGEST_LEN).zip(1u32..) {
        let block = hmac_sha256(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                &[0],
                context_u,
                context_v,
                &bits,
            ],
        );
        for (slot, byte) in chunk.iter_mut().zip(block) {
            *slot = byte;
        }
    }
    out
}

/// HMAC-SHA256 over the concatenation of `parts`.
fn hmac_sha256(key: &[u8; DIGEST_LEN], parts: &[&[u8]]) -> [u8; DIGEST_LEN] {
    // RFC 2104 zero-pads a key shorter than the 64-byte block; padding it here lets the
    // fixed-size constructor be used, which cannot fail.
    let mut block = [0u8; 64];
    for (slot, byte) in block.iter_mut().zip(key) {
        *slot = *byte;
    }
    let mut mac = <HmacSha256 as Mac>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// TPM "CFB": full-block CFB-128, IV of zeros, no padding (§7.2 "Which CFB").
fn aes128_cfb_encrypt(key: &[u8; 16], data: &mut [u8]) {
    cfb_mode::Encryptor::<Aes128>::new(key.into(), &[0u8; 16].into()).encrypt(data);
}

/// `Name()` of a marshalled `TPMT_PUBLIC` whose nameAlg is SHA-256.
fn name_of(public_area: &[u8]) -> [u8; NAME_LEN] {
    let mut name = [0u8; NAME_LEN];
    let (alg, digest) = name.split_at_mut(2);
    alg.copy_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    digest.copy_from_slice(&Sha256::digest(public_area));
    name
}

/// Appends u16 size ‖ data. Every caller passes a few hundred bytes at most (the URI data is
/// capped at [`MAX_URI_LEN`]), so the size always fits.
fn push_tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&tpm2b_size(data));
    out.extend_from_slice(data);
}

fn tpm2b_size(data: &[u8]) -> [u8; 2] {
    debug_assert!(u16::try_from(data.len()).is_ok());
    u16::try_from(data.len()).unwrap_or(u16::MAX).to_be_bytes()
}

fn random<const N: usize, R: RngCore + CryptoRng>(rng: &mut R) -> [u8; N] {
    let mut bytes = [0u8; N];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// RFC 4648 Base32, lowercase, without padding, as the SDKs spell registration IDs.
fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let symbol = |index: u16| char::from(ALPHABET[usize::from(index & 0x1f)]);
    let mut out = String::with_capacity((data.len() * 8).div_ceil(5));
    let (mut buffer, mut bits) = (0u16, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u16::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(symbol(buffer >> bits));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(symbol(buffer << (5 - bits)));
    }
    out
}

/// A bounds-checked cursor over marshalled bytes: every read names the field it needed, so a
/// short input gives [`TpmError::Truncated`] instead of a panic.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], TpmError> {
        let (head, tail) = self
            .bytes
            .split_at_checked(len)
            .ok_or(TpmError::Truncated(field))?;
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TpmError> {
        let (head, tail) = self
            .bytes
            .split_first_chunk::<N>()
            .ok_or(TpmError::Truncated(field))?;
        self.bytes = tail;
        Ok(*head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn tpm2b(&mut self, field: &'static str) -> Result<&'a [u8], TpmError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    /// Succeeds only if every byte was read: `field` is what should have ended here.
    fn finish(&self, field: &'static str) -> Result<(), TpmError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(TpmError::TrailingBytes(self.bytes.len(), field))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rsa::traits::PublicKeyParts;
    use rsa::RsaPrivateKey;

    use super::*;

    /// The EK of wire-protocol.md §7.1 (from Azure/azure-iot-sdk-c#271).
    const EK_VECTOR: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAopqgkUBwtpr1sCgVJcEZxsJtpmtOAt9K7SjGFe4hsp6DJ/dd2E5UFzBC+Jp8Fzqf5ukRBkqrAgIuAvHRsruIedk1uarJSLhbDpFLHxFd7iDNcYfrvdgVNT2T9zrvkh2y04WuRQg2D5qf0tZF82jeTjR/YJK7uWhaRwWOwZ3b1XD9l6wFOrwK/Ic0PEsjneFXQzL0n9uKyuHmHNz+wHppmOiMAabvnXXEin9ou7/iowY/+YhFm3j7atsVvxMI5HEM3Mq+W4imUuzPxVX7fZH+oWPKP5ofpWBTf+MdttGby1AjGnv8JE69JriOYoZG2/4qbsfv9M7a7NFrBlaW7Rt36w==";
    /// `PolicySecret(TPM_RH_ENDORSEMENT)`, the EK template's authPolicy.
    const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";

    /// The fields of an RSA `TPMT_PUBLIC`, to marshal well-formed and malformed keys.
    #[derive(Clone)]
    struct Template {
        key_type: u16,
        name_alg: u16,
        attributes: u32,
        policy: Vec<u8>,
        symmetric: Vec<u8>,
        scheme: Vec<u8>,
        key_bits: u16,
        exponent: u32,
        modulus: Vec<u8>,
        trailing: Vec<u8>,
    }

    impl Template {
        /// The SDKs' EK template (§7.1).
        fn ek(modulus: Vec<u8>) -> Self {
            Self {
                key_type: TPM_ALG_RSA,
                name_alg: TPM_ALG_SHA256,
                attributes: 0x0003_00B2,
                policy: hex::decode(EK_POLICY).unwrap(),
                symmetric: hex::decode("000600800043").unwrap(),
                scheme: hex::decode("0010").unwrap(),
                key_bits: 2048,
                exponent: 0,
                modulus,
                trailing: Vec::new(),
            }
        }

        /// The SDKs' SRK template (§7.1).
        fn srk(modulus: Vec<u8>) -> Self {
            Self {
                attributes: 0x0003_0472,
                policy: Vec::new(),
                ..Self::ek(modulus)
            }
        }

        fn marshal(&self) -> Vec<u8> {
            let mut area = Vec::new();
            area.extend_from_slice(&self.key_type.to_be_bytes());
            area.extend_from_slice(&self.name_alg.to_be_bytes());
            area.extend_from_slice(&self.attributes.to_be_bytes());
            push_tpm2b(&mut area, &self.policy);
            area.extend_from_slice(&self.symmetric);
            area.extend_from_slice(&self.scheme);
            area.extend_from_slice(&self.key_bits.to_be_bytes());
            area.extend_from_slice(&self.exponent.to_be_bytes());
            push_tpm2b(&mut area, &self.modulus);
            area.extend_from_slice(&self.trailing);
            let mut out = Vec::new();
            push_tpm2b(&mut out, &area);
            out
        }
    }

    fn vector_bytes() -> Vec<u8> {
        BASE64.decode(EK_VECTOR).unwrap()
    }

    fn vector_template() -> Template {
        let bytes = vector_bytes();
        Template::ek(bytes[60..].to_vec())
    }

    fn parse_template(template: &Template) -> Result<TpmPublic, TpmError> {
        parse_public_tpm2b(&template.marshal())
    }

    /// An EK and an SRK private key, generated once from a fixed seed (keygen is slow).
    fn private_keys() -> &'static (RsaPrivateKey, RsaPrivateKey) {
        static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut rng = StdRng::seed_from_u64(2048);
            let ek = RsaPrivateKey::new(&mut rng, 2048).unwrap();
            let srk = RsaPrivateKey::new(&mut rng, 2048).unwrap();
            (ek, srk)
        })
    }

    fn modulus_of(key: &RsaPrivateKey) -> Vec<u8> {
        key.n().to_bytes_be()
    }

    fn test_ek_and_srk() -> (TpmPublic, TpmPublic) {
        let (ek, srk) = private_keys();
        let ek = parse_template(&Template::ek(modulus_of(ek))).unwrap();
        let srk = parse_template(&Template::srk(modulus_of(srk))).unwrap();
        (ek, srk)
    }

    fn aes128_cfb_decrypt(key: &[u8], data: &mut [u8]) {
        let key: [u8; 16] = key.try_into().unwrap();
        cfb_mode::Decryptor::<Aes128>::new(&key.into(), &[0u8; 16].into()).decrypt(data);
    }

    fn oaep_decrypt(key: &RsaPrivateKey, label: &str, data: &[u8]) -> Vec<u8> {
        key.decrypt(Oaep::new_with_label::<Sha256, _>(label), data)
            .unwrap()
    }

    // ---- §7.1: keys and registration ID ----

    #[test]
    fn registration_id_matches_the_sdk_vector() {
        let ek = parse_public(EK_VECTOR).unwrap();
        assert_eq!(
            ek.registration_id(),
            "6rek5qncnygnkzflohxz4u6zlfly6ktm4klsc7xrbgvesqyllnfa"
        );
        assert_eq!(ek.to_tpm2b(), vector_bytes());
        assert_eq!(ek.public_area().len(), 314);
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ];
        for (input, expected) in cases {
            assert_eq!(base32_lower(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn template_builder_reproduces_the_vector() {
        assert_eq!(vector_template().marshal(), vector_bytes());
    }

    #[test]
    fn srk_template_parses() {
        let srk = parse_template(&Template::srk(vector_template().modulus)).unwrap();
        assert_eq!(srk.public_area().len(), 282);
    }

    #[test]
    fn same_key_in_other_base64_spelling_is_equal() {
        let padded = parse_public(EK_VECTOR).unwrap();
        let unpadded = parse_public(EK_VECTOR.trim_end_matches('=')).unwrap();
        assert_eq!(padded, unpadded);
    }

    #[test]
    fn name_is_name_alg_then_sha256_of_the_public_area() {
        // b = base64.b64decode(EK_VECTOR); print(hashlib.sha256(b[2:]).hexdigest()) in Python
        let ek = parse_public(EK_VECTOR).unwrap();
        assert_eq!(
            hex::encode(ek.name()),
            "000ba73e0bba4db5cb9866f5906025dfd15b53e91a9953717e85914ac975ac01e382"
        );
        assert!(format!("{ek:?}").contains("000ba73e"));
    }

    // ---- malformed keys ----

    #[test]
    fn bad_base64_is_refused() {
        assert_eq!(parse_public("AToA!QAL"), Err(TpmError::Base64));
        // One character past a group cannot be Base64, padded or not.
        assert_eq!(parse_public("AToAA"), Err(TpmError::Base64));
        assert_eq!(parse_public("AToAAQ==="), Err(TpmError::Base64));
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        assert_eq!(parse_public(&"A".repeat(4 * 1024)), Err(TpmError::TooLong));
        let mut raw = vec![0u8; MAX_PUBLIC_LEN + 1];
        raw[..2].copy_from_slice(&u16::try_from(MAX_PUBLIC_LEN - 1).unwrap().to_be_bytes());
        assert_eq!(parse_public_tpm2b(&raw), Err(TpmError::TooLong));
    }

    #[test]
    fn empty_input_is_truncated() {
        assert_eq!(parse_public(""), Err(TpmError::Truncated("TPM2B_PUBLIC")));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = vector_bytes();
        for len in 0..bytes.len() {
            // Cut the bytes, keeping the declared size: the TPM2B claims more than there is.
            assert_eq!(
                parse_public_tpm2b(&bytes[..len]),
                Err(TpmError::Truncated("TPM2B_PUBLIC")),
                "cut at {len}"
            );
            // Cut the area and shrink the size to match: a field inside ends early.
            if len >= 2 {
                let mut cut = bytes[..len].to_vec();
                cut[..2].copy_from_slice(&u16::try_from(len - 2).unwrap().to_be_bytes());
                assert!(
                    matches!(parse_public_tpm2b(&cut), Err(TpmError::Truncated(_))),
                    "area cut at {}",
                    len - 2
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut after = vector_bytes();
        after.push(0);
        assert_eq!(
            parse_public_tpm2b(&after),
            Err(TpmError::TrailingBytes(1, "TPM2B_PUBLIC"))
        );
        let inside = Template {
            trailing: vec![0, 0, 0],
            ..vector_template()
        };
        assert_eq!(
            parse_template(&inside),
            Err(TpmError::TrailingBytes(3, "TPMT_PUBLIC"))
        );
    }

    #[test]
    fn non_rsa_key_is_refused() {
        let ecc = Template {
            key_type: 0x0023,
            ..vector_template()
        };
        assert_eq!(parse_template(&ecc), Err(TpmError::UnsupportedType(0x0023)));
    }

    #[test]
    fn other_name_alg_is_refused() {
        let sha1 = Template {
            name_alg: 0x0004,
            ..vector_template()
        };
        assert_eq!(
            parse_template(&sha1),
            Err(TpmError::UnsupportedNameAlg(0x0004))
        );
    }

    #[test]
    fn key_that_is_not_restricted_decrypt_is_refused() {
        // The EK attributes with sign instead of decrypt.
        let signing = Template {
            attributes: 0x0005_00B2,
            ..vector_template()
        };
        assert_eq!(
            parse_template(&signing),
            Err(TpmError::NotStorageKey(0x0005_00B2))
        );
        let unrestricted = Template {
            attributes: 0x0002_00B2,
            ..vector_template()
        };
        assert_eq!(
            parse_template(&unrestricted),
            Err(TpmError::NotStorageKey(0x0002_00B2))
        );
    }

    #[test]
    fn policy_of_wrong_size_is_refused() {
        let policy = Template {
            policy: vec![0; 20],
            ..vector_template()
        };
        assert_eq!(parse_template(&policy), Err(TpmError::BadPolicySize(20)));
    }

    #[test]
    fn symmetric_other_than_aes128_cfb_is_refused() {
        let cases = [
            ("0010", (TPM_ALG_NULL, 0, 0)),
            ("000601000043", (TPM_ALG_AES, 256, TPM_ALG_CFB)),
            ("000600800044", (TPM_ALG_AES, 128, 0x0044)),
        ];
        for (symmetric, (algorithm, key_bits, mode)) in cases {
            let template = Template {
                symmetric: hex::decode(symmetric).unwrap(),
                ..vector_template()
            };
            assert_eq!(
                parse_template(&template),
                Err(TpmError::UnsupportedSymmetric {
                    algorithm,
                    key_bits,
                    mode
                }),
                "{symmetric}"
            );
        }
    }

    #[test]
    fn rsa_scheme_other_than_null_is_refused() {
        let oaep = Template {
            scheme: hex::decode("0017000b").unwrap(),
            ..vector_template()
        };
        assert_eq!(
            parse_template(&oaep),
            Err(TpmError::UnsupportedScheme(0x0017))
        );
    }

    #[test]
    fn other_key_sizes_are_refused() {
        let small = Template {
            key_bits: 1024,
            ..vector_template()
        };
        assert_eq!(
            parse_template(&small),
            Err(TpmError::UnsupportedKeyBits(1024))
        );
        let short = Template {
            modulus: vec![0xC5; 128],
            ..vector_template()
        };
        assert_eq!(parse_template(&short), Err(TpmError::BadModulusSize(128)));
    }

    #[test]
    fn unusable_rsa_exponent_is_refused() {
        let one = Template {
            exponent: 1,
            ..vector_template()
        };
        assert_eq!(parse_template(&one), Err(TpmError::InvalidRsaKey));
        let explicit = Template {
            exponent: 65_537,
            ..vector_template()
        };
        assert!(parse_template(&explicit).is_ok());
    }

    #[test]
    fn error_messages_name_the_field() {
        assert_eq!(
            TpmError::Truncated("unique.rsa").to_string(),
            "the TPM public key ends inside unique.rsa"
        );
    }

    // ---- §7.5 primitives ----

    /// Computed independently with Python's standard library:
    ///
    /// ```text
    /// import hmac, hashlib
    /// def kdfa(key, label, u, v, bits):
    ///     out = b""; i = 1
    ///     while len(out) < bits // 8:
    ///         out += hmac.new(key, i.to_bytes(4, "big") + label + b"\0" + u + v
    ///                         + bits.to_bytes(4, "big"), hashlib.sha256).digest()
    ///         i += 1
    ///     return out[: bits // 8]
    /// key = bytes(range(32))
    /// name = bytes.fromhex("000b") + hashlib.sha256(b"berth").digest()
    /// print(kdfa(key, b"STORAGE", name, b"", 128).hex())
    /// print(kdfa(key, b"INTEGRITY", b"", b"", 256).hex())
    /// print(kdfa(key, b"XYZ", b"abc", b"de", 384).hex())
    /// ```
    #[test]
    fn kdfa_matches_an_independent_python_computation() {
        let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        let name = name_of(b"berth");
        assert_eq!(
            hex::encode(name),
            "000b5c2f64c7f21efd5fb5e3d6a499abe5eacb248ae6f6f0085387c9a056d10ef5fd"
        );
        let storage: [u8; 16] = kdfa(&key, b"STORAGE", &name, &[]);
        assert_eq!(hex::encode(storage), "b78e20ed82fabf9418026bced5783351");
        let integrity: [u8; 32] = kdfa(&key, b"INTEGRITY", &[], &[]);
        assert_eq!(
            hex::encode(integrity),
            "bacf689f634ece301e1f1b15b072d9c87db6a69585db42b1a0cb8f73ebe2692e"
        );
        // Two HMAC blocks: the counter goes to 2 and the second block is cut.
        let long: [u8; 48] = kdfa(&key, b"XYZ", b"abc", b"de");
        assert_eq!(
            hex::encode(long),
            "ef2a35f2106407f278604d7233ddc48ef12b00406c87656e\
             0b081d5321ce7c73e3497211c076d3576d4991b82a9350fd"
        );
    }

    #[test]
    fn padded_key_hmac_equals_plain_hmac() {
        let key = [0xA5u8; 32];
        let mut mac = HmacSha256::new_from_slice(&key).unwrap();
        mac.update(b"part one, part two");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(hmac_sha256(&key, &[b"part one, ", b"part two"]), expected);
    }

    /// `printf 'TPM credential data, 18+ bytes!' | openssl enc -aes-128-cfb \
    ///   -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 | xxd -p`
    #[test]
    fn aes_cfb_is_openssl_aes_128_cfb_with_zero_iv() {
        let key: [u8; 16] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        let mut data = b"TPM credential data, 18+ bytes!".to_vec();
        aes128_cfb_encrypt(&key, &mut data);
        assert_eq!(
            hex::encode(&data),
            "92f17617e4fd3ee60a21f50bc0a4f81d9ae901bb5ddd3078cdf094f3fa16fe"
        );
        aes128_cfb_decrypt(&key, &mut data);
        assert_eq!(data, b"TPM credential data, 18+ bytes!");
    }

    #[test]
    fn id_key_public_is_a_48_byte_hmac_sha256_keyed_hash() {
        let seed_value = [0x11u8; 32];
        let key = [0x22u8; 32];
        let public = id_key_public(&seed_value, &key);
        assert_eq!(public.len(), 48);
        let unique = Sha256::new()
            .chain_update(seed_value)
            .chain_update(key)
            .finalize();
        let expected = format!("0008000b000404400000 0005000b 0020{}", hex::encode(unique));
        assert_eq!(hex::encode(&public), expected.replace(' ', ""));
    }

    #[test]
    fn sensitive_is_72_bytes_in_a_74_byte_tpm2b() {
        let sensitive = id_key_sensitive(&[0x11; 32], &[0x22; 32]);
        assert_eq!(sensitive.len(), 74);
        let expected = format!(
            "0048 0008 0000 0020{} 0020{}",
            "11".repeat(32),
            "22".repeat(32)
        );
        assert_eq!(hex::encode(&sensitive), expected.replace(' ', ""));
    }

    #[test]
    fn inner_wrap_is_108_bytes_carrying_its_integrity() {
        let sensitive = id_key_sensitive(&[0x11; 32], &[0x22; 32]);
        let name = name_of(b"id key");
        let inner_key = [0x33u8; 16];
        let mut enc_inner = inner_wrap(&inner_key, &sensitive, &name);
        assert_eq!(enc_inner.len(), 108);
        aes128_cfb_decrypt(&inner_key, &mut enc_inner);
        let integrity = Sha256::new()
            .chain_update(&sensitive)
            .chain_update(name)
            .finalize();
        assert_eq!(&enc_inner[..2], &[0, 32]);
        assert_eq!(&enc_inner[2..34], integrity.as_slice());
        assert_eq!(&enc_inner[34..], sensitive.as_slice());
    }

    #[test]
    fn outer_wrap_is_an_hmac_then_storage_key_encryption() {
        let seed = [0x44u8; 32];
        let name = name_of(b"id key");
        let enc_inner = vec![0x55u8; 108];
        let private = outer_wrap(&seed, &enc_inner, &name);
        assert_eq!(private.len(), 2 + 34 + 108);
        assert_eq!(&private[..4], &[0, 142, 0, 32]);
        let (outer_hmac, dup_sensitive) = private[4..].split_at(32);
        let hmac_key: [u8; 32] = kdfa(&seed, b"INTEGRITY", &[], &[]);
        assert_eq!(outer_hmac, hmac_sha256(&hmac_key, &[dup_sensitive, &name]));
        let mut plain = dup_sensitive.to_vec();
        let storage: [u8; 16] = kdfa(&seed, b"STORAGE", &name, &[]);
        aes128_cfb_decrypt(&storage, &mut plain);
        assert_eq!(plain, enc_inner);
    }

    #[test]
    fn credential_is_54_bytes_with_an_18_byte_enc_identity() {
        let seed = [0x66u8; 32];
        let srk_name = name_of(b"srk");
        let credential = [0x77u8; 16];
        let id_object = make_credential(&seed, &credential, &srk_name);
        assert_eq!(id_object.len(), 54);
        assert_eq!(&id_object[..4], &[0, 52, 0, 32]);
        let (integrity, enc_identity) = id_object[4..].split_at(32);
        assert_eq!(enc_identity.len(), 18);
        let hmac_key: [u8; 32] = kdfa(&seed, b"INTEGRITY", &[], &[]);
        assert_eq!(
            integrity,
            hmac_sha256(&hmac_key, &[enc_identity, &srk_name])
        );
        // Bound to the SRK: another name gives another HMAC.
        assert_ne!(
            integrity,
            hmac_sha256(&hmac_key, &[enc_identity, &name_of(b"other")])
        );
        let mut plain = enc_identity.to_vec();
        let storage: [u8; 16] = kdfa(&seed, b"STORAGE", &srk_name, &[]);
        aes128_cfb_decrypt(&storage, &mut plain);
        assert_eq!(&plain[..2], &[0, 16]);
        assert_eq!(&plain[2..], &credential);
    }

    #[test]
    fn oaep_label_ends_with_a_zero_byte() {
        let (ek_private, _) = private_keys();
        let (ek, _) = test_ek_and_srk();
        let secret = [0x88u8; 32];
        let cipher = oaep_encrypt(&ek, &secret, "IDENTITY", &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(cipher.len(), 256);
        assert_eq!(oaep_decrypt(ek_private, "IDENTITY\0", &cipher), secret);
        let without_zero = Oaep::new_with_label::<Sha256, _>("IDENTITY");
        assert!(ek_private.decrypt(without_zero, &cipher).is_err());
    }

    // ---- §7.5: the whole blob ----

    /// Plays the device's TPM in software with the private keys: `ActivateCredential`, then
    /// Import, then the URI data; every integrity check must pass and K must come out.
    #[test]
    fn blob_unwraps_to_k_with_the_private_keys() {
        let (ek_private, srk_private) = private_keys();
        let (ek, srk) = test_ek_and_srk();
        let uri = b"berth-hub.example.net";
        let activation = build_activation(&ek, &srk, uri, &mut StdRng::seed_from_u64(7)).unwrap();
        assert_eq!(activation.blob.len(), 766 + uri.len());

        let mut blob = Reader::new(&activation.blob);
        let id_object = blob.tpm2b("credentialBlob").unwrap();
        let secret = blob.tpm2b("secret").unwrap();
        let duplicate = blob.tpm2b("duplicate").unwrap();
        let in_sym_seed = blob.tpm2b("inSymSeed").unwrap();
        let id_public = blob.tpm2b("objectPublic").unwrap();
        let enc_uri = blob.tpm2b("encUri").unwrap();
        blob.finish("blob").unwrap();
        let sizes = [
            id_object,
            secret,
            duplicate,
            in_sym_seed,
            id_public,
            enc_uri,
        ]
        .map(<[u8]>::len);
        assert_eq!(sizes, [52, 256, 142, 256, 48, uri.len()]);

        // ActivateCredential(SRK, EK).
        let seed1: [u8; 32] = oaep_decrypt(ek_private, "IDENTITY\0", secret)
            .try_into()
            .unwrap();
        let mut id = Reader::new(id_object);
        let integrity = id.tpm2b("integrityHMAC").unwrap();
        let enc_identity = id.bytes;
        let hmac_key: [u8; 32] = kdfa(&seed1, b"INTEGRITY", &[], &[]);
        assert_eq!(
            integrity,
            hmac_sha256(&hmac_key, &[enc_identity, &srk.name()])
        );
        let mut identity = enc_identity.to_vec();
        aes128_cfb_decrypt(
            &kdfa::<16>(&seed1, b"STORAGE", &srk.name(), &[]),
            &mut identity,
        );
        let mut identity = Reader::new(&identity);
        let inner_wrap_key = identity.tpm2b("credential").unwrap().to_vec();
        identity.finish("credential").unwrap();
        assert_eq!(inner_wrap_key.len(), 16);

        // The URI data opens with the credential.
        let mut plain_uri = enc_uri.to_vec();
        aes128_cfb_decrypt(&inner_wrap_key, &mut plain_uri);
        assert_eq!(plain_uri, uri);

        // Import(SRK, innerWrapKey, objectPublic, duplicate, inSymSeed).
        let id_name = name_of(id_public);
        let seed2: [u8; 32] = oaep_decrypt(srk_private, "DUPLICATE\0", in_sym_seed)
            .try_into()
            .unwrap();
        let mut private = Reader::new(duplicate);
        let outer_hmac = private.tpm2b("outerHMAC").unwrap();
        let dup_sensitive = private.bytes;
        let hmac_key: [u8; 32] = kdfa(&seed2, b"INTEGRITY", &[], &[]);
        assert_eq!(
            outer_hmac,
            hmac_sha256(&hmac_key, &[dup_sensitive, &id_name])
        );
        let mut inner = dup_sensitive.to_vec();
        aes128_cfb_decrypt(&kdfa::<16>(&seed2, b"STORAGE", &id_name, &[]), &mut inner);
        aes128_cfb_decrypt(&inner_wrap_key, &mut inner);
        let mut inner = Reader::new(&inner);
        let inner_integrity = inner.tpm2b("innerIntegrity").unwrap();
        let sensitive = inner.bytes;
        assert_eq!(
            inner_integrity,
            Sha256::new()
                .chain_update(sensitive)
                .chain_update(id_name)
                .finalize()
                .as_slice()
        );
        let mut sensitive = Reader::new(Reader::new(sensitive).tpm2b("TPM2B_SENSITIVE").unwrap());
        assert_eq!(sensitive.u16("sensitiveType").unwrap(), TPM_ALG_KEYEDHASH);
        assert_eq!(sensitive.tpm2b("authValue").unwrap(), b"");
        let seed_value = sensitive.tpm2b("seedValue").unwrap().to_vec();
        let key = sensitive.tpm2b("sensitive").unwrap();
        sensitive.finish("TPMT_SENSITIVE").unwrap();
        assert_eq!(key, activation.key);

        // Load: unique = H(seedValue ‖ K).
        let unique = Sha256::new()
            .chain_update(&seed_value)
            .chain_update(key)
            .finalize();
        assert_eq!(&id_public[16..], unique.as_slice());
    }

    #[test]
    fn seeded_rng_gives_the_same_blob_and_another_seed_another_key() {
        let (ek, srk) = test_ek_and_srk();
        let build =
            |seed| build_activation(&ek, &srk, b"uri", &mut StdRng::seed_from_u64(seed)).unwrap();
        let (first, again) = (build(3), build(3));
        assert_eq!((first.blob, first.key), (again.blob, again.key));
        assert_ne!(build(3).key, build(4).key);
        assert_eq!(build(3).blob_base64(), BASE64.encode(build(3).blob));
    }

    #[test]
    fn uri_data_must_be_short_and_non_empty() {
        let (ek, srk) = test_ek_and_srk();
        let mut rng = StdRng::seed_from_u64(5);
        assert_eq!(
            build_activation(&ek, &srk, b"", &mut rng).unwrap_err(),
            TpmError::UriLength(0)
        );
        let long = vec![b'u'; MAX_URI_LEN + 1];
        assert_eq!(
            build_activation(&ek, &srk, &long, &mut rng).unwrap_err(),
            TpmError::UriLength(MAX_URI_LEN + 1)
        );
        let longest = vec![b'u'; MAX_URI_LEN];
        assert_eq!(
            build_activation(&ek, &srk, &longest, &mut rng)
                .unwrap()
                .blob
                .len(),
            766 + MAX_URI_LEN
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let (ek, srk) = test_ek_and_srk();
        let activation =
            build_activation(&ek, &srk, b"uri", &mut StdRng::seed_from_u64(6)).unwrap();
        let shown = format!("{activation:?}");
        assert!(!shown.contains(&format!("{:?}", activation.key)));
        assert!(shown.contains("blob_len: 769"));
    }
}
