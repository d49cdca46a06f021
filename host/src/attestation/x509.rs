//! Certificates as the service API receives them in enrollments: PEM text, Base64 of DER, or
//! Base64 of PEM text (the C service client), wire-protocol.md §8.6. Each is parsed and
//! described by the `info` block the service SDKs require to be complete.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::format_utc;

/// The `info` of an `X509CertificateWithInfo`; all fields are computed by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    pub subject_name: String,
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
    pub issuer_name: String,
    pub not_before_utc: String,
    pub not_after_utc: String,
    pub serial_number: String,
    pub version: u32,
}

/// A certificate accepted from outside, normalized to PEM.
#[derive(Debug, Clone)]
pub struct ParsedCertificate {
    pub pem: String,
    pub der: Vec<u8>,
    pub info: CertificateInfo,
}

/// Parses one certificate in any of the three accepted encodings.
pub fn parse_certificate(input: &str) -> Result<ParsedCertificate, String> {
    let text = input.trim();
    if text.is_empty() {
        return Err("the certificate is empty".to_owned());
    }
    let der = if text.starts_with("-----BEGIN") {
        pem_to_der(text.as_bytes())?
    } else {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = BASE64
            .decode(compact.as_bytes())
            .map_err(|_| "the certificate is neither PEM nor Base64".to_owned())?;
        if bytes.starts_with(b"-----BEGIN") {
            pem_to_der(&bytes)?
        } else {
            bytes
        }
    };
    describe(&der)
}

fn pem_to_der(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
        .map_err(|_| "the PEM certificate could not be decoded".to_owned())?;
    if pem.label != "CERTIFICATE" {
        return Err(format!(
            "expected a PEM CERTIFICATE block, found '{}'",
            pem.label
        ));
    }
    Ok(pem.contents)
}

/// Describes a DER certificate; fails when it is not a well-formed X.509 certificate.
pub fn describe(der: &[u8]) -> Result<ParsedCertificate, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|error| format!("the certificate could not be parsed: {error}"))?;
    let info = CertificateInfo {
        subject_name: distinguished_name(cert.subject()),
        issuer_name: distinguished_name(cert.issuer()),
        sha1_thumbprint: hex::encode_upper(Sha1::digest(der)),
        sha256_thumbprint: hex::encode_upper(Sha256::digest(der)),
        not_before_utc: format_utc(cert.validity().not_before.to_datetime()),
        not_after_utc: format_utc(cert.validity().not_after.to_datetime()),
        serial_number: hex::encode_upper(cert.raw_serial()),
        version: cert.version().0 + 1,
    };
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        BASE64
            .encode(der)
            .as_bytes()
            .chunks(64)
            .map(|line| String::from_utf8_lossy(line).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(ParsedCertificate {
        pem,
        der: der.to_vec(),
        info,
    })
}

/// True when the certificate may sign others: basic constraints with CA set.
pub fn is_ca(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, cert)| cert.is_ca())
}

/// The subject common name, if any.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// Checks a proof of possession: `leaf` names `code` as its subject CN, is within its validity
/// period, and is signed by the key of `ca` (wire-protocol.md §8.7).
pub fn verify_proof_of_possession(ca: &[u8], leaf: &[u8], code: &str) -> Result<(), String> {
    let (_, ca_cert) = X509Certificate::from_der(ca)
        .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
    let (_, leaf_cert) = X509Certificate::from_der(leaf)
        .map_err(|e| format!("the verification certificate does not parse: {e}"))?;
    let cn = leaf_cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the verification certificate has no subject common name")?;
    if cn != code {
        return Err(format!(
            "the verification certificate's common name '{cn}' is not the verification code"
        ));
    }
    if !leaf_cert.validity().is_valid() {
        return Err("the verification certificate is expired or not yet valid".to_owned());
    }
    leaf_cert
        .verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| "the verification certificate is not signed by this CA's key".to_owned())
}

/// "CN=…, O=…, C=…": most specific first, as DPS (.NET) prints names.
pub(crate) fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for rdn in name.iter_rdn() {
        for attribute in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(attribute.attr_type(), registry)
                .map_or_else(
                    |_| attribute.attr_type().to_id_string(),
                    |abbrev| match abbrev {
                        "ST" | "stateOrProvinceName" => "S".to_owned(),
                        other => other.to_owned(),
                    },
                );
            let value = attribute.as_str().map_or_else(
                |_| format!("#{}", hex::encode(attribute.attr_value().data)),
                str::to_owned,
            );
            parts.push(format!("{key}={value}"));
        }
    }
    parts.reverse();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (String, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(vec!["device-1".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "US");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Contoso");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "device-1");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), cert.der().to_vec())
    }

    #[test]
    fn accepts_pem_base64_der_and_base64_pem_alike() {
        let (pem, der) = sample();
        let a = parse_certificate(&pem).unwrap();
        let b = parse_certificate(&BASE64.encode(&der)).unwrap();
        let c = parse_certificate(&BASE64.encode(pem.as_bytes())).unwrap();
        assert_eq!(a.info, b.info);
        assert_eq!(b.info, c.info);
        assert_eq!(a.info.subject_name, "CN=device-1, O=Contoso, C=US");
        assert_eq!(
            a.info.sha256_thumbprint,
            hex::encode_upper(Sha256::digest(&der))
        );
        assert_eq!(a.info.version, 3);
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_certificate("not a certificate").is_err());
        assert!(parse_certificate(&BASE64.encode(b"0123456789")).is_err());
        assert!(parse_certificate("").is_err());
    }
}
