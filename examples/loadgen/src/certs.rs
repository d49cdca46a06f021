//! Certificates of X.509 devices: a root CA for the run (or the operator's), and a leaf per
//! device with CN = registration ID, all issued before the timed phase.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// The CA that signs device certificates.
pub struct DeviceCa {
    certificate: rcgen::Certificate,
    key: KeyPair,
    /// The DER devices present as the second link of their chain.
    pub der: CertificateDer<'static>,
    /// The PEM uploaded to Berth.
    pub pem: String,
}

/// A device's certificate and key (PKCS#8).
pub struct DeviceCertificate {
    pub leaf: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "berth-loadgen");
    name.push(DnType::CommonName, common_name);
    name
}

impl DeviceCa {
    /// A new root CA (ECDSA P-256), valid from yesterday for a year.
    pub fn generate(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        Ok(Self::from_parts(certificate, key))
    }

    /// The operator's CA from PEM files (--device-ca-cert, --device-ca-key, the key in PKCS#8).
    /// Leaves name it as their issuer; devices present the PEM's own certificate.
    pub fn load(certificate_pem: &str, key_pem: &str) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            format!(
                "--device-ca-key: {e}; it must be a PKCS#8 PEM key \
                 (convert with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`)"
            )
        })?;
        let params = CertificateParams::from_ca_cert_pem(certificate_pem)
            .map_err(|e| format!("--device-ca-cert: {e}"))?;
        // rcgen signs leaves with a `Certificate`; re-signing the parsed parameters keeps the
        // subject and key, which is all a leaf's issuer link needs. Devices send the original.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| format!("--device-ca-key does not sign for --device-ca-cert: {e}"))?;
        let original =
            rustls::pki_types::pem::PemObject::from_pem_slice(certificate_pem.as_bytes())
                .map_err(|e| format!("--device-ca-cert: {e}"))?;
        let mut ca = Self::from_parts(issuer, key);
        ca.der = original;
        certificate_pem.clone_into(&mut ca.pem);
        Ok(ca)
    }

    fn from_parts(certificate: rcgen::Certificate, key: KeyPair) -> Self {
        let der = certificate.der().clone();
        let pem = certificate.pem();
        Self {
            certificate,
            key,
            der,
            pem,
        }
    }

    /// A device certificate: CN = `registration_id`, client authentication, valid from
    /// yesterday for 30 days.
    pub fn issue(&self, registration_id: &str) -> Result<DeviceCertificate, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(registration_id);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.certificate, &self.key)?;
        Ok(DeviceCertificate {
            leaf: certificate.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// Issues the certificates of `ids` on all cores; in the order of `ids`.
    pub fn issue_all(&self, ids: &[String]) -> Result<Vec<DeviceCertificate>, rcgen::Error> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let chunk = ids.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|id| self.issue(id))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(ids.len());
            for worker in workers {
                let part = worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                all.extend(part);
            }
            Ok(all)
        })
    }
}
