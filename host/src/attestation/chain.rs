//! The certificate chain an X.509 device sent in its TLS handshake, checked link by link
//! (wire-protocol.md §4.2, seed X509-01…21). Pure: the caller supplies the time and the
//! certificates it already holds (CA certificates of the service, enrollments' signing
//! certificates), which may complete a chain the device sent without its root.
//!
//! What is checked, each failure with a message that names the certificate:
//! - every certificate parses and is within its validity period;
//! - each certificate is issued by the next one (names, then the signature with the next
//!   one's key); a name mismatch means an intermediate is missing or out of order;
//! - every issuer is a CA (basic constraints), may sign certificates (key usage, when
//!   present) and allows the intermediates below it (path length);
//! - the leaf has a subject common name, and, when it lists extended key usages, client
//!   authentication among them (the seed leaves EKU enforcement open, X509-21: a leaf that
//!   states its purposes must state this one).
//!
//! Whether the chain is *trusted* is not decided here: that depends on which enrollment
//! matches which certificate (see `provisioning::attest`).
//!
//! The TLS layer has already proven that the device holds the leaf's private key.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;
use x509_parser::x509::X509Name;

use super::x509::distinguished_name;
use crate::clock::format_utc;

/// Longest chain accepted: leaf, intermediates and root together.
pub const MAX_CHAIN: usize = 8;

/// One certificate of a device's chain.
#[derive(Debug, Clone)]
pub struct Link {
    pub der: Vec<u8>,
    /// Uppercase hex, as DPS prints thumbprints.
    pub sha1: String,
    pub sha256: String,
    /// "CN=…, O=…", most specific first.
    pub subject: String,
    pub issuer: String,
    /// The device sent it (false: the service completed the chain with a certificate it holds).
    pub sent: bool,
}

/// What a policy or webhook may learn about the device's certificate (wire-protocol.md §9.1).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeafFacts {
    pub subject_name: String,
    pub issuer_name: String,
    pub common_name: String,
    pub organization: Option<String>,
    pub organizational_unit: Option<String>,
    /// Every subject and issuer attribute as (short name, value), most specific first.
    pub subject_attributes: Vec<(String, String)>,
    pub issuer_attributes: Vec<(String, String)>,
    pub serial_number: String,
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
    pub not_before: String,
    pub not_after: String,
    pub subject_alternative_names: Vec<String>,
    /// The chain as the device sent it, leaf first, Base64 DER.
    pub chain: Vec<String>,
}

/// A chain whose links all hold.
#[derive(Debug, Clone)]
pub struct DeviceChain {
    /// Leaf first; `links[i]` is issued by `links[i + 1]`.
    pub links: Vec<Link>,
    pub leaf: LeafFacts,
    /// The last link is self-signed: the chain reaches a root.
    pub complete: bool,
}

impl DeviceChain {
    /// The registration ID the certificate claims: its subject common name.
    pub fn common_name(&self) -> &str {
        &self.leaf.common_name
    }

    /// Why the chain ends where it does, for messages about untrusted chains.
    pub fn end_description(&self) -> String {
        let top = self.links.last().map_or("", |l| l.subject.as_str());
        if self.complete {
            format!("the chain ends at the root '{top}'")
        } else {
            let issuer = self.links.last().map_or("", |l| l.issuer.as_str());
            format!(
                "the chain ends at '{top}', whose issuer '{issuer}' the device did not send and \
                 this service does not hold (a missing intermediate certificate?)"
            )
        }
    }
}

struct Parsed<'a> {
    der: &'a [u8],
    cert: X509Certificate<'a>,
    sent: bool,
}

fn role(index: usize, last: usize, self_signed: bool, sent: bool) -> &'static str {
    match (index, sent) {
        (0, _) => "device certificate",
        (_, false) => "CA certificate",
        _ if index == last && self_signed => "root certificate",
        _ => "intermediate certificate",
    }
}

fn is_self_issued(cert: &X509Certificate<'_>) -> bool {
    cert.issuer().as_raw() == cert.subject().as_raw()
}

/// Checks the chain a device sent. `held`: DER certificates the service holds, used to
/// complete a chain that stops below its root.
pub fn check(sent: &[Vec<u8>], held: &[Vec<u8>], now: ASN1Time) -> Result<DeviceChain, String> {
    if sent.is_empty() {
        return Err("the device sent no client certificate".to_owned());
    }
    if sent.len() > MAX_CHAIN {
        return Err(format!(
            "the device sent {} certificates; at most {MAX_CHAIN} are accepted",
            sent.len()
        ));
    }
    let mut chain: Vec<Parsed<'_>> = Vec::with_capacity(sent.len() + 2);
    for (index, der) in sent.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
            format!(
                "certificate {} of the chain the device sent does not parse: {e}",
                index + 1
            )
        })?;
        chain.push(Parsed {
            der,
            cert,
            sent: true,
        });
    }
    let held: Vec<(&[u8], X509Certificate<'_>)> = held
        .iter()
        .filter_map(|der| {
            X509Certificate::from_der(der)
                .ok()
                .map(|(_, c)| (der.as_slice(), c))
        })
        .collect();
    // Complete the chain upward with certificates the service holds.
    while chain.len() < MAX_CHAIN {
        let top = &chain[chain.len() - 1].cert;
        if is_self_issued(top) {
            break;
        }
        let issuer = held.iter().find(|(_, candidate)| {
            candidate.subject().as_raw() == top.issuer().as_raw()
                && top.verify_signature(Some(candidate.public_key())).is_ok()
        });
        match issuer {
            Some((der, issuer)) => chain.push(Parsed {
                der,
                cert: issuer.clone(),
                sent: false,
            }),
            None => break,
        }
    }
    let last = chain.len() - 1;
    let top_self_signed =
        is_self_issued(&chain[last].cert) && chain[last].cert.verify_signature(None).is_ok();
    let name = |cert: &X509Certificate<'_>| distinguished_name(cert.subject());
    for (index, link) in chain.iter().enumerate() {
        let cert = &link.cert;
        let what = role(index, last, top_self_signed, link.sent);
        let validity = cert.validity();
        if now < validity.not_before {
            return Err(format!(
                "the {what} '{}' is not valid before {}",
                name(cert),
                format_utc(validity.not_before.to_datetime())
            ));
        }
        if now > validity.not_after {
            return Err(format!(
                "the {what} '{}' expired at {}",
                name(cert),
                format_utc(validity.not_after.to_datetime())
            ));
        }
        let Some(next) = chain.get(index + 1) else {
            continue;
        };
        let issuer = &next.cert;
        let issuer_what = role(index + 1, last, top_self_signed, next.sent);
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(format!(
                "the {what} '{}' is issued by '{}', but the next certificate in the chain is \
                 '{}': an intermediate certificate is missing or the chain is out of order",
                name(cert),
                distinguished_name(cert.issuer()),
                name(issuer)
            ));
        }
        if cert.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(format!(
                "the signature of the {what} '{}' does not verify with the key of '{}'",
                name(cert),
                name(issuer)
            ));
        }
        check_issuer(issuer, issuer_what, index)?;
    }
    let links = chain
        .iter()
        .map(|link| Link {
            der: link.der.to_vec(),
            sha1: hex::encode_upper(Sha1::digest(link.der)),
            sha256: hex::encode_upper(Sha256::digest(link.der)),
            subject: name(&link.cert),
            issuer: distinguished_name(link.cert.issuer()),
            sent: link.sent,
        })
        .collect::<Vec<_>>();
    let leaf = leaf_facts(&chain[0].cert, chain[0].der, sent)?;
    Ok(DeviceChain {
        links,
        leaf,
        complete: top_self_signed,
    })
}

/// An issuer must be a CA allowed to sign certificates, with room for `below` intermediates.
fn check_issuer(issuer: &X509Certificate<'_>, what: &str, below: usize) -> Result<(), String> {
    let subject = distinguished_name(issuer.subject());
    let constraints = issuer
        .basic_constraints()
        .map_err(|e| format!("the {what} '{subject}' has invalid basic constraints: {e}"))?;
    let Some(constraints) = constraints.filter(|c| c.value.ca) else {
        return Err(format!(
            "the {what} '{subject}' signed another certificate but is not a CA certificate \
             (basic constraints without CA:TRUE)"
        ));
    };
    if let Some(limit) = constraints.value.path_len_constraint {
        if usize::try_from(limit).unwrap_or(usize::MAX) < below {
            return Err(format!(
                "the {what} '{subject}' allows {limit} intermediate certificate(s) below it; \
                 the chain has {below}"
            ));
        }
    }
    match issuer.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => Err(format!(
            "the key usage of the {what} '{subject}' does not allow signing certificates"
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the {what} '{subject}' has an invalid key usage: {e}"
        )),
    }
}

fn attributes(name: &X509Name<'_>) -> Vec<(String, String)> {
    let registry = x509_parser::objects::oid_registry();
    let mut out = Vec::new();
    for rdn in name.iter_rdn() {
        for attribute in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(attribute.attr_type(), registry)
                .map_or_else(|_| attribute.attr_type().to_id_string(), str::to_owned);
            let value = attribute.as_str().map_or_else(
                |_| format!("#{}", hex::encode(attribute.attr_value().data)),
                str::to_owned,
            );
            out.push((key, value));
        }
    }
    out.reverse();
    out
}

fn leaf_facts(
    cert: &X509Certificate<'_>,
    der: &[u8],
    sent: &[Vec<u8>],
) -> Result<LeafFacts, String> {
    let subject = distinguished_name(cert.subject());
    let first = |iter: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        iter.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let common_name = first(&mut cert.subject().iter_common_name())
        .ok_or_else(|| format!("the device certificate '{subject}' has no subject common name"))?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !eku.value.any && !eku.value.client_auth => {
            return Err(format!(
                "the device certificate '{subject}' lists extended key usages without client \
                 authentication (1.3.6.1.5.5.7.3.2)"
            ));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "the device certificate '{subject}' has an invalid extended key usage: {e}"
            ))
        }
    }
    let subject_alternative_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(v) | GeneralName::RFC822Name(v) | GeneralName::URI(v) => {
                    Some((*v).to_owned())
                }
                GeneralName::IPAddress(bytes) => ip_text(bytes),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(LeafFacts {
        issuer_name: distinguished_name(cert.issuer()),
        common_name,
        organization: first(&mut cert.subject().iter_organization()),
        organizational_unit: first(&mut cert.subject().iter_organizational_unit()),
        subject_attributes: attributes(cert.subject()),
        issuer_attributes: attributes(cert.issuer()),
        serial_number: hex::encode_upper(cert.raw_serial()),
        sha1_thumbprint: hex::encode_upper(Sha1::digest(der)),
        sha256_thumbprint: hex::encode_upper(Sha256::digest(der)),
        not_before: format_utc(cert.validity().not_before.to_datetime()),
        not_after: format_utc(cert.validity().not_after.to_datetime()),
        subject_alternative_names,
        chain: sent.iter().map(|der| BASE64.encode(der)).collect(),
        subject_name: subject,
    })
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    /// What a test certificate is: a leaf, or a CA with an optional path length.
    #[derive(Clone, Copy)]
    enum Kind {
        Leaf,
        Ca,
        CaWithPathLength(u8),
    }
    use Kind::{Ca as CA, CaWithPathLength, Leaf};

    fn params(cn: &str, kind: Kind) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Contoso");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let constraints = match kind {
            Leaf => None,
            CA => Some(BasicConstraints::Unconstrained),
            CaWithPathLength(n) => Some(BasicConstraints::Constrained(n)),
        };
        if let Some(constraints) = constraints {
            params.is_ca = IsCa::Ca(constraints);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        params
    }

    fn root(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params(cn, CA).self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(cn: &str, kind: Kind, issuer: &Ca) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params(cn, kind)
            .signed_by(&key, &issuer.cert, &issuer.key)
            .unwrap();
        Ca { cert, key }
    }

    fn der(c: &Ca) -> Vec<u8> {
        c.cert.der().to_vec()
    }

    fn now() -> ASN1Time {
        ASN1Time::now()
    }

    #[test]
    fn a_full_chain_holds_and_describes_the_leaf() {
        let r = root("root");
        let i = issue("intermediate", CA, &r);
        let leaf = issue("device-1", Leaf, &i);
        let chain = check(&[der(&leaf), der(&i), der(&r)], &[], now()).unwrap();
        assert!(chain.complete);
        assert_eq!(chain.links.len(), 3);
        assert_eq!(chain.common_name(), "device-1");
        assert_eq!(chain.leaf.organization.as_deref(), Some("Contoso"));
        assert_eq!(chain.leaf.issuer_name, "CN=intermediate, O=Contoso");
        assert_eq!(chain.leaf.chain.len(), 3);
        assert_eq!(
            chain.leaf.sha256_thumbprint,
            hex::encode_upper(Sha256::digest(der(&leaf)))
        );
        assert_eq!(
            chain.links[1].sha256,
            hex::encode_upper(Sha256::digest(der(&i)))
        );
        assert_eq!(
            chain.leaf.subject_attributes,
            vec![
                ("CN".to_owned(), "device-1".to_owned()),
                ("O".to_owned(), "Contoso".to_owned())
            ]
        );
    }

    #[test]
    fn a_held_root_completes_a_chain_sent_without_it() {
        let r = root("root");
        let i = issue("intermediate", CA, &r);
        let leaf = issue("device-1", Leaf, &i);
        let partial = check(&[der(&leaf), der(&i)], &[], now()).unwrap();
        assert!(!partial.complete);
        assert!(partial.end_description().contains("missing intermediate"));
        let completed = check(&[der(&leaf), der(&i)], &[der(&r)], now()).unwrap();
        assert!(completed.complete);
        assert!(!completed.links[2].sent);
    }

    #[test]
    fn a_gap_in_the_chain_is_named() {
        let r = root("root");
        let i1 = issue("intermediate-1", CA, &r);
        let i2 = issue("intermediate-2", CA, &i1);
        let leaf = issue("device-1", Leaf, &i2);
        let error = check(&[der(&leaf), der(&i1), der(&r)], &[], now()).unwrap_err();
        assert!(
            error.contains("intermediate certificate is missing"),
            "{error}"
        );
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let r = root("root");
        let impostor = root("root");
        let leaf = issue("device-1", Leaf, &impostor);
        let error = check(&[der(&leaf), der(&r)], &[], now()).unwrap_err();
        assert!(error.contains("does not verify"), "{error}");
    }

    #[test]
    fn an_issuer_must_be_a_ca_and_respect_its_path_length() {
        let r = root("root");
        let not_ca = issue("plain", Leaf, &r);
        let leaf = issue("device-1", Leaf, &not_ca);
        let error = check(&[der(&leaf), der(&not_ca), der(&r)], &[], now()).unwrap_err();
        assert!(error.contains("not a CA certificate"), "{error}");

        let tight = issue("tight", CaWithPathLength(0), &r);
        let below = issue("below", CA, &tight);
        let leaf = issue("device-2", Leaf, &below);
        let error =
            check(&[der(&leaf), der(&below), der(&tight), der(&r)], &[], now()).unwrap_err();
        assert!(error.contains("allows 0 intermediate"), "{error}");
    }

    #[test]
    fn validity_is_checked_for_every_link() {
        let r = root("root");
        let i = issue("intermediate", CA, &r);
        let leaf = issue("device-1", Leaf, &i);
        let chain = [der(&leaf), der(&i), der(&r)];
        let later = ASN1Time::from_timestamp(2_208_988_800).unwrap(); // 2040
        let error = check(&chain, &[], later).unwrap_err();
        assert!(
            error.contains("device certificate") && error.contains("expired"),
            "{error}"
        );
        let earlier = ASN1Time::from_timestamp(0).unwrap();
        let error = check(&chain, &[], earlier).unwrap_err();
        assert!(error.contains("not valid before"), "{error}");
    }

    #[test]
    fn a_leaf_without_client_authentication_among_its_purposes_is_refused() {
        let r = root("root");
        let mut p = params("device-1", Leaf);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let leaf = p.signed_by(&key, &r.cert, &r.key).unwrap();
        let error = check(&[leaf.der().to_vec(), der(&r)], &[], now()).unwrap_err();
        assert!(error.contains("client authentication"), "{error}");
    }

    #[test]
    fn garbage_and_empty_chains_are_refused() {
        assert!(check(&[], &[], now()).is_err());
        assert!(check(&[b"garbage".to_vec()], &[], now())
            .unwrap_err()
            .contains("does not parse"));
    }
}
